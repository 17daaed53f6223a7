//! The error a data call returns.

use crate::wit::kvdb::script::types as wit;

/// Why a call failed. A failed call never ends the run by itself.
///
/// `Display` writes the same text as the Lua API's error strings
/// (`not found`, `permission denied: ...`), so a Rust script and its Lua
/// twin can say the same thing.
///
/// # Example
///
/// ```no_run
/// match kvdb_guest::set("users:2:name", "kim") {
///     Ok(()) => {}
///     Err(kvdb_guest::Error::PermissionDenied(why)) => kvdb_guest::log::warn(&why),
///     Err(e) => kvdb_guest::log::error(&format!("set failed: {e}")),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The bucket is gone (deleted while the run went on). A missing key
    /// is not an error: [`get`](crate::get) answers `None`,
    /// [`delete`](crate::delete) `false`, and `incr`, `merge` and `append`
    /// start from nothing.
    NotFound,
    /// The run's scope does not allow this call on this key.
    PermissionDenied(String),
    /// The operation does not apply to the stored value (adding to text,
    /// integer overflow, a failed JSON-patch `test`).
    TypeMismatch(String),
    /// A size limit: the value would be too large.
    Limit(String),
    /// Bad input: an invalid key, a malformed patch, a value that is not
    /// the JSON [`get_json`](crate::get_json) expected.
    InvalidInput(String),
    /// The server failed; nothing was changed.
    Internal(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotFound => f.write_str("not found"),
            Error::PermissionDenied(m) => write!(f, "permission denied: {m}"),
            Error::TypeMismatch(m) => write!(f, "type mismatch: {m}"),
            Error::Limit(m) => write!(f, "limit exceeded: {m}"),
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The HTTP status that answers this error, as the server's own HTTP
    /// API answers the same failure: [`NotFound`](Error::NotFound) 404,
    /// [`PermissionDenied`](Error::PermissionDenied) 403,
    /// [`TypeMismatch`](Error::TypeMismatch) 409 (an operation that does not
    /// apply to the value, a failed JSON-patch `test`),
    /// [`Limit`](Error::Limit) 413, [`InvalidInput`](Error::InvalidInput)
    /// 400, [`Internal`](Error::Internal) 500. It is what
    /// `From<Error>` for [`Response`](crate::Response)
    /// answers; use it for a response of your own shape (JSON, say).
    ///
    /// # Example
    ///
    /// ```
    /// use kvdb_guest::Error;
    ///
    /// assert_eq!(Error::PermissionDenied("no write".into()).status(), 403);
    /// assert_eq!(Error::TypeMismatch("not a number".into()).status(), 409);
    /// ```
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Error::NotFound => 404,
            Error::PermissionDenied(_) => 403,
            Error::TypeMismatch(_) => 409,
            Error::Limit(_) => 413,
            Error::InvalidInput(_) => 400,
            Error::Internal(_) => 500,
        }
    }

    /// The SDK's error of one the bindings answered (not a `From` impl, so
    /// that the generated type stays out of the compiler's suggestions).
    pub(crate) fn from_wit(e: wit::Error) -> Self {
        match e {
            wit::Error::NotFound => Error::NotFound,
            wit::Error::PermissionDenied(m) => Error::PermissionDenied(m),
            wit::Error::TypeMismatch(m) => Error::TypeMismatch(m),
            wit::Error::Limit(m) => Error::Limit(m),
            wit::Error::InvalidInput(m) => Error::InvalidInput(m),
            wit::Error::Internal(m) => Error::Internal(m),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::InvalidInput(format!("not JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn display_matches_the_lua_error_strings() {
        assert_eq!(Error::NotFound.to_string(), "not found");
        assert_eq!(
            Error::PermissionDenied("no write".into()).to_string(),
            "permission denied: no write"
        );
        assert_eq!(
            Error::Limit("too big".into()).to_string(),
            "limit exceeded: too big"
        );
    }
}

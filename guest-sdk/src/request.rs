//! The HTTP request a script runs for.

use serde::de::DeserializeOwned;

use crate::Error;
use crate::wit::kvdb::script::types as wit;

/// The HTTP request the script runs for: `kvdb.method`, `kvdb.path`,
/// `kvdb.var`, `kvdb.headers` and `kvdb.body` in Lua.
///
/// The `with_*` builders make requests for unit tests of a handler.
///
/// # Example
///
/// ```
/// use kvdb_guest::Request;
///
/// let req = Request::new("POST", "/b/scripts/hello")
///     .with_var("name", "ann")
///     .with_header("Accept", "text/html")
///     .with_body("hi");
/// assert_eq!(req.var("name"), Some("ann"));
/// assert_eq!(req.header("accept"), Some("text/html"));
/// assert_eq!(req.body(), b"hi");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    method: String,
    path: String,
    vars: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// A request with no variables, headers or body.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/");
    /// assert_eq!(req.method(), "GET");
    /// ```
    #[must_use]
    pub fn new(method: impl Into<String>, path: impl Into<String>) -> Self {
        Request {
            method: method.into(),
            path: path.into(),
            ..Request::default()
        }
    }

    /// Adds a variable (a later one with the same name wins, as in Lua).
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/").with_var("q", "1").with_var("q", "2");
    /// assert_eq!(req.var("q"), Some("2"));
    /// ```
    #[must_use]
    pub fn with_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.push((name.into(), value.into()));
        self
    }

    /// Adds a header; its name is lower-cased, as the host does.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/").with_header("X-Id", "7");
    /// assert_eq!(req.headers(), [("x-id".to_string(), "7".to_string())]);
    /// ```
    #[must_use]
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the body.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("POST", "/").with_body(r#"{"a":1}"#);
    /// assert_eq!(req.body_str(), Some(r#"{"a":1}"#));
    /// ```
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The HTTP method: `GET` or `POST` (a script runs for no other: a `PUT`
    /// or `DELETE` with the secret key to its URL uploads or deletes the
    /// script itself).
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Request::new("POST", "/").method(), "POST");
    /// ```
    #[must_use]
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request path.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Request::new("GET", "/b/scripts/x").path(), "/b/scripts/x");
    /// ```
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The variable `name`, as `kvdb.var[name]` in Lua: a query parameter or
    /// a form (or JSON object) body field, the body winning on a clash, or
    /// `remote_addr`.
    ///
    /// Two query names are reserved: `?key=` and `?access_token=` on a
    /// script's URL are read as the caller's credential (a wrong one is a
    /// `401` before the script runs) and never reach the script, so
    /// `var("key")` sees only a body field of that name. Name your own
    /// parameters otherwise (`?k=`, `?name=`).
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/").with_var("name", "ann");
    /// assert_eq!(req.var("name"), Some("ann"));
    /// assert_eq!(req.var("age"), None);
    /// ```
    #[must_use]
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All variables, in the order the host gave them (never the query's
    /// `key` or `access_token`: see [`var`](Self::var)).
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/").with_var("a", "1");
    /// assert_eq!(req.vars().len(), 1);
    /// ```
    #[must_use]
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// The first header called `name` (compared case-insensitively). Lua's
    /// `kvdb.headers` joins repeated headers with `", "`; see
    /// [`headers`](Self::headers) for every value.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/").with_header("accept", "*/*");
    /// assert_eq!(req.header("Accept"), Some("*/*"));
    /// ```
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers (lower-case names), repeated ones as separate entries.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("GET", "/");
    /// assert!(req.headers().is_empty());
    /// ```
    #[must_use]
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body as sent.
    ///
    /// # Example
    ///
    /// ```
    /// assert!(kvdb_guest::Request::new("GET", "/").body().is_empty());
    /// ```
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as text, if it is UTF-8.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("POST", "/").with_body("hi");
    /// assert_eq!(req.body_str(), Some("hi"));
    /// ```
    #[must_use]
    pub fn body_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// The body deserialized from JSON.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if the body is not the JSON `T` expects.
    ///
    /// # Example
    ///
    /// ```
    /// let req = kvdb_guest::Request::new("POST", "/").with_body("[1, 2]");
    /// assert_eq!(req.json::<Vec<u8>>().unwrap(), [1, 2]);
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

impl Request {
    /// The SDK's request of the one the host gave.
    pub(crate) fn from_wit(r: wit::Request) -> Self {
        Request {
            method: r.method,
            path: r.path,
            vars: r.vars,
            headers: r.headers,
            body: r.body,
        }
    }
}

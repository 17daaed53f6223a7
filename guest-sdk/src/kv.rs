//! The scoped bucket: the same operations as the Lua `kvdb` table.
//!
//! Every call is checked against the run's scope (see [`scope`]) and only
//! works inside a running script: natively (a `cargo test`) a call panics,
//! as the crate's "Testing natively" says.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wit::kvdb::script::{kv, scope as wit_scope, types as wit};
use crate::{Error, Number, Value};

/// The value under `key`, or `None` if there is none. Needs `read`.
///
/// (The Lua `kvdb.get` answers a missing key with `nil, "not found"`; here
/// it is `Ok(None)`.)
///
/// # Errors
///
/// [`Error::PermissionDenied`] without `read` on `key`;
/// [`Error::InvalidInput`] for an invalid key.
///
/// # Example
///
/// ```no_run
/// let visits = kvdb_guest::get("visits")?.and_then(|v| v.as_i64()).unwrap_or(0);
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn get(key: &str) -> Result<Option<Value>, Error> {
    crate::host_only("get");
    Ok(kv::get(key).map_err(Error::from_wit)?.map(Value::from_wit))
}

/// The value under `key` deserialized from JSON, or `None` if there is none.
/// Needs `read`.
///
/// # Errors
///
/// As [`get`]; [`Error::InvalidInput`] if the value is not the JSON `T`
/// expects.
///
/// # Example
///
/// ```no_run
/// #[derive(serde::Deserialize)]
/// struct User {
///     name: String,
/// }
///
/// if let Some(user) = kvdb_guest::get_json::<User>("users:1")? {
///     kvdb_guest::log::info(&user.name);
/// }
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    crate::host_only("get_json");
    get(key)?.map(|v| v.parse_json()).transpose()
}

/// Whether `key` holds a value. Needs `read`.
///
/// # Errors
///
/// [`Error::PermissionDenied`] without `read` on `key`.
///
/// # Example
///
/// ```no_run
/// if !kvdb_guest::exists("config")? {
///     kvdb_guest::set("config", kvdb_guest::Value::Json("{}".into()))?;
/// }
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn exists(key: &str) -> Result<bool, Error> {
    crate::host_only("exists");
    kv::exists(key).map_err(Error::from_wit)
}

/// Sets `key` to `value` with the bucket's default expiry (`default_ttl`;
/// by default none), replacing any expiry the key had. Needs `write`.
///
/// # Errors
///
/// [`Error::PermissionDenied`] without `write` on `key`; [`Error::Limit`]
/// if the value is too large; [`Error::InvalidInput`] for an invalid key.
///
/// # Example
///
/// ```no_run
/// kvdb_guest::set("users:1:name", "bob")?;
/// kvdb_guest::set("users:1:age", 42)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn set(key: &str, value: impl Into<Value>) -> Result<(), Error> {
    crate::host_only("set");
    kv::set(key, &value.into().into(), None).map_err(Error::from_wit)
}

/// Sets `key` to `value`, expiring after `ttl` seconds (0: never). Needs
/// `write`.
///
/// The expiry lasts until the key's next write: [`set`], [`incr`],
/// [`merge`], [`patch`] and [`append`] each set it afresh, to the bucket's
/// `default_ttl`.
///
/// # Errors
///
/// As [`set`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::set_with_ttl("session:abc", "bob", 3600)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn set_with_ttl(key: &str, value: impl Into<Value>, ttl: u64) -> Result<(), Error> {
    crate::host_only("set_with_ttl");
    kv::set(key, &value.into().into(), Some(ttl)).map_err(Error::from_wit)
}

/// Sets `key` to `value` serialized as a JSON value. Needs `write`.
///
/// # Errors
///
/// As [`set`]; [`Error::InvalidInput`] if `value` can't be written as JSON.
///
/// # Example
///
/// ```no_run
/// kvdb_guest::set_json("tags", &["a", "b"])?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
    crate::host_only("set_json");
    set(key, Value::json(value)?)
}

/// Deletes `key`; `false` if it was absent. Needs `delete`.
///
/// # Errors
///
/// [`Error::PermissionDenied`] without `delete` on `key`.
///
/// # Example
///
/// ```no_run
/// let existed = kvdb_guest::delete("session:abc")?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn delete(key: &str) -> Result<bool, Error> {
    crate::host_only("delete");
    kv::delete(key).map_err(Error::from_wit)
}

/// Adds `by` to the number under `key` atomically (a missing key counts as
/// 0) and answers the new value. Needs `write`.
///
/// The key's expiry is set afresh, as by every write: to the bucket's
/// `default_ttl` (by default none), so a ttl given by [`set_with_ttl`] is
/// dropped. To keep one, set the answered value again with
/// [`set_with_ttl`]: a second write, not atomic with this one (a
/// concurrent change in between would be overwritten).
///
/// # Errors
///
/// [`Error::PermissionDenied`] without `write`; [`Error::TypeMismatch`] if
/// the value is not a number or the sum overflows.
///
/// # Example
///
/// ```no_run
/// let n = kvdb_guest::incr("hits", 1)?;
/// let total = kvdb_guest::incr("total", 2.5)?;
///
/// // A counter that expires an hour after its last hit: the increment
/// // drops the expiry, so it is set again with the new value.
/// let n = kvdb_guest::incr("hits:recent", 1)?;
/// kvdb_guest::set_with_ttl("hits:recent", n, 3600)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn incr(key: &str, by: impl Into<Number>) -> Result<Value, Error> {
    crate::host_only("incr");
    value(kv::incr(key, by.into().into()))
}

/// Merges `patch` (JSON text, RFC 7396) into the JSON value under `key`
/// atomically and answers the new value. Needs `write`.
///
/// The key's expiry is set afresh, as by every write: to the bucket's
/// `default_ttl` (by default none), so a ttl given by [`set_with_ttl`] is
/// dropped. To keep one, set the answered value again with
/// [`set_with_ttl`]: a second write, not atomic with this one (a
/// concurrent change in between would be overwritten).
///
/// # Errors
///
/// [`Error::InvalidInput`] if `patch` is not JSON; [`Error::TypeMismatch`]
/// if the stored value is not JSON; [`Error::PermissionDenied`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::merge("users:1", r#"{"name": "bob", "email": null}"#)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn merge(key: &str, patch: &str) -> Result<Value, Error> {
    crate::host_only("merge");
    value(kv::merge(key, patch))
}

/// Applies `patch` (JSON text, RFC 6902) to the JSON value under `key`
/// atomically and answers the new value. Needs `read` and `write` (whether
/// a patch applies tells what the value holds).
///
/// The key's expiry is set afresh, as by every write: to the bucket's
/// `default_ttl` (by default none), so a ttl given by [`set_with_ttl`] is
/// dropped. To keep one, set the answered value again with
/// [`set_with_ttl`]: a second write, not atomic with this one (a
/// concurrent change in between would be overwritten).
///
/// # Errors
///
/// [`Error::TypeMismatch`] when a `test` operation fails (compare-and-set);
/// [`Error::InvalidInput`] for a malformed patch; [`Error::PermissionDenied`].
///
/// # Example
///
/// ```no_run
/// let cas = r#"[{"op": "test", "path": "/v", "value": 1},
///               {"op": "replace", "path": "/v", "value": 2}]"#;
/// match kvdb_guest::patch("doc", cas) {
///     Ok(_) => {}
///     Err(kvdb_guest::Error::TypeMismatch(_)) => { /* someone else won */ }
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn patch(key: &str, patch: &str) -> Result<Value, Error> {
    crate::host_only("patch");
    value(kv::patch(key, patch))
}

/// Appends `bytes` to the raw value under `key` (creating it) and answers
/// the new value. Needs `write`.
///
/// The key's expiry is set afresh, as by every write: to the bucket's
/// `default_ttl` (by default none), so a ttl given by [`set_with_ttl`] is
/// dropped. To keep one, set the answered value again with
/// [`set_with_ttl`]: a second write, not atomic with this one (a
/// concurrent change in between would be overwritten).
///
/// # Errors
///
/// [`Error::TypeMismatch`] if the value is not raw; [`Error::Limit`] if it
/// would grow too large; [`Error::PermissionDenied`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::append("log", "one more line\n")?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn append(key: &str, bytes: impl AsRef<[u8]>) -> Result<Value, Error> {
    crate::host_only("append");
    value(kv::append(key, bytes.as_ref()))
}

/// Options of [`list`]: build them from [`ListOptions::default`] (the
/// first page of keys under the prefix, without values, in byte order; see
/// [`list`] for pages).
///
/// # Example
///
/// ```
/// let newest_ten = kvdb_guest::ListOptions::default().with_values().with_limit(10).reversed();
/// assert!(newest_ten.values && newest_ten.reverse);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// At most this many keys (the server caps it at 10000).
    pub limit: Option<u32>,
    /// Start after this key (exclusive, in the direction of travel).
    pub start: Option<String>,
    /// Stop before this key (exclusive, in the direction of travel).
    pub end: Option<String>,
    /// Walk the keys in reverse byte order.
    pub reverse: bool,
    /// Also return each value (needs `read`).
    pub values: bool,
}

impl ListOptions {
    /// Also returns each key's value.
    ///
    /// # Example
    ///
    /// ```
    /// assert!(kvdb_guest::ListOptions::default().with_values().values);
    /// ```
    #[must_use]
    pub fn with_values(mut self) -> Self {
        self.values = true;
        self
    }

    /// Returns at most `limit` keys.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::ListOptions::default().with_limit(5).limit, Some(5));
    /// ```
    #[must_use]
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Starts after `key` (a cursor: the last key of the previous page).
    ///
    /// # Example
    ///
    /// ```
    /// let next = kvdb_guest::ListOptions::default().with_start("log:0042");
    /// assert_eq!(next.start.as_deref(), Some("log:0042"));
    /// ```
    #[must_use]
    pub fn with_start(mut self, key: impl Into<String>) -> Self {
        self.start = Some(key.into());
        self
    }

    /// Stops before `key`.
    ///
    /// # Example
    ///
    /// ```
    /// let o = kvdb_guest::ListOptions::default().with_end("log:0100");
    /// assert_eq!(o.end.as_deref(), Some("log:0100"));
    /// ```
    #[must_use]
    pub fn with_end(mut self, key: impl Into<String>) -> Self {
        self.end = Some(key.into());
        self
    }

    /// Walks the keys in reverse byte order.
    ///
    /// # Example
    ///
    /// ```
    /// assert!(kvdb_guest::ListOptions::default().reversed().reverse);
    /// ```
    #[must_use]
    pub fn reversed(mut self) -> Self {
        self.reverse = true;
        self
    }
}

/// One key of a listing, with its value when [`ListOptions::values`] asked
/// for it.
///
/// # Example
///
/// ```no_run
/// for entry in kvdb_guest::list("users:", kvdb_guest::ListOptions::default().with_values())? {
///     if let Some(value) = entry.value {
///         kvdb_guest::log::info(&format!("{} = {value}", entry.key));
///     }
/// }
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Its value, when asked for.
    pub value: Option<Value>,
}

/// The keys (and values) under `prefix`, in byte order. Needs `enumerate`
/// (and `read` with values).
///
/// One call answers one page: at most 10,000 keys (fewer with a smaller
/// [`ListOptions::limit`]), and with values it ends early once it holds
/// 32 MiB of them. A full page may not be the last: nothing says there
/// are more, so ask for the next one with [`ListOptions::with_start`] and
/// the page's last key until a page comes back empty.
///
/// # Errors
///
/// [`Error::PermissionDenied`] without the permissions.
///
/// # Example
///
/// ```no_run
/// let keys: Vec<String> = kvdb_guest::list("users:", Default::default())?
///     .into_iter()
///     .map(|e| e.key)
///     .collect();
///
/// // Every key, page by page.
/// let mut all = Vec::new();
/// let mut options = kvdb_guest::ListOptions::default();
/// loop {
///     let page = kvdb_guest::list("log:", options.clone())?;
///     let Some(last) = page.last() else { break };
///     options = options.with_start(last.key.clone());
///     all.extend(page.into_iter().map(|e| e.key));
/// }
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn list(prefix: &str, options: ListOptions) -> Result<Vec<Entry>, Error> {
    let options = wit::ListOptions {
        limit: options.limit,
        start: options.start,
        end: options.end,
        reverse: options.reverse,
        values: options.values,
    };
    crate::host_only("list");
    Ok(kv::list(prefix, &options)
        .map_err(Error::from_wit)?
        .into_iter()
        .map(|e| Entry {
            key: e.key,
            value: e.value.map(Value::from_wit),
        })
        .collect())
}

/// A permission on keys.
///
/// # Example
///
/// ```
/// assert_eq!(kvdb_guest::Permission::Enumerate.to_string(), "enumerate");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Get values.
    Read,
    /// Set and change values.
    Write,
    /// Delete keys.
    Delete,
    /// List keys.
    Enumerate,
}

impl Permission {
    /// The permission's name, as in API.md and Lua (`"read"`, ...).
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Permission::Write.as_str(), "write");
    /// ```
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Delete => "delete",
            Permission::Enumerate => "enumerate",
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Permission> for wit::Permission {
    fn from(p: Permission) -> Self {
        match p {
            Permission::Read => wit::Permission::Read,
            Permission::Write => wit::Permission::Write,
            Permission::Delete => wit::Permission::Delete,
            Permission::Enumerate => wit::Permission::Enumerate,
        }
    }
}

impl Permission {
    fn from_wit(p: wit::Permission) -> Self {
        match p {
            wit::Permission::Read => Permission::Read,
            wit::Permission::Write => Permission::Write,
            wit::Permission::Delete => Permission::Delete,
            wit::Permission::Enumerate => Permission::Enumerate,
        }
    }
}

/// A new value the bindings answered, as the SDK's.
fn value(r: Result<wit::Value, wit::Error>) -> Result<Value, Error> {
    r.map(Value::from_wit).map_err(Error::from_wit)
}

fn to_wit(permissions: &[Permission]) -> Vec<wit::Permission> {
    permissions.iter().copied().map(Into::into).collect()
}

/// An access token and its expiry, from [`access_token`].
///
/// # Example
///
/// ```no_run
/// use kvdb_guest::{Permission, Response};
///
/// let t = kvdb_guest::access_token("users:1:", &[Permission::Read], 600)?;
/// let body = format!(r#"{{"access_token":"{}","expires_at":{}}}"#, t.token, t.expires_at);
/// let _ = Response::text(body);
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The token, for `Authorization: Bearer` or `?access_token=`.
    pub token: String,
    /// When it expires, in Unix seconds.
    pub expires_at: u64,
}

/// An access token for the keys under `prefix` with `permissions`, valid
/// `ttl` seconds. The current scope must hold what it grants. A caller's
/// token bounds it: the new token expires no later than the caller's
/// (`expires_at` says when), whatever `ttl` asks.
///
/// # Errors
///
/// [`Error::PermissionDenied`] if the scope does not cover `prefix` and
/// `permissions`; [`Error::InvalidInput`] for no permissions, a `ttl` of 0
/// or over 100 years, or a prefix no key could have.
///
/// # Example
///
/// ```no_run
/// use kvdb_guest::Permission;
///
/// let t = kvdb_guest::access_token("users:1:", &[Permission::Read, Permission::Enumerate], 600)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn access_token(prefix: &str, permissions: &[Permission], ttl: u64) -> Result<Token, Error> {
    crate::host_only("access_token");
    let t = kv::access_token(prefix, &to_wit(permissions), ttl).map_err(Error::from_wit)?;
    Ok(Token {
        token: t.token,
        expires_at: t.expires_at,
    })
}

/// What the run may do: the permissions that hold on every key under a
/// prefix.
///
/// A caller's authorization can hold more than this summary: what the
/// bucket leaves open (on every key) and a token's grant under a longer
/// prefix. The summary gives the shortest prefix and only the permissions
/// that hold on all of it, so setting a scope from it (say, a new prefix
/// with the same permissions) never carries a right the caller had only on
/// other keys. So it is no test of whether a call may be made: make the
/// call, and answer its [`Error::PermissionDenied`] (a 403 by
/// [`Error::status`]).
///
/// # Example
///
/// ```no_run
/// let s = kvdb_guest::scope();
/// if !s.permissions.contains(&kvdb_guest::Permission::Write) {
///     kvdb_guest::log::warn(&format!("not writable everywhere under {:?}", s.prefix));
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The shortest prefix of the run's scope: the keys the run may touch
    /// start with it.
    pub prefix: String,
    /// What the run may do on every key under `prefix`.
    pub permissions: Vec<Permission>,
}

/// The run's current scope, summed up as [`Scope`] says: the caller's
/// authorization, until [`set_scope`] replaces it.
///
/// # Example
///
/// ```no_run
/// let prefix = kvdb_guest::scope().prefix;
/// ```
#[must_use]
pub fn scope() -> Scope {
    crate::host_only("scope");
    let s = wit_scope::get();
    Scope {
        prefix: s.prefix,
        permissions: s
            .permissions
            .into_iter()
            .map(Permission::from_wit)
            .collect(),
    }
}

/// Replaces the run's scope: every later call is checked against `prefix`
/// and `permissions` alone (as assigning `kvdb.scope` in Lua).
///
/// # Errors
///
/// [`Error::InvalidInput`] for an invalid prefix.
///
/// # Example
///
/// ```no_run
/// use kvdb_guest::Permission;
///
/// kvdb_guest::set_scope("users:1:", &[Permission::Write])?;
/// assert!(kvdb_guest::set("users:2:name", "kim").is_err());
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
pub fn set_scope(prefix: &str, permissions: &[Permission]) -> Result<(), Error> {
    crate::host_only("set_scope");
    wit_scope::set(prefix, &to_wit(permissions)).map_err(Error::from_wit)
}

#[cfg(test)]
mod tests {
    /// Natively a host call panics saying what to do, and unwinds (it
    /// aborted the whole test process with "entered unreachable code").
    #[test]
    #[should_panic(
        expected = "kvdb_guest::get calls the KVdb server, which only a script running in it provides"
    )]
    fn a_host_call_outside_a_script_panics_saying_so() {
        let _ = crate::get("k");
    }

    #[test]
    #[should_panic(expected = "kvdb_guest::log calls the KVdb server")]
    fn a_log_line_outside_a_script_panics_saying_so() {
        crate::log::info("hello");
    }
}

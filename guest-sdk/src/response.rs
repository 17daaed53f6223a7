//! The HTTP response a script answers.

use serde::Serialize;

use crate::Error;
use crate::wit::kvdb::script::types as wit;

/// The content type of text responses: the Lua runtime's default.
const TEXT: &str = "text/plain; charset=utf-8";

/// The HTTP response the script answers, sent as it is.
///
/// Every constructor sets a `content-type`, so the same response from a Rust
/// script and its Lua twin (`kvdb.say`, `kvdb.status`, `kvdb.header`) is
/// byte for byte the same. Header names are lower-cased and a header set
/// twice keeps its last value, as `kvdb.header` does. As with `kvdb.header`,
/// the host refuses a response with an invalid header, a framing one it
/// sets itself (`content-length`, `transfer-encoding`, `connection`), or
/// more than 100 headers or 64 KiB of them: the run ends with a script
/// error.
///
/// # Example
///
/// ```
/// use kvdb_guest::Response;
///
/// let r = Response::text("created\n").with_status(201).with_header("Cache-Control", "no-store");
/// assert_eq!(r.status(), 201);
/// assert_eq!(r.header("cache-control"), Some("no-store"));
/// assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Default for Response {
    fn default() -> Self {
        Response::new()
    }
}

impl Response {
    /// An empty `200` with the text content type (what a Lua script that
    /// says nothing answers). With a status that has no content (204, 205,
    /// 304) the server sends it without a body or a content type.
    ///
    /// # Example
    ///
    /// ```
    /// let r = kvdb_guest::Response::new().with_status(204);
    /// assert!(r.body().is_empty());
    /// ```
    #[must_use]
    pub fn new() -> Self {
        Response::bytes(TEXT, Vec::new())
    }

    /// `200` with `text` as `text/plain; charset=utf-8`. Unlike
    /// `kvdb.say`, it adds no newline: end `text` with `\n` for the same
    /// bytes.
    ///
    /// # Example
    ///
    /// ```
    /// let r = kvdb_guest::Response::text("hello\n");
    /// assert_eq!(r.body(), b"hello\n");
    /// ```
    #[must_use]
    pub fn text(text: impl Into<String>) -> Self {
        Response::bytes(TEXT, text.into().into_bytes())
    }

    /// `200` with `value` serialized as compact JSON (`application/json`);
    /// a `500` text response if it can't be serialized (a map with
    /// non-string keys, say).
    ///
    /// # Example
    ///
    /// ```
    /// let r = kvdb_guest::Response::json(&["a", "b"]);
    /// assert_eq!(r.body(), br#"["a","b"]"#);
    /// assert_eq!(r.header("content-type"), Some("application/json"));
    /// ```
    #[must_use]
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response::bytes("application/json", body),
            Err(e) => {
                Response::text(format!("can't write the response as JSON: {e}\n")).with_status(500)
            }
        }
    }

    /// `200` with `body` as `content_type`.
    ///
    /// # Example
    ///
    /// ```
    /// let r = kvdb_guest::Response::bytes("image/png", vec![0x89, b'P', b'N', b'G']);
    /// assert_eq!(r.header("content-type"), Some("image/png"));
    /// ```
    #[must_use]
    pub fn bytes(content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status: 200,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into(),
        }
    }

    /// A `302` to `url` with an empty body, as `kvdb.redirect(url)`; change
    /// the status with [`with_status`](Self::with_status) (301, 303, 307, 308).
    ///
    /// # Example
    ///
    /// ```
    /// let r = kvdb_guest::Response::redirect("/b/scripts/home");
    /// assert_eq!(r.status(), 302);
    /// assert_eq!(r.header("location"), Some("/b/scripts/home"));
    /// ```
    #[must_use]
    pub fn redirect(url: impl Into<String>) -> Self {
        Response::new()
            .with_status(302)
            .with_header("location", url)
    }

    /// Sets the status code, as `kvdb.status(code)`.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Response::text("gone\n").with_status(410).status(), 410);
    /// ```
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Sets a header, replacing one of the same name, as
    /// `kvdb.header(name, value)`.
    ///
    /// # Example
    ///
    /// ```
    /// let r = kvdb_guest::Response::text("{}").with_header("Content-Type", "application/json");
    /// assert_eq!(r.header("content-type"), Some("application/json"));
    /// assert_eq!(r.headers().len(), 1);
    /// ```
    #[must_use]
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(k, _)| *k != name);
        self.headers.push((name, value.into()));
        self
    }

    /// The status code.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Response::new().status(), 200);
    /// ```
    #[must_use]
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The header called `name` (compared case-insensitively).
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Response::new().header("x-none"), None);
    /// ```
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers, lower-case names, in the order they were set.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Response::new().headers().len(), 1);
    /// ```
    #[must_use]
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Response::text("x").body(), b"x");
    /// ```
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

impl Response {
    /// The response of a handler's result: the `Ok` response as it is, an
    /// error as `From<Error>` makes it.
    /// With it, the handler's work goes in a function answering
    /// `Result<Response, Error>`, where `?` ends it at the first failed
    /// data call, and [`Handler::handle`](crate::Handler::handle) is one
    /// line.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use kvdb_guest::{Error, Handler, Request, Response};
    ///
    /// struct Counter;
    ///
    /// fn count(req: &Request) -> Result<Response, Error> {
    ///     let key = format!("count:{}", req.var("page").unwrap_or("home"));
    ///     let n = kvdb_guest::incr(&key, 1)?; // a denied call: 403 and its text
    ///     Ok(Response::text(format!("{n}\n")))
    /// }
    ///
    /// impl Handler for Counter {
    ///     fn handle(req: Request) -> Response {
    ///         Response::from_result(count(&req))
    ///     }
    /// }
    ///
    /// kvdb_guest::export!(Counter);
    /// ```
    ///
    /// A function answering `Result<Response, Error>` can be tested
    /// natively up to its first data call; the error case is plain Rust:
    ///
    /// ```
    /// use kvdb_guest::{Error, Response};
    ///
    /// let r = Response::from_result(Err(Error::Limit("too big".into())));
    /// assert_eq!(r.status(), 413);
    /// assert_eq!(Response::from_result(Ok(Response::text("ok\n"))).status(), 200);
    /// ```
    #[must_use]
    pub fn from_result(result: Result<Response, Error>) -> Self {
        result.unwrap_or_else(Response::from)
    }
}

impl From<Error> for Response {
    /// A text response for a failed call: the status of
    /// [`Error::status`] (404, 403, 409, 413, 400 or 500), and the error's
    /// `Display` text with a newline as the body, the bytes `kvdb.say(err)`
    /// writes in Lua.
    ///
    /// # Example
    ///
    /// ```
    /// use kvdb_guest::{Error, Response};
    ///
    /// let r = Response::from(Error::PermissionDenied("no write".into()));
    /// assert_eq!(r.status(), 403);
    /// assert_eq!(r.body(), b"permission denied: no write\n");
    /// assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    /// ```
    fn from(e: Error) -> Self {
        Response::text(format!("{e}\n")).with_status(e.status())
    }
}

impl From<Response> for wit::Response {
    fn from(r: Response) -> Self {
        wit::Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }
    }
}

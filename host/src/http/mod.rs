//! The HTTP API (axum): routes, extraction and answers.
//!
//! Handlers parse the request into typed values (`BucketId`, `Key`, `Value`,
//! `Op`, `Condition`), turn the presented credential into a scope with
//! [`Access`], and call [`Scoped`]. They never decide permissions: a handler
//! that forgot a check would still be refused by `Scoped`.
//! Every error leaves through [`ApiError`], so every answer is JSON.

mod admin;
mod buckets;
pub mod error;
mod keys;
mod list;
mod scripts;
pub mod serve;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower_http::cors::CorsLayer;

use crate::auth;
use crate::bucket::{BucketId, Buckets, Condition, Scoped};
pub use admin::{SINCE_HEADER as BACKUP_SINCE_HEADER, VERSION_HEADER as BACKUP_VERSION_HEADER};
pub use error::{ApiError, BodyLimit};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub buckets: Arc<Buckets>,
    pub scripts: Arc<crate::script::Runtimes>,
    /// The operator token for `/_admin/…` (backups); `None` disables them.
    pub admin_token: Option<Arc<str>>,
}

/// Cross-origin access for web pages on other origins (a kvdb.io client
/// in a browser): any origin may call the API with the credentials it holds
/// (a key or token in a header or the query), but never with the browser's
/// own (no `Access-Control-Allow-Credentials`), so a page elsewhere can't
/// ride on the Basic login the script editor leaves in the browser.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        // Whatever headers a page sends (a script reads them), and every
        // header of the answer readable (a script's own, `Retry-After`):
        // found by a review, a page could send a script no header of its
        // own nor read one a script set. Safe without the browser's
        // credentials: any client can send and read these anyway. (`*`
        // would not allow `Authorization`; mirrored, it is.) The API's own
        // headers are also named, for a browser that takes `*` as a name
        // (older ones did).
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
        .expose_headers([
            header::HeaderName::from_static("*"),
            header::ETAG,
            header::LINK,
            header::LOCATION,
            header::RETRY_AFTER,
        ])
        .max_age(std::time::Duration::from_secs(24 * 3600))
}

/// The whole HTTP service: the routes of [`router`], and CORS ([`cors`])
/// around them for requests from browsers, which send `Origin` on every
/// cross-origin request and preflight. Other clients (curl, SDKs, servers)
/// send none and skip it: as a layer on every route it cost 2.4 µs of CPU a
/// GET at 64 connections, 13% of GET's requests per second. Their answers
/// say `Vary: Origin`, so that a cache never hands one to a browser in place
/// of an answer with the CORS headers. `/_admin/` (backups, for `kvdb
/// backup`) gets no CORS.
#[derive(Clone)]
pub struct App {
    router: Router,
    cors: Arc<CorsLayer>,
}

impl App {
    /// The service over `state`.
    pub fn new(state: AppState) -> Self {
        Self {
            router: router(state),
            cors: Arc::new(cors()),
        }
    }

    /// Answers `request`.
    pub async fn answer(self, mut request: axum::extract::Request) -> axum::response::Response {
        use tower::{Layer, ServiceExt};
        // Only a Basic login can be a remembered one (see `ambient_login`).
        let login_ignored = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_basic)
            .then(|| {
                let flag = LoginIgnored::default();
                request.extensions_mut().insert(flag.clone());
                flag
            });
        let from_a_browser = request.headers().contains_key(header::ORIGIN)
            && !request.uri().path().starts_with("/_admin/");
        let answered = if from_a_browser {
            self.cors.layer(self.router).oneshot(request).await
        } else {
            self.router.oneshot(request).await.map(|mut response| {
                response
                    .headers_mut()
                    .append(header::VARY, axum::http::HeaderValue::from_static("origin"));
                response
            })
        };
        let response = match answered {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if login_ignored.is_some_and(|flag| flag.0.load(std::sync::atomic::Ordering::Relaxed))
            && response.status() == axum::http::StatusCode::UNAUTHORIZED
        {
            return login_ignored_answer(response);
        }
        response
    }
}

/// All routes of API.md (without CORS: see [`App`]).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(buckets::get_root).post(buckets::post_bucket))
        .route(
            "/{bucket}",
            get(buckets::get_bucket)
                .head(buckets::head_bucket)
                .patch(buckets::patch_bucket)
                .delete(buckets::delete_bucket),
        )
        .route(
            "/{bucket}/",
            get(list::get_keys).delete(buckets::delete_bucket),
        )
        .route("/{bucket}/tokens/", post(buckets::post_token))
        .route("/{bucket}/scripts/", get(scripts::get_scripts))
        .route(
            scripts::SCRIPT_ROUTE,
            get(scripts::run_script)
                .post(scripts::run_script)
                .put(scripts::put_script)
                .delete(scripts::delete_script),
        )
        .route("/{bucket}/scripts/{script}/edit", get(scripts::get_editor))
        .route(
            "/{bucket}/{key}",
            get(keys::get_key)
                .put(keys::put_key)
                .post(keys::put_key)
                .patch(keys::patch_key)
                .delete(keys::delete_key),
        )
        .fallback(not_found)
        .route("/_admin/backup", get(admin::get_backup))
        // Other paths under `/_admin` are no bucket's (`_admin` is no
        // bucket id): said so rather than "there is no bucket with this id"
        // (found by a review).
        .route("/_admin", any(no_operator_route))
        .route("/_admin/", any(no_operator_route))
        .route("/_admin/{*rest}", any(no_operator_route))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn no_operator_route(uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no operator route {}: the operator routes are GET /_admin/backup (see \"Backups\" in the README)",
        uri.path()
    ))
}

async fn not_found(uri: Uri) -> ApiError {
    // A CONNECT's target has no path: its authority is what was asked for.
    let path = match uri.path() {
        "" => uri.authority().map_or("", |a| a.as_str()),
        path => path,
    };
    // `/BUCKET/a/b` or `/BUCKET/a/`: most likely a key with a `/` in it.
    let under_a_bucket = path.trim_start_matches('/').split('/').nth(2).is_some();
    let hint = if under_a_bucket && !path.starts_with("/_admin/") {
        "a key is one path segment, so write a `/` in a key as `%2F`; "
    } else {
        ""
    };
    ApiError::NotFound(format!(
        "no route for {path}: {hint}see the API routes in the README"
    ))
}

async fn method_not_allowed(
    method: Method,
    uri: Uri,
    matched: Option<axum::extract::MatchedPath>,
) -> axum::response::Response {
    let path = uri.path();
    if path.ends_with("/tokens/") {
        return ApiError::MethodNotAllowed(format!(
            "{method} is not supported on {path}: tokens are issued with POST and the bucket's secret key, and are not kept (they can't be listed or deleted; a new signing_key revokes them all)"
        ))
        .into_response();
    }
    // Browsers send `patch` as written (they upper-case only the methods
    // of the fetch standard's list, which PATCH is not).
    let upper = method.as_str().to_ascii_uppercase();
    let case = if upper != method.as_str() {
        format!(" (methods are case-sensitive: send {upper})")
    } else {
        String::new()
    };
    let script = matched.is_some_and(|m| m.as_str() == scripts::SCRIPT_ROUTE);
    let allowed = if script {
        "a script runs on GET and POST, and PUT and DELETE (with the secret key) upload and delete it"
    } else {
        "the Allow header lists the methods that are"
    };
    let mut refused = ApiError::MethodNotAllowed(format!(
        "{method} is not supported on {path}{case}: {allowed}"
    ))
    .into_response();
    // axum's Allow lists HEAD with every GET route, but HEAD does not run a
    // script (see `scripts::run_script`); set here, axum leaves it alone.
    if script {
        refused.headers_mut().insert(
            header::ALLOW,
            axum::http::HeaderValue::from_static(scripts::SCRIPT_METHODS),
        );
    }
    refused
}

/// Query parameters as pairs, percent-decoded (`+` is a space).
///
/// # Errors
/// A parameter that is not UTF-8 once decoded: refused rather than
/// silently replaced.
pub(crate) fn query_pairs(uri: &Uri) -> Result<Vec<(String, String)>, ApiError> {
    let query = uri.query().unwrap_or("");
    check_escapes(query, "query")?;
    urlencoded_pairs(query, "query parameter")
}

/// The pairs of a form body (`application/x-www-form-urlencoded`).
///
/// # Errors
/// Bytes that are not UTF-8, raw or once percent-decoded.
pub(crate) fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the form body is not valid UTF-8"))?;
    urlencoded_pairs(text, "form field")
}

/// The most query parameters, or fields of a form or a JSON object body
/// (for a script), one request may have: past it, 400 before any is decoded
/// (found by a review: one form of 8 million fields took 880 MB and 9 s of
/// an async worker).
pub(crate) const MAX_FIELDS: usize = 1000;

/// `a=1&b=x+y` pairs, percent-decoded, refusing what is not UTF-8 once
/// decoded (rather than replacing it, which would change a key or a prefix
/// behind the client's back). `what` names the pairs in errors.
fn urlencoded_pairs(text: &str, what: &str) -> Result<Vec<(String, String)>, ApiError> {
    if text
        .split('&')
        .filter(|p| !p.is_empty())
        .nth(MAX_FIELDS)
        .is_some()
    {
        return Err(ApiError::bad_request(format!(
            "more than {MAX_FIELDS} {what}s: no route takes that many"
        )));
    }
    let decode = |s: &str| {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
    };
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(k).map_err(|_| {
                ApiError::bad_request(format!(
                    "the {what} name {k:?} is not valid UTF-8 once percent-decoded"
                ))
            })?;
            let value = decode(v).map_err(|_| {
                ApiError::bad_request(format!(
                    "the value of the {what} {name:?} is not valid UTF-8 once percent-decoded"
                ))
            })?;
            Ok((name, value))
        })
        .collect()
}

/// The value of query parameter `name`.
///
/// # Errors
/// The parameter given twice: refused rather than one of them taken, as
/// for a form's or a JSON body's fields (found by a review: `?ttl=abc&ttl=1`
/// was taken, `?ttl=1&ttl=abc` refused).
pub(crate) fn query_param<'a>(
    pairs: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    let mut given = pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str());
    let value = given.next();
    if given.next().is_some() {
        return Err(ApiError::bad_request(format!(
            "the query parameter {name:?} is given twice: give it once"
        )));
    }
    Ok(value)
}

/// Refuses a path or query (`what`) with a `%` not followed by two hex
/// digits: decoding would keep it literally, so that `/b/a%` and `/b/a%25`
/// would name the same key, and `?prefix=a%` and `?prefix=a%25` the same
/// prefix (the query's found by a review).
///
/// # Errors
/// The first such `%`, quoted, and how to write a literal one.
fn check_escapes(text: &str, what: &str) -> Result<(), ApiError> {
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('%') {
        let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
        if !(hex(i + 1) && hex(i + 2)) {
            let end = (i + 3).min(text.len());
            let shown = text.get(i..end).unwrap_or("%");
            return Err(ApiError::bad_request(format!(
                "the {what} has a `%` that is not followed by two hex digits ({shown:?}): write a literal % as %25"
            )));
        }
    }
    Ok(())
}

/// Sets a response's `Content-Security-Policy` to `policy` and forbids
/// content sniffing: for what a browser may render from this origin.
pub(crate) fn confine(headers: &mut HeaderMap, policy: &'static str) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static(policy),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
}

fn is_basic(authorization: &str) -> bool {
    authorization
        .trim_start()
        .get(..6)
        .is_some_and(|s| s.eq_ignore_ascii_case("basic "))
}

/// The host (and port, unless it is the scheme's default) of an `Origin`
/// or a `Host`, lower-cased, for comparing the two.
fn site_of(authority: &str, default_port: &str) -> String {
    let lower = authority.trim().to_ascii_lowercase();
    match lower.strip_suffix(default_port) {
        Some(host) if !host.ends_with(':') => host.to_owned(),
        _ => lower,
    }
}

/// Whether a request's `Authorization: Basic` may be the login a browser
/// remembers for this server (the script editor asks for a bucket's key)
/// and adds on its own to a request another site started: a form, a link,
/// an image, a `fetch` with the browser's credentials. Such a credential is
/// ignored (the request is anonymous), so that no other site, nor another
/// bucket's sandboxed script page, can act with a bucket's key (cross-site
/// request forgery). Browsers say where a request comes from in
/// `Sec-Fetch-Site` (to HTTPS and localhost), and in `Origin` on the
/// requests that change something. Clients that are not browsers send
/// neither; a page elsewhere sends its key as `Bearer` (as the kvdb.io
/// client does) or `?key=`, which a browser never adds by itself. A link
/// from elsewhere to the editor or the scripts page still opens it (a
/// top-level navigation to exactly those routes): showing a page can't
/// act, and it can't be framed.
fn ambient_login(parts: &Parts) -> bool {
    let text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let cross_site = match text("sec-fetch-site") {
        Some(site) => {
            !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none")
        }
        None => text("origin").is_some_and(|origin| {
            let origin = origin.to_ascii_lowercase();
            let from = if let Some(rest) = origin.strip_prefix("https://") {
                Some(site_of(rest, ":443"))
            } else {
                origin
                    .strip_prefix("http://")
                    .map(|rest| site_of(rest, ":80"))
            };
            let host = text("host").map(|h| (site_of(h, ":80"), site_of(h, ":443")));
            !matches!((from, host), (Some(from), Some((h80, h443))) if from == h80 || from == h443)
        }),
    };
    if !cross_site {
        return false;
    }
    let is = |name: &str, value: &str| text(name).is_some_and(|v| v.eq_ignore_ascii_case(value));
    let page = matches!(parts.method, Method::GET | Method::HEAD)
        && parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .is_some_and(|route| {
                matches!(
                    route.as_str(),
                    "/{bucket}/scripts/{script}/edit" | "/{bucket}/scripts/"
                )
            });
    !(page && is("sec-fetch-mode", "navigate") && is("sec-fetch-dest", "document"))
}

/// The 401 of a request whose Basic login [`Access`] ignored
/// ([`ApiError::LoginIgnored`]: no Basic challenge, and a detail that says
/// why and what to do instead). The response's other headers (CORS,
/// `Vary`) stay.
fn login_ignored_answer(response: axum::response::Response) -> axum::response::Response {
    let (mut parts, _) = response.into_parts();
    let (answer, body) = ApiError::LoginIgnored.into_response().into_parts();
    parts.headers.remove(header::WWW_AUTHENTICATE);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.extend(answer.headers);
    axum::response::Response::from_parts(parts, body)
}

/// Set by [`Access`] when it ignored a remembered login ([`ambient_login`]):
/// a 401 then carries no Basic challenge, which would have the browser
/// drop its login and ask again, in vain, since the next try comes from
/// the same other site.
#[derive(Clone, Default)]
struct LoginIgnored(Arc<std::sync::atomic::AtomicBool>);

/// A bucket opened from the `{bucket}` path segment and bound to the scope of
/// the credential the request presents.
pub struct Access(pub Scoped);

impl FromRequestParts<AppState> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        check_escapes(parts.uri.path(), "path")?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                let bucket = parts.uri.path().split('/').nth(1).unwrap_or("");
                if percent_encoding::percent_decode_str(bucket)
                    .decode_utf8()
                    .is_err()
                {
                    // Not a bucket id, whatever else is wrong.
                    return ApiError::Bucket(crate::bucket::BucketError::NotFound);
                }
                ApiError::bad_request(format!(
                    "a key or script name must be UTF-8 once percent-decoded ({}): percent-encode each character's UTF-8 bytes (é is %C3%A9)",
                    e.body_text()
                ))
            })?;
        let id: BucketId = params
            .iter()
            .find(|(name, _)| *name == "bucket")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or(crate::bucket::BucketError::NotFound)?;
        let bucket = state.buckets.open(id)?;
        // A query that can't be read (a bare `%`, not UTF-8) is a 400
        // here, before the credentials, as a path that can't be: what it
        // says is not known (`?key=sk%` could mean `sk%25`).
        let pairs = query_pairs(&parts.uri)?;
        let authorization = match parts.headers.get(header::AUTHORIZATION) {
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::Auth(auth::AuthError::Malformed("the header is not ASCII"))
            })?),
            None => None,
        };
        let authorization = authorization.filter(|a| {
            let ignored = is_basic(a) && ambient_login(parts);
            if ignored && let Some(flag) = parts.extensions.get::<LoginIgnored>() {
                flag.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            !ignored
        });
        let credentials = auth::presented(
            authorization,
            query_param(&pairs, "access_token")?,
            query_param(&pairs, "key")?,
        )?;
        Ok(Access(bucket.authorized(credentials)?))
    }
}

/// Reads a request body up to `limit` bytes; beyond it, 413 (what is left
/// of the body is read and thrown away after the answer, so that the client
/// reads the 413 instead of a reset connection: see `serve`).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    what: BodyLimit,
) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit, what };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    // Sized for the declared length (at most `limit`, checked above) at
    // once; hyper holds the body to it. Grown by doubling, a 12 MB body
    // left ~16 MB of dropped buffers behind it. Pages of it the body never
    // fills are never touched.
    let mut buf =
        bytes::BytesMut::with_capacity(declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(body_error)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A body read error: the client stalled (408), or sent a malformed body.
fn body_error(e: axum::Error) -> ApiError {
    match e.into_inner().downcast::<serve::BodyStalled>() {
        Ok(stalled) => ApiError::BodyStalled(*stalled),
        Err(e) => ApiError::bad_request(format!("the request body could not be read: {e}")),
    }
}

pub(crate) fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// The essence of the request's `Content-Type` (`type/subtype`,
/// lower-cased, without parameters), if it has one.
pub(crate) fn content_essence(headers: &HeaderMap) -> Option<String> {
    content_type(headers).map(crate::bucket::media_essence)
}

/// Whether the request's `Accept` header names `media_type` itself (not a
/// type that merely starts with it, such as `application/jsonl` for
/// `application/json`), with any parameters.
pub(crate) fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|range| range.split(';').next())
        .any(|essence| essence.trim().eq_ignore_ascii_case(media_type))
}

/// Fields of a form or JSON object body (policy, tokens), as JSON values.
///
/// A body with no `Content-Type`, a form's or `text/plain` (what a
/// browser's `fetch` sends with a string) is read as a form.
///
/// # Errors
/// A JSON body that is not an object, a form that can't be decoded, or a
/// body of another type (415).
pub(crate) fn body_fields(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<BTreeMap<String, serde_json::Value>, ApiError> {
    let declared = headers.get(header::CONTENT_TYPE).map(|v| {
        let text = String::from_utf8_lossy(v.as_bytes());
        (crate::bucket::media_essence(&text), text.into_owned())
    });
    let is_json = match &declared {
        None => false,
        Some((essence, _)) if essence == "application/json" => true,
        Some((essence, _))
            if matches!(
                essence.as_str(),
                "" | "application/x-www-form-urlencoded" | "text/plain"
            ) =>
        {
            false
        }
        Some((_, given)) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the fields were sent as {given:?}: send them as a URL-encoded form (`curl -d 'name=value'`) or as a JSON object with Content-Type: application/json"
            )));
        }
    };
    if is_json {
        return serde_json::from_slice::<UniqueFields>(body)
            .map(|fields| fields.0)
            .map_err(|e| {
                ApiError::bad_request(format!("the body must be a JSON object of fields: {e}"))
            });
    }
    let mut fields = BTreeMap::new();
    for (name, value) in form_pairs(body)? {
        if fields.contains_key(&name) {
            return Err(ApiError::bad_request(repeated_field(&name)));
        }
        fields.insert(name, serde_json::Value::String(value));
    }
    Ok(fields)
}

/// A field given twice is refused rather than the last one taken: a typo
/// would silently set a key other than the one meant (found by a review).
fn repeated_field(name: &str) -> String {
    format!("the field {name:?} is given twice: give each field once")
}

/// A JSON object whose fields are each given once (serde_json keeps the last).
struct UniqueFields(BTreeMap<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for UniqueFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = UniqueFields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueFields, A::Error> {
                let mut fields = BTreeMap::new();
                while let Some((name, value)) = map.next_entry::<String, serde_json::Value>()? {
                    if fields.contains_key(&name) {
                        return Err(serde::de::Error::custom(repeated_field(&name)));
                    }
                    fields.insert(name, value);
                }
                Ok(UniqueFields(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// The write precondition from `If-Match` / `If-None-Match`.
///
/// # Errors
/// An `If-None-Match` other than `*` on a write.
pub(crate) fn condition(headers: &HeaderMap) -> Result<Condition, ApiError> {
    let if_match = etag_list(headers, &header::IF_MATCH)?;
    // Empty, unquoted or a list of ETags: one answer, which names the one
    // thing a write takes there (the list's own advice would offer ETags).
    let only_star = || {
        ApiError::bad_request("on a write, If-None-Match supports only `*` (set only if absent)")
    };
    if let Some(tags) = etag_list(headers, &header::IF_NONE_MATCH).map_err(|_| only_star())? {
        if !tags.iter().all(|t| t == "*") {
            return Err(only_star());
        }
        return Ok(if_match.map_or(Condition::IfAbsent, Condition::IfMatchAndAbsent));
    }
    Ok(if_match.map_or(Condition::Always, Condition::IfMatch))
}

/// The entity tags of `If-Match` or `If-None-Match` (all their header lines),
/// `None` when the header is absent.
///
/// # Errors
/// An empty list, or a tag that is neither `*` nor quoted as ETags are
/// answered (`"1a"`, `W/"1a"`).
pub(crate) fn etag_list(
    headers: &HeaderMap,
    name: &header::HeaderName,
) -> Result<Option<Vec<String>>, ApiError> {
    let mut present = false;
    let mut tags = Vec::new();
    for value in headers.get_all(name) {
        present = true;
        let value = value
            .to_str()
            .map_err(|_| ApiError::bad_request(format!("{name} must be visible ASCII")))?;
        for tag in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let opaque = tag.strip_prefix("W/").unwrap_or(tag);
            let quoted = opaque.len() >= 2 && opaque.starts_with('"') && opaque.ends_with('"');
            if tag != "*" && !quoted {
                return Err(ApiError::bad_request(format!(
                    "{name} takes ETags in quotes, as they are answered (e.g. \"1a\"), or `*`; got {tag:?}"
                )));
            }
            tags.push(tag.to_owned());
        }
    }
    if present && tags.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{name} is empty: send the ETag a GET answered (with its quotes), or `*`"
        )));
    }
    Ok(present.then_some(tags))
}

/// `ttl` from the query: a non-negative integer of seconds.
///
/// # Errors
/// Anything else.
pub(crate) fn ttl_param(pairs: &[(String, String)]) -> Result<Option<u64>, ApiError> {
    query_param(pairs, "ttl")?
        .map(|t| {
            crate::bucket::whole_number(t).ok_or_else(|| {
                // `?ttl=+5` arrives as " 5": a `+` in a query is a space.
                let plus = if t.contains(' ') {
                    " (a `+` in a URL's query is a space)"
                } else {
                    ""
                };
                ApiError::bad_request(format!(
                    "ttl must be a whole number of seconds (digits only; 0: no expiry), not {t:?}{plus}"
                ))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    //! Router tests: no socket, the memory backend, `oneshot` requests.

    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::bucket::Limits;
    use crate::storage::{Durability, Store, memory::MemoryBackend};

    fn app() -> Router {
        let store =
            Store::open(Arc::new(MemoryBackend::new()), Durability::Strict).expect("memory store");
        router(AppState {
            buckets: Buckets::new(
                store,
                Limits {
                    max_value_bytes: 1024,
                },
            ),
            admin_token: None,
            scripts: Arc::new(
                crate::script::Runtimes::new(crate::script::Limits::default(), None)
                    .expect("script runtimes"),
            ),
        })
    }

    async fn send(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
        let response = app
            .clone()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::from(body.to_owned()))
                    .expect("request"),
            )
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn keys_named_like_routes_are_ordinary_keys() {
        let app = app();
        let (status, bucket) = send(&app, "POST", "/", "").await;
        assert_eq!(status, StatusCode::CREATED);
        for key in ["tokens", "scripts", "_admin"] {
            let uri = format!("/{bucket}/{key}");
            assert_eq!(send(&app, "PUT", &uri, key).await.0, StatusCode::NO_CONTENT);
            assert_eq!(
                send(&app, "GET", &uri, "").await,
                (StatusCode::OK, key.to_owned())
            );
        }
        let (status, _) = send(&app, "GET", &format!("/{bucket}/a%2Fb"), "").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "an absent key, not an unknown route"
        );
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_problem_json() {
        let app = app();
        let (status, body) = send(&app, "GET", "/a/b/c", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("\"status\":404"), "{body}");
        let (status, body) = send(&app, "PUT", "/", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(body.contains("\"status\":405"), "{body}");
        let (status, _) = send(&app, "GET", "/_admin/backup", "").await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "backups are off without --admin-token"
        );
        // No bucket's: `_admin` is no bucket id (it was "there is no
        // bucket with this id").
        for (method, path) in [
            ("GET", "/_admin/other"),
            ("GET", "/_admin"),
            ("DELETE", "/_admin/"),
            ("PUT", "/_admin/a/b"),
        ] {
            let (status, body) = send(&app, method, path, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(
                body.contains(&format!(
                    "no operator route {path}: the operator routes are GET /_admin/backup"
                )),
                "{body}"
            );
        }
        let (status, _) = send(&app, "POST", "/_admin/backup", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn an_origin_and_a_host_compare_without_case_or_default_ports() {
        assert_eq!(site_of("Kvdb.Example:443", ":443"), "kvdb.example");
        assert_eq!(site_of("kvdb.example:80", ":80"), "kvdb.example");
        assert_eq!(site_of("kvdb.example:8443", ":443"), "kvdb.example:8443");
        assert_eq!(site_of("[::1]:80", ":80"), "[::1]");
        let parts = |headers: &[(&str, &str)]| {
            let mut request = axum::http::Request::post("/b/k");
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            request.body(()).expect("request").into_parts().0
        };
        for same in [
            [
                ("origin", "https://kvdb.example"),
                ("host", "KVDB.example:443"),
            ],
            [
                ("origin", "http://kvdb.example:80"),
                ("host", "kvdb.example"),
            ],
            [
                ("origin", "http://127.0.0.1:8080"),
                ("host", "127.0.0.1:8080"),
            ],
        ] {
            assert!(!ambient_login(&parts(&same)), "{same:?}");
        }
        for other in [
            [("origin", "https://evil.example"), ("host", "kvdb.example")],
            [("origin", "null"), ("host", "kvdb.example")],
            [
                ("origin", "http://kvdb.example:8080"),
                ("host", "kvdb.example"),
            ],
        ] {
            assert!(ambient_login(&parts(&other)), "{other:?}");
        }
    }
}

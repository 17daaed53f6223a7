//! `/:bucket/scripts/…`: uploading, listing, editing, deleting and running
//! scripts.
//!
//! Managing scripts needs the admin (checked by `Scoped`); running one needs
//! nothing: the run gets the caller's scope, and every data call it makes is
//! checked against that scope (or the one the script sets).

use std::net::SocketAddr;

use axum::Json;
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{RawPathParams, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};

use super::{
    Access, ApiError, AppState, BodyLimit, MAX_FIELDS, content_essence, form_pairs, query_pairs,
    read_body,
};
use crate::bucket::{BucketError, ScriptKind, ScriptName};
use crate::script::Request;
use crate::script::api::Host;

const EDITOR_HTML: &str = include_str!("editor.html");

fn script_name(params: &RawPathParams) -> Result<ScriptName, ApiError> {
    let raw = params
        .iter()
        .find(|(name, _)| *name == "script")
        .map(|(_, v)| v)
        .unwrap_or_default();
    Ok(ScriptName::new(raw)?)
}

fn escape(s: &str) -> String {
    html_escape::encode_safe(s).into_owned()
}

/// `GET /:bucket/scripts/`: JSON, or an HTML page for a browser.
pub async fn get_scripts(Access(bucket): Access, headers: HeaderMap) -> Result<Response, ApiError> {
    let scripts = bucket.list_scripts()?;
    if !super::accepts(&headers, "text/html") {
        let list: Vec<_> = scripts
            .iter()
            .map(crate::bucket::StoredScript::summary)
            .collect();
        return Ok(Json(list).into_response());
    }
    let mut rows = String::new();
    for s in &scripts {
        let name = escape(s.name.as_str());
        rows.push_str(&format!(
            "<tr><td><a href=\"{name}/edit\">{name}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            s.kind.name(),
            s.size,
            s.updated_at
        ));
    }
    Ok(own_page(Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Scripts</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}</style></head>\
         <body><h1>Scripts of bucket {}</h1><table><tr><th>name</th><th>kind</th><th>bytes</th><th>updated (Unix s)</th></tr>\n{rows}</table>\
         <p>New script: open <code>scripts/NAME/edit</code>.</p></body></html>",
        escape(&bucket.bucket().id().to_string())
    ))
    .into_response()))
}

/// `PUT /:bucket/scripts/:script`: upload (or replace) a script.
pub async fn put_script(
    State(state): State<AppState>,
    Access(bucket): Access,
    params: RawPathParams,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let name = script_name(&params)?;
    // Refuse before reading and compiling anything.
    bucket.ensure_admin().map_err(managing)?;
    let limits = state.scripts.limits;
    let declared_wasm = content_essence(&headers).as_deref() == Some("application/wasm");
    let (ceiling, what) = if declared_wasm {
        (limits.component_bytes, BodyLimit::Component)
    } else {
        (
            limits.source_bytes.max(limits.component_bytes),
            BodyLimit::Script {
                lua_source: limits.source_bytes,
                component: limits.component_bytes,
            },
        )
    };
    let source = read_body(&headers, body, ceiling, what).await?;
    let kind = if declared_wasm || source.starts_with(b"\0asm") {
        ScriptKind::Wasm
    } else {
        ScriptKind::Lua
    };
    if kind == ScriptKind::Lua {
        lines_dropped(&headers, &source)?;
    }
    // Read up to the larger limit when the kind was not declared: each
    // kind is held to its own (a component sent without `application/wasm`
    // passed its limit up to the Lua one).
    match kind {
        ScriptKind::Lua if source.len() > limits.source_bytes => {
            return Err(ApiError::PayloadTooLarge {
                limit: limits.source_bytes,
                what: BodyLimit::LuaSource,
            });
        }
        ScriptKind::Wasm if source.len() > limits.component_bytes => {
            return Err(ApiError::PayloadTooLarge {
                limit: limits.component_bytes,
                what: BodyLimit::Component,
            });
        }
        _ => {}
    }
    // Compile once, at upload, off the async threads.
    let runtimes = state.scripts.clone();
    let checked = source.clone();
    let shown = name.to_string();
    tokio::task::spawn_blocking(move || match kind {
        ScriptKind::Lua => runtimes
            .lua
            .validate(&shown, &checked)
            .map_err(|e| not_lua(e, &checked)),
        ScriptKind::Wasm => runtimes
            .wasm
            .compile_cached(&checked)
            .map(drop)
            .map_err(|e| not_a_component(e, &checked)),
    })
    .await
    .map_err(|e| ApiError::Internal(format!("validation task: {e}")))??;
    // The body may have trickled in, and compiling takes a while: judged
    // again if the policy changed meanwhile (the secret key rotated).
    let bucket = bucket.reauthorized()?;
    let stored = bucket.put_script(&name, kind, source.to_vec()).await?;
    Ok(Json(stored.summary()).into_response())
}

/// How to send a component unaltered, for the errors below.
const SEND_A_COMPONENT: &str = "send it unaltered, with Content-Type: application/wasm \
     (`curl -T file.wasm -H 'Content-Type: application/wasm' …`; `-d @file` alters a binary, \
     dropping its NUL, CR and LF bytes, or before curl 8.7 cutting it at each NUL: use \
     `--data-binary @file` or `-T file`)";

/// A component's first bytes (`\0asm\r\0\x01\0`) once `curl -d @file`
/// dropped its NUL, CR and LF bytes (curl 8.7 and later; earlier ones cut
/// each line at its first NUL instead, which leaves no UTF-8).
const MANGLED_COMPONENT: &[u8] = b"asm\x01";

/// What to do about a body sent with `Content-Type: application/wasm` that
/// is no WebAssembly because `curl -d @file` dropped bytes of it (wasmtime's
/// message says only that it is not WebAssembly).
fn not_a_component(e: crate::script::ScriptError, body: &[u8]) -> crate::script::ScriptError {
    use crate::script::ScriptError;
    match e {
        ScriptError::Invalid(message) if body.starts_with(MANGLED_COMPONENT) => {
            ScriptError::Invalid(format!(
                "{message}. It looks like a WebAssembly component whose NUL, CR and LF bytes \
                 were dropped on the way, as `curl -d @file` does: {SEND_A_COMPONENT}."
            ))
        }
        // Declared a component, yet no WebAssembly at all: curl before 8.7
        // cuts a `-d @file` at each NUL instead, which leaves no `asm`
        // (found by a Python guest's author with curl 7.88).
        ScriptError::Invalid(message) if !body.starts_with(b"\0asm") => ScriptError::Invalid(
            format!("{message}. If it is a component file: {SEND_A_COMPONENT}."),
        ),
        other => other,
    }
}

/// Refuses a Lua upload that came as `curl -d @file` sends a file: with the
/// form type and its line breaks dropped. Lua needs no line breaks between
/// statements, but a `--` comment then runs to the end of the script, which
/// would upload without an error and do nothing (found by a reviewer
/// following the README with `-d`; the visitors example's first line ends
/// in a comment). A one-line script sent with `curl -d 'CODE'` and no
/// comment still uploads.
fn lines_dropped(headers: &HeaderMap, source: &[u8]) -> Result<(), ApiError> {
    let form = content_essence(headers).as_deref() == Some("application/x-www-form-urlencoded");
    // A component or other bytes that are no text get `not_lua`'s advice.
    let text = !source.starts_with(MANGLED_COMPONENT) && std::str::from_utf8(source).is_ok();
    // A first line starting with `#` (`#!/usr/bin/env lua`) is skipped as
    // the `lua` command does: without line breaks, that is all of it.
    let shebang = source
        .strip_prefix("\u{feff}".as_bytes())
        .unwrap_or(source)
        .starts_with(b"#");
    if form
        && text
        && !source.contains(&b'\n')
        && !source.contains(&b'\r')
        && (shebang || has_line_comment(source))
    {
        return Err(crate::script::ScriptError::Invalid(
            "this script came with the form type (`curl -d`) and without line breaks, and has a \
             `--` comment or a first line starting with `#`, which would run to the end of the \
             script: `curl -d @file` drops a \
             file's line breaks. Upload the file unaltered: `curl -T file.lua …` or \
             `--data-binary @file.lua` (so too a one-line script that ends in a comment)"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// Whether Lua `source` has a line comment (`--` not opening a long
/// comment `--[[ ]]`), outside its strings and long brackets: `--` in
/// `"----"` or `"<!-- -->"` is none (found by a review).
fn has_line_comment(source: &[u8]) -> bool {
    // `[`, `=`…, `[` opens a long bracket of that level: its length.
    let long_open = |at: usize| {
        let rest = source.get(at..)?;
        let level = rest.iter().skip(1).take_while(|&&b| b == b'=').count();
        (rest.first() == Some(&b'[') && rest.get(level + 1) == Some(&b'[')).then_some(level)
    };
    // Past the `]=…]` closing a long bracket of `level` from `at`.
    let long_end = |at: usize, level: usize| {
        let mut close = vec![b']'];
        close.extend(std::iter::repeat_n(b'=', level));
        close.push(b']');
        source
            .get(at..)
            .and_then(|rest| {
                rest.windows(close.len())
                    .position(|w| w == close.as_slice())
            })
            .map_or(source.len(), |i| at + i + close.len())
    };
    let mut i = 0;
    while i < source.len() {
        match source[i] {
            b'-' if source.get(i + 1) == Some(&b'-') => match long_open(i + 2) {
                Some(level) => i = long_end(i + 2 + level + 2, level),
                None => return true,
            },
            quote @ (b'"' | b'\'') => {
                i += 1;
                while i < source.len() && source[i] != quote {
                    // An escape takes the next byte with it.
                    i += if source[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'[' => match long_open(i) {
                Some(level) => i = long_end(i + level + 2, level),
                None => i += 1,
            },
            _ => i += 1,
        }
    }
    false
}

/// A Lua upload that does not compile, with what to do when the body is no
/// Lua at all: Lua's own message about it (`x:1: unexpected symbol near
/// '<\224>'`) says neither (found by a reviewer writing guests). The kind is
/// still decided by `Content-Type` and the `\0asm` magic only, never guessed
/// from the rest of the body.
fn not_lua(e: crate::script::ScriptError, body: &[u8]) -> crate::script::ScriptError {
    use crate::script::ScriptError;
    let ScriptError::Invalid(message) = e else {
        return e;
    };
    let hint = if body.starts_with(MANGLED_COMPONENT) {
        format!(
            "This looks like a WebAssembly component whose NUL, CR and LF bytes were dropped \
             on the way, as `curl -d @file` does: {SEND_A_COMPONENT}."
        )
    } else if std::str::from_utf8(body).is_err() {
        format!(
            "A Lua script is UTF-8 text, and this is not. To upload a WebAssembly component, \
             {SEND_A_COMPONENT}."
        )
    } else {
        return ScriptError::Invalid(message);
    };
    ScriptError::Invalid(format!("{message}. {hint}"))
}

/// `DELETE /:bucket/scripts/:script`.
pub async fn delete_script(
    Access(bucket): Access,
    params: RawPathParams,
) -> Result<StatusCode, ApiError> {
    bucket
        .delete_script(&script_name(&params)?)
        .await
        .map_err(managing)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A refused PUT or DELETE of a script's URL says what it would have done,
/// so that a client that meant to run the script with it (a REST-style
/// script's DELETE) learns that scripts run on GET and POST (found by a
/// review).
fn managing(e: BucketError) -> BucketError {
    const HINT: &str = " (PUT and DELETE on a script's URL upload and delete the script itself; a script runs on GET and POST)";
    match e {
        BucketError::Unauthorized(m) => BucketError::Unauthorized(m + HINT),
        BucketError::Forbidden(m) => BucketError::Forbidden(m + HINT),
        other => other,
    }
}

/// `GET /:bucket/scripts/:script/edit`: the editor page, with the current
/// source in the page (empty for a new script).
pub async fn get_editor(
    Access(bucket): Access,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    let name = script_name(&params)?;
    let script = bucket.script(&name)?;
    let (intro, source, locked) = match &script {
        // A component is a binary build: shown as what it is, never as
        // text to edit (Save would upload it as Lua).
        Some(script) if script.kind == ScriptKind::Wasm => (
            format!(
                "A WebAssembly component ({} bytes): it can't be edited here. Upload a new build \
                 with <code>curl -u SECRET: -T {}.wasm -H 'Content-Type: application/wasm' \
                 …/scripts/{}</code>. Run calls it as the page's user.",
                script.size,
                escape(name.as_str()),
                escape(name.as_str())
            ),
            String::new(),
            " disabled",
        ),
        _ => (
            "Lua 5.4 with the <code>kvdb</code> API. Save uploads the script; Run calls it as \
             the page's user."
                .to_owned(),
            match &script {
                Some(script) => escape(&String::from_utf8_lossy(
                    &bucket.bucket().script_source(script)?,
                )),
                None => String::new(),
            },
            "",
        ),
    };
    let page = EDITOR_HTML
        .replace("{{BUCKET}}", &escape(&bucket.bucket().id().to_string()))
        .replace("{{NAME}}", &escape(name.as_str()))
        .replace("{{INTRO}}", &intro)
        .replace("{{LOCKED}}", locked)
        .replace("{{SOURCE}}", &source);
    Ok(own_page(Html(page).into_response()))
}

/// The server's own HTML pages (the editor, the scripts page), which the
/// browser may show with a bucket's key as its login: never framed by
/// another page (a framed Save or Run could be clicked unseen), never
/// cached, never sniffed.
fn own_page(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    super::confine(headers, "frame-ancestors 'none'");
    response
}

/// A script's source that could not be loaded for a run: replaced or
/// deleted since its record was read (a race a retry settles: 503 with
/// `Retry-After`), or a storage failure (500).
fn script_load_error(e: BucketError) -> crate::script::ScriptError {
    use crate::script::ScriptError;
    match e {
        BucketError::ScriptNotFound(_) => ScriptError::Busy(
            "the script was replaced or deleted as this run started: try again".into(),
        ),
        other => ScriptError::Internal(format!("loading a script's source: {other}")),
    }
}

/// The fields of a JSON object body, values that are not strings as their
/// JSON text as sent; at most [`MAX_FIELDS`] of them (an error past it, found
/// before the rest is parsed). A field's value is checked and sliced out of
/// the body, never built as a document: a `serde_json::Value` takes up to 16
/// times its text, so one anonymous 15 MB body grew the server by 400 MB
/// before any script limit applied (found by a review).
struct JsonFields(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for JsonFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = JsonFields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an object of at most {MAX_FIELDS} fields")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JsonFields, A::Error> {
                let mut fields = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if fields.len() == MAX_FIELDS {
                        return Err(serde::de::Error::custom("too many fields"));
                    }
                    let raw = map.next_value::<&serde_json::value::RawValue>()?;
                    let text = if raw.get().starts_with('"') {
                        serde_json::from_str::<String>(raw.get())
                            .map_err(serde::de::Error::custom)?
                    } else {
                        raw.get().to_owned()
                    };
                    fields.push((k, text));
                }
                Ok(JsonFields(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

fn too_many_fields() -> ApiError {
    ApiError::bad_request(format!(
        "more than {MAX_FIELDS} query parameters and body fields together: a script takes at most that many"
    ))
}

/// Query parameters and form (or JSON object) body fields, the body winning.
fn request_fields(
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<(String, String)>, ApiError> {
    let mut vars = query_pairs(uri)?;
    // `?key=` and `?access_token=` are the caller's credential, which is not
    // the script's business (like the `Authorization` header).
    vars.retain(|(k, _)| k != "key" && k != "access_token");
    match content_essence(headers).as_deref() {
        Some("application/json") => {
            // An object of more than MAX_FIELDS fields is not read as
            // fields (reading stops there), as an untyped body: the script
            // still reads it whole.
            if let Ok(JsonFields(fields)) = serde_json::from_slice(body) {
                vars.extend(fields);
            }
        }
        Some("application/x-www-form-urlencoded") => vars.extend(form_pairs(body)?),
        // A body without a type may be anything (the script reads it whole):
        // its fields are taken as a form where they decode, unless there
        // are more than a form may have (then it is no form).
        None if !body.is_empty() => {
            let fields = form_urlencoded::parse(body);
            if fields.clone().nth(MAX_FIELDS).is_none() {
                vars.extend(fields.map(|(k, v)| (k.into_owned(), v.into_owned())));
            }
        }
        _ => {}
    }
    if vars.len() > MAX_FIELDS {
        return Err(too_many_fields());
    }
    Ok(vars)
}

/// The route of one script.
pub(crate) const SCRIPT_ROUTE: &str = "/{bucket}/scripts/{script}";

/// What [`SCRIPT_ROUTE`] answers, for `Allow` (not HEAD: see
/// [`run_script`]), in axum's form.
pub(crate) const SCRIPT_METHODS: &str = "GET,POST,PUT,DELETE";

/// `GET`/`POST /:bucket/scripts/:script`: run the script in the caller's scope.
pub async fn run_script(
    State(state): State<AppState>,
    Access(bucket): Access,
    params: RawPathParams,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let name = script_name(&params)?;
    let (parts, body) = request.into_parts();
    if parts.method == axum::http::Method::HEAD {
        // A link checker's HEAD would run the script, writes and all, for
        // an answer without a body (found by a review).
        let mut refused = ApiError::MethodNotAllowed(format!(
            "HEAD does not run a script (its writes would happen for an answer without a body): run {} with GET or POST",
            parts.uri.path()
        ))
        .into_response();
        refused
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(SCRIPT_METHODS));
        return Ok(refused);
    }
    let remote = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    // Looked up before the body is read: a run of a script that does not
    // exist is answered without taking up to the value limit first.
    let script = bucket
        .bucket()
        .load_script(&name)?
        .ok_or_else(|| BucketError::ScriptNotFound(name.to_string()))?;
    let limit = state.buckets.limits().max_value_bytes;
    let body = read_body(&parts.headers, body, limit, BodyLimit::Value).await?;
    // Judged again if the policy changed while the body came in.
    let bucket = bucket.reauthorized()?;
    let fields = request_fields(&parts.uri, &parts.headers, &body)?;
    let run_request = Request {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        fields,
        remote_addr: remote,
        // The caller's credential is not the script's business.
        headers: parts
            .headers
            .iter()
            .filter(|(k, _)| *k != header::AUTHORIZATION)
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let runtimes = state.scripts.clone();
    let owner = bucket.bucket().clone();
    let host = Host::new(bucket, tokio::runtime::Handle::current());
    // Read only when the runtime has not compiled this version yet.
    let source = || owner.script_source(&script).map_err(script_load_error);
    let ran = match script.kind {
        ScriptKind::Lua => runtimes.lua.run(&script, &source, host, run_request).await,
        ScriptKind::Wasm => runtimes.wasm.run(&script, &source, host, run_request).await,
    };
    let response = ran.inspect_err(|e| log_failed_run(&script, e))?;
    let status = StatusCode::from_u16(response.status)
        .map_err(|e| ApiError::Internal(format!("script status: {e}")))?;
    // These answers have no content (RFC 9110): what the script said is
    // not sent, nor a Content-Length for it (it was; found by a review).
    let no_content = matches!(response.status, 204 | 205 | 304);
    let body = if no_content {
        Vec::new()
    } else {
        response.body
    };
    let mut out = (status, body).into_response();
    for (k, v) in response.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            out.headers_mut().insert(k, v);
        }
    }
    if no_content {
        // Nor a type for it: axum's for a body of bytes, or the one every
        // constructor of the Rust SDK's `Response` sets (a guest's 204 went
        // out as text/plain, its Lua twin's without; found by a guest
        // author).
        out.headers_mut().remove(header::CONTENT_TYPE);
    }
    // Appended after the script's own headers, so that a policy the script
    // sets adds to this one and can't lift it.
    out.headers_mut().append(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(SCRIPT_SANDBOX),
    );
    out.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(out)
}

/// A run that failed or passed a limit, in the log with its bucket and
/// script: its caller got the error, which the admin would otherwise never
/// see. The detail (which may quote the script's own text) is escaped and
/// bounded as the script's own log lines are.
fn log_failed_run(script: &crate::bucket::StoredScript, e: &crate::script::ScriptError) {
    use crate::script::ScriptError;
    /// The most characters of a detail logged (a script's error may be
    /// as long as its memory allows).
    const SHOWN: usize = 1024;
    if !matches!(e, ScriptError::Failed(_) | ScriptError::Limit { .. }) {
        return;
    }
    let detail = e.to_string();
    let cut = detail
        .char_indices()
        .nth(SHOWN)
        .map_or(detail.len(), |(i, _)| i);
    let more = if cut < detail.len() { " (cut)" } else { "" };
    if let Some(line) = crate::script::LogBudget::default().line(&detail[..cut]) {
        tracing::info!(script = %crate::script::Label::of(script), "run failed: {line}{more}");
    }
}

/// The sandbox every script response is served in. Anyone can create a
/// bucket and upload scripts to it, so a script's page is not to be trusted
/// by the rest of this origin, where the browser may keep another bucket's
/// secret key as the script editor's Basic login and would hand it to
/// same-origin requests. Without `allow-same-origin` the page gets a unique
/// origin: its scripts, forms, pop-ups and dialogs work, and its requests
/// to this server are cross-origin (CORS, without the browser's
/// credentials).
const SCRIPT_SANDBOX: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::*;

    #[test]
    fn a_line_comment_is_found_outside_strings_and_long_brackets() {
        for (source, comment) in [
            ("kvdb.say(1) -- c", true),
            ("a = \"x\" -- c", true),
            ("x = 1 --[ not long", true),
            ("s = [=[ ]] -- ]=] -- c", true),
            ("--[[ a ]] kvdb.say(1) -- c", true),
            ("kvdb.say(\"----\")", false),
            ("kvdb.say(\"<!-- x -->\")", false),
            ("--[[ note ]] kvdb.say(1)", false),
            ("--[==[ a ]] b ]==] x", false),
            ("kvdb.say([[--]])", false),
            ("kvdb.say('it\\'s -- no')", false),
            ("kvdb.say(\"a\\\\\") x = '--'", false),
            ("a = b - -c", false),
            ("unclosed = \"-- x", false),
        ] {
            assert_eq!(has_line_comment(source.as_bytes()), comment, "{source}");
        }
    }

    /// A source replaced or deleted as a run starts is a race a retry
    /// settles (503 with Retry-After), not the script's failure (500).
    #[test]
    fn a_source_gone_as_a_run_starts_is_answered_try_again() {
        let gone = ApiError::from(script_load_error(BucketError::ScriptNotFound("s".into())));
        let response = gone.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        let failed = ApiError::from(script_load_error(BucketError::Storage(
            crate::storage::StorageError::Closed,
        )));
        assert_eq!(
            failed.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}

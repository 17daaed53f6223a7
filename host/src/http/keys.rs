//! `/:bucket/:key`: get, set, atomic operations, delete.

use axum::body::Body;
use axum::extract::{RawPathParams, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::{
    Access, ApiError, AppState, BodyLimit, condition, content_essence, etag_list, query_pairs,
    query_param, read_body, ttl_param,
};
use crate::bucket::{BucketError, Key, Number, Op, OperandError, Scoped, Typing, Value};

/// The `{key}` path segment, percent-decoded and validated.
fn key_param(params: &RawPathParams) -> Result<Key, ApiError> {
    let raw = params
        .iter()
        .find(|(name, _)| *name == "key")
        .map(|(_, v)| v)
        .unwrap_or_default();
    Ok(Key::new(raw)?)
}

fn with_etag(mut response: Response, stored_etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(stored_etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

/// A stored value as a response. Whoever may write a key chooses its bytes
/// and content type, so a value opened in a browser must not run as a page
/// of this server's origin (where the script editor's login and other
/// buckets live): it is served sandboxed (a unique origin, no scripts) and
/// never content-sniffed. `fetch` and other API clients are unaffected.
fn value_response(value: &Value, etag: &str, content_type: &str) -> Response {
    let mut response = value.body().into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    super::confine(headers, "sandbox");
    with_etag(response, etag)
}

/// `GET` (and `HEAD`) `/:bucket/:key`.
pub async fn get_key(
    Access(bucket): Access,
    params: RawPathParams,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_param(&params)?;
    let stored = bucket
        .get(&key)?
        .ok_or_else(|| BucketError::KeyNotFound(key.to_string()))?;
    let etag = bucket.etag(stored.version);
    // If-Match first (RFC 9110 13.2.2); malformed, a 400 as on a write (found
    // by a review: a failed one was ignored and the value answered).
    if let Some(tags) = etag_list(&headers, &header::IF_MATCH)? {
        bucket.check_if_match(&tags, &stored)?;
    }
    // A malformed If-None-Match on a read is ignored (RFC 9110): the value
    // is answered in full.
    let unchanged = etag_list(&headers, &header::IF_NONE_MATCH)
        .ok()
        .flatten()
        .is_some_and(|tags| {
            tags.iter()
                .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
        });
    if unchanged {
        return Ok(with_etag(StatusCode::NOT_MODIFIED.into_response(), &etag));
    }
    Ok(value_response(
        &stored.value,
        &etag,
        stored.value.content_type(),
    ))
}

/// What every key write takes from its request, parsed (and the body read,
/// up to the value limit) before anything is changed, and the bucket it is
/// made in, judged again once the body is read ([`Scoped::reauthorized`]:
/// the body may have trickled in for long, while a token was revoked or a
/// key rotated).
struct Write {
    bucket: Scoped,
    key: Key,
    pairs: Vec<(String, String)>,
    ttl: Option<u64>,
    condition: crate::bucket::Condition,
    body: bytes::Bytes,
}

impl Write {
    async fn parse(
        state: &AppState,
        bucket: Scoped,
        params: &RawPathParams,
        uri: &Uri,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Self, ApiError> {
        let key = key_param(params)?;
        // 401/403 before any complaint about the request, and before its
        // body is read.
        bucket.ensure_writable(&key)?;
        let pairs = query_pairs(uri)?;
        let ttl = ttl_param(&pairs)?;
        let condition = condition(headers)?;
        let limit = state.buckets.limits().max_value_bytes;
        let body = read_body(headers, body, limit, BodyLimit::Value).await?;
        Ok(Self {
            bucket: bucket.reauthorized()?,
            key,
            pairs,
            ttl,
            condition,
            body,
        })
    }
}

/// `PUT` / `POST` `/:bucket/:key`: set the value as sent, typed by its
/// `Content-Type` (API.md "Values and types").
pub async fn put_key(
    State(state): State<AppState>,
    Access(bucket): Access,
    params: RawPathParams,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // `PUT /BUCKET/scripts`, the script's name forgotten, stored the
    // component as the key `scripts` with a 204, as if it were uploaded
    // (found by a review): refused, before a declared component's body is
    // read (one over the value limit was answered as too large).
    let component_as_scripts = |key: &Key, body: &[u8]| {
        key.as_str() == "scripts"
            && (content_essence(&headers).as_deref() == Some("application/wasm")
                || body.starts_with(b"\0asm"))
    };
    let named = key_param(&params)?;
    if component_as_scripts(&named, &[]) {
        // A 401/403 first, as for any write.
        bucket.ensure_writable(&named)?;
        return Err(component_as_scripts_key());
    }
    let Write {
        bucket,
        key,
        ttl,
        condition,
        body,
        ..
    } = Write::parse(&state, bucket, &params, &uri, &headers, body).await?;
    if component_as_scripts(&key, &body) {
        return Err(component_as_scripts_key());
    }
    let typing = typing(&headers)?;
    let value =
        Value::from_body(&body, &typing).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Not held while the write waits: a large value would be held twice.
    drop(body);
    let version = bucket.set(&key, value, ttl, condition).await?;
    Ok(with_etag(
        StatusCode::NO_CONTENT.into_response(),
        &bucket.etag(version),
    ))
}

/// See [`put_key`].
fn component_as_scripts_key() -> ApiError {
    ApiError::bad_request(
        "this would store a WebAssembly component as the key `scripts`: a script is uploaded with PUT to /BUCKET/scripts/NAME (`curl -T FILE URL/scripts/` names it after the file)",
    )
}

/// How a write's body is typed, from its `Content-Type`.
///
/// # Errors
/// A `Content-Type` that is not visible ASCII (which was taken as none),
/// or one to keep with the value that is not a media type.
fn typing(headers: &HeaderMap) -> Result<Typing, ApiError> {
    let declared = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::bad_request(
                "the Content-Type has bytes that are not visible ASCII: send a media type such as application/octet-stream",
            )
        })?),
    };
    Typing::from_content_type(declared).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn parse_op(headers: &HeaderMap, op: Option<&str>, body: &[u8]) -> Result<Op, ApiError> {
    let number = || {
        Number::parse_operand(std::str::from_utf8(body).unwrap_or("")).map_err(|e| match e {
            OperandError::NotANumber => ApiError::bad_request("the body must be a number"),
            e @ OperandError::OutOfRange(_) => ApiError::bad_request(e.to_string()),
        })
    };
    match op {
        Some("append") => {
            // A value the append creates keeps the request's raw media
            // type, as a PUT of these bytes would (JSON and untyped bodies
            // make plain text: appending makes raw bytes).
            let typing = typing(headers)?;
            let media_type = match typing {
                Typing::Raw(media_type) => Some(media_type),
                Typing::Coerce | Typing::Json => None,
            };
            return Ok(Op::Append {
                bytes: body.to_vec(),
                media_type,
            });
        }
        Some("max") => return Ok(Op::Max(number()?)),
        Some("min") => return Ok(Op::Min(number()?)),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown op {other:?}: use append, max or min"
            )));
        }
        None => {}
    }
    match content_essence(headers).as_deref() {
        Some("application/merge-patch+json") => serde_json::from_slice(body)
            .map(Op::MergePatch)
            .map_err(|e| ApiError::bad_request(format!("the merge patch is not JSON: {e}"))),
        Some("application/json-patch+json") => serde_json::from_slice(body)
            .map(Op::JsonPatch)
            .map_err(|e| ApiError::bad_request(format!("the body is not a JSON patch: {e}"))),
        _ => {
            let text = std::str::from_utf8(body).unwrap_or("").trim();
            match (text.chars().next(), Number::parse_operand(text)) {
                (Some('+' | '-'), Ok(n)) => Ok(Op::Add(n)),
                // The kvdb.io client sends `incr(key, 0)` as a bare `0`.
                (_, Ok(Number::Int(0))) => Ok(Op::Add(Number::Int(0))),
                (Some(sign @ ('+' | '-')), Err(e @ OperandError::OutOfRange(_))) => Err(
                    ApiError::bad_request(format!("{e}; as a step, signed: {sign}1e20")),
                ),
                (_, Ok(_) | Err(OperandError::OutOfRange(_))) => Err(ApiError::bad_request(
                    "to add a number, sign it (+5 or -5; a bare 0 adds nothing); to set the value, use PUT",
                )),
                (_, Err(OperandError::NotANumber)) => Err(ApiError::bad_request(
                    "PATCH needs a body of +N or -N to add, ?op=append|max|min, or a Content-Type of application/merge-patch+json or application/json-patch+json",
                )),
            }
        }
    }
}

/// `PATCH /:bucket/:key`: an atomic operation; answers the new value.
pub async fn patch_key(
    State(state): State<AppState>,
    Access(bucket): Access,
    params: RawPathParams,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Write {
        bucket,
        key,
        pairs,
        ttl,
        condition,
        body,
    } = Write::parse(&state, bucket, &params, &uri, &headers, body).await?;
    let op = parse_op(&headers, query_param(&pairs, "op")?, &body)?;
    let is_add = matches!(op, Op::Add(_));
    let patched = bucket.patch(&key, op, ttl, condition).await?;
    let etag = bucket.etag(patched.version);
    let Some(value) = patched.value else {
        // Write permission without read: the operation is done, and its
        // result is not this caller's to see.
        return Ok(with_etag(StatusCode::NO_CONTENT.into_response(), &etag));
    };
    let ct = if is_add {
        "text/plain; charset=utf-8"
    } else {
        value.content_type()
    };
    Ok(value_response(&value, &etag, ct))
}

/// `DELETE /:bucket/:key`.
pub async fn delete_key(
    Access(bucket): Access,
    params: RawPathParams,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_param(&params)?;
    // 401/403 before any complaint about the request's headers, as for
    // writes.
    bucket.ensure_deletable(&key)?;
    bucket.delete(&key, condition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

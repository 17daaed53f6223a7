//! `GET /:bucket/`: listing keys (and values) in text, json or jsonl.

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::{Access, ApiError, query_pairs, query_param};
use crate::bucket::{ListQuery, Listing, Value, check_key_text};

/// The most keys one page holds (also the default, as kvdb.io): a page of
/// 1 KiB keys stays around 10 MiB.
const MAX_LIMIT: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
    Jsonl,
}

fn flag(pairs: &[(String, String)], name: &str) -> Result<bool, ApiError> {
    let Some(value) = query_param(pairs, name)? else {
        return Ok(false);
    };
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "{name} must be true or false (or 1/0, yes/no), not {value:?}"
        ))),
    }
}

/// A count (`limit`, `skip`); digits past what 64 bits hold count as the
/// most there is (a larger `limit` lists a full page, as any over 10000).
fn number(pairs: &[(String, String)], name: &str, default: usize) -> Result<usize, ApiError> {
    query_param(pairs, name)?.map_or(Ok(default), |v| {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::bad_request(format!(
                "{name} must be a whole number (digits only), not {v:?}"
            )));
        }
        Ok(v.parse().unwrap_or(usize::MAX))
    })
}

fn text_param(pairs: &[(String, String)], name: &str) -> Result<Option<String>, ApiError> {
    query_param(pairs, name)?
        .map(|v| {
            check_key_text(v)
                .map(|()| v.to_owned())
                .map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
        })
        .transpose()
}

fn parse(pairs: &[(String, String)], headers: &HeaderMap) -> Result<(ListQuery, Format), ApiError> {
    let format = match query_param(pairs, "format")? {
        Some("text") => Format::Text,
        Some("json") => Format::Json,
        Some("jsonl") => Format::Jsonl,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format must be text, json or jsonl, not {other:?}"
            )));
        }
        None => {
            if super::accepts(headers, "application/json") {
                Format::Json
            } else {
                Format::Text
            }
        }
    };
    let query = ListQuery {
        prefix: text_param(pairs, "prefix")?.unwrap_or_default(),
        // Empty is no bound, as an empty prefix is no prefix (a client's
        // empty placeholder listed nothing; found by a review).
        start: text_param(pairs, "start")?.filter(|s| !s.is_empty()),
        end: text_param(pairs, "end")?.filter(|s| !s.is_empty()),
        reverse: flag(pairs, "reverse")?,
        limit: number(pairs, "limit", MAX_LIMIT)?.min(MAX_LIMIT),
        skip: number(pairs, "skip", 0)?,
        values: flag(pairs, "values")?,
        value_bytes: None,
    };
    Ok((query, format))
}

/// A listed value in JSON output.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Listed {
    /// A JSON value's stored text, whitespace between tokens taken out (or
    /// a number's).
    Json(Box<serde_json::value::RawValue>),
    Typed(serde_json::Value),
}

/// One entry of a JSON listing: `"key"`, `["key", value]` or
/// `["key", "<base64>", "base64"]`.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Item<'a> {
    Key(&'a str),
    Value(&'a str, Listed),
    Base64(&'a str, String, &'static str),
}

fn json_item<'a>(key: &'a str, value: Option<&Value>) -> Item<'a> {
    let Some(value) = value else {
        return Item::Key(key);
    };
    // A document, or a number whose text is a JSON number (`1e3`,
    // `12345678901234567890123`; not `+5` or `007`), as stored.
    let text = match value {
        Value::Json(text) => Some(compact_json(text)),
        Value::Number { text, .. } => Some(text.trim().to_owned()),
        _ => None,
    };
    if let Some(Ok(raw)) = text.map(serde_json::value::RawValue::from_string) {
        return Item::Value(key, Listed::Json(raw));
    }
    match value.to_json() {
        Some(v) => Item::Value(key, Listed::Typed(v)),
        None => Item::Base64(
            key,
            base64::engine::general_purpose::STANDARD.encode(value.body()),
            "base64",
        ),
    }
}

/// JSON text without the whitespace between its tokens, as it is
/// otherwise: a listing embeds a stored document so, rather than read into
/// a `serde_json::Value`, which would round integers past 64 bits and
/// decimals longer than a double holds, and take several times the text in
/// memory (found by a review). Not valid UTF-8: the caller's check fails.
fn compact_json(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

fn render(listing: &Listing, format: Format) -> (Vec<u8>, &'static str) {
    let mut out = Vec::new();
    match format {
        Format::Text => {
            for (key, value) in &listing.entries {
                out.extend_from_slice(key.as_bytes());
                if let Some(v) = value {
                    out.push(b'=');
                    let body = v.body();
                    let text = String::from_utf8_lossy(&body);
                    out.extend_from_slice(text.replace('\n', "\\n").as_bytes());
                }
                out.push(b'\n');
            }
            (out, "text/plain; charset=utf-8")
        }
        Format::Json => {
            let items: Vec<_> = listing
                .entries
                .iter()
                .map(|(k, v)| json_item(k, v.as_ref()))
                .collect();
            // Serializing strings, JSON text and `serde_json` values into
            // memory can't fail.
            let _ = serde_json::to_writer(&mut out, &items);
            (out, "application/json")
        }
        Format::Jsonl => {
            for (k, v) in &listing.entries {
                let _ = serde_json::to_writer(&mut out, &json_item(k, v.as_ref()));
                out.push(b'\n');
            }
            (out, "application/jsonl")
        }
    }
}

/// The URL of the next page: the same query with `start` moved on and `skip`
/// dropped.
fn next_link(uri: &Uri, pairs: &[(String, String)], next_start: &str) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if k != "start" && k != "skip" {
            q.append_pair(k, v);
        }
    }
    q.append_pair("start", next_start);
    format!("<{}?{}>; rel=\"next\"", uri.path(), q.finish())
}

/// `GET /:bucket/`.
pub async fn get_keys(
    Access(bucket): Access,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&uri)?;
    let (query, format) = parse(&pairs, &headers)?;
    let listing = tokio::task::spawn_blocking(move || bucket.list(&query))
        .await
        .map_err(|e| ApiError::Internal(format!("listing task: {e}")))??;
    let (body, content_type) = render(&listing, format);
    // nosniff: lines of keys and values that whoever may write keys can
    // shape into JavaScript must not run as a `<script src>` of another site.
    let mut response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response();
    if let Some(next) = &listing.next_start
        && let Ok(link) = HeaderValue::from_str(&next_link(&uri, &pairs, next))
    {
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

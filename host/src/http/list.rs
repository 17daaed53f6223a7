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
    let Some(value) = query_param(pairs, name) else {
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

fn number(pairs: &[(String, String)], name: &str, default: usize) -> Result<usize, ApiError> {
    query_param(pairs, name).map_or(Ok(default), |v| {
        crate::bucket::whole_number(v)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{name} must be a whole number (digits only), not {v:?}"
                ))
            })
    })
}

fn text_param(pairs: &[(String, String)], name: &str) -> Result<Option<String>, ApiError> {
    query_param(pairs, name)
        .map(|v| {
            check_key_text(v)
                .map(|()| v.to_owned())
                .map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
        })
        .transpose()
}

fn parse(pairs: &[(String, String)], headers: &HeaderMap) -> Result<(ListQuery, Format), ApiError> {
    let format = match query_param(pairs, "format") {
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
        start: text_param(pairs, "start")?,
        end: text_param(pairs, "end")?,
        reverse: flag(pairs, "reverse")?,
        limit: number(pairs, "limit", MAX_LIMIT)?.min(MAX_LIMIT),
        skip: number(pairs, "skip", 0)?,
        values: flag(pairs, "values")?,
    };
    Ok((query, format))
}

/// A value in JSON output: typed, with non-UTF-8 bytes as base64.
fn json_value(value: &Value) -> (serde_json::Value, bool) {
    match value.to_json() {
        Some(v) => (v, false),
        None => (
            serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(value.body()),
            ),
            true,
        ),
    }
}

fn json_item(key: &str, value: Option<&Value>) -> serde_json::Value {
    match value {
        None => serde_json::Value::String(key.to_owned()),
        Some(v) => match json_value(v) {
            (v, false) => serde_json::json!([key, v]),
            (v, true) => serde_json::json!([key, v, "base64"]),
        },
    }
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
            (
                serde_json::Value::Array(items).to_string().into_bytes(),
                "application/json",
            )
        }
        Format::Jsonl => {
            for (k, v) in &listing.entries {
                out.extend_from_slice(json_item(k, v.as_ref()).to_string().as_bytes());
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

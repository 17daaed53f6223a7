//! `/` and `/:bucket`: creating, inspecting, changing and deleting buckets,
//! and issuing access tokens.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::{Access, ApiError, AppState, BodyLimit, body_fields, read_body};
use crate::bucket::{BucketError, BucketId, Grant, Permissions, PolicyChange};

/// Largest policy or token request body: a handful of short fields.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// `GET /`: what this server is.
pub async fn get_root() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "kvdb",
        "version": env!("CARGO_PKG_VERSION"),
        "create_bucket": "POST / (optional fields: secret_key, read_key, write_key, signing_key, default_ttl, email)",
    }))
}

/// `POST /`: create a bucket.
pub async fn post_bucket(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, body, MAX_FORM_BYTES, BodyLimit::Fields).await?;
    let change =
        PolicyChange::from_fields(body_fields(&headers, &body)?).map_err(BucketError::from)?;
    let (id, policy) = state.buckets.create(change).await?;
    let mut response = if super::accepts(&headers, "application/json") {
        (StatusCode::CREATED, Json(policy.public_view(&id))).into_response()
    } else {
        (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            id.to_string(),
        )
            .into_response()
    };
    if let Ok(location) = HeaderValue::from_str(&format!("/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `HEAD /:bucket`: whether the bucket exists; needs no credential.
pub async fn head_bucket(State(state): State<AppState>, uri: Uri) -> StatusCode {
    // From the path itself: axum's path parameters refuse a segment that is
    // not UTF-8 once percent-decoded with a 400 of their own, and such a
    // segment is no bucket id: 404, as for every other route (found by a
    // review).
    let exists = uri
        .path()
        .split('/')
        .nth(1)
        .and_then(|segment| {
            percent_encoding::percent_decode_str(segment)
                .decode_utf8()
                .ok()
        })
        .and_then(|segment| segment.parse::<BucketId>().ok())
        .is_some_and(|id| state.buckets.open(id).is_ok());
    if exists {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// `GET /:bucket`: the policy (admin).
pub async fn get_bucket(Access(bucket): Access) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(bucket.policy()?))
}

/// `PATCH /:bucket`: change policy fields (admin).
pub async fn patch_bucket(
    Access(bucket): Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    // 401/403 before any complaint about the body, and before reading it.
    bucket.ensure_admin()?;
    let body = read_body(&headers, body, MAX_FORM_BYTES, BodyLimit::Fields).await?;
    let bucket = bucket.reauthorized()?;
    let change =
        PolicyChange::from_fields(body_fields(&headers, &body)?).map_err(BucketError::from)?;
    Ok(Json(bucket.update_policy(change).await?))
}

/// `DELETE /:bucket` and `DELETE /:bucket/`: delete the bucket (admin).
pub async fn delete_bucket(Access(bucket): Access) -> Result<StatusCode, ApiError> {
    bucket.delete_bucket().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Permission names from a JSON list.
fn permission_list(items: &[serde_json::Value]) -> Result<Permissions, ApiError> {
    let names: Vec<&str> = items
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ApiError::bad_request("permissions must be strings"))
        })
        .collect::<Result<_, _>>()?;
    Permissions::parse_list(&names.join(",")).map_err(ApiError::BadRequest)
}

fn token_grant(
    fields: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Result<(Grant, u64), ApiError> {
    let mut prefix = String::new();
    let mut permissions = Permissions::of(&[crate::bucket::Permission::Read]);
    let mut ttl = crate::bucket::DEFAULT_TOKEN_TTL_S;
    for (name, value) in fields {
        match (name.as_str(), value) {
            ("prefix", serde_json::Value::String(p)) => prefix.clone_from(p),
            // A JSON list in a form field, as in a JSON body.
            ("permissions", serde_json::Value::String(list))
                if list.trim_start().starts_with('[') =>
            {
                let items: Vec<serde_json::Value> = serde_json::from_str(list).map_err(|e| {
                    ApiError::bad_request(format!(
                        "permissions: the list is not JSON ({e}); send a JSON list such as [\"read\",\"write\"], or names separated by commas"
                    ))
                })?;
                permissions = permission_list(&items)?;
            }
            ("permissions", serde_json::Value::String(list)) => {
                permissions = Permissions::parse_list(list).map_err(ApiError::BadRequest)?;
            }
            ("permissions", serde_json::Value::Array(items)) => {
                permissions = permission_list(items)?;
            }
            ("ttl", v) => {
                ttl = match v {
                    serde_json::Value::Number(n) => n.as_u64(),
                    serde_json::Value::String(s) => crate::bucket::whole_number(s),
                    _ => None,
                }
                .filter(|t| *t > 0)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "a token's ttl must be a whole number of seconds (digits only) from 1 to {} (100 years), not {v}",
                        crate::bucket::MAX_TOKEN_TTL_S
                    ))
                })?;
            }
            ("prefix", _) => {
                return Err(ApiError::bad_request(format!(
                    "prefix must be a string (the keys the token reaches start with it; \"\" for all), not {value}"
                )));
            }
            ("permissions", _) => {
                return Err(ApiError::bad_request(format!(
                    "permissions must be names separated by commas (\"read,write\") or a list of them ([\"read\",\"write\"]), not {value}"
                )));
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown token field {name:?}; known fields: prefix, permissions, ttl"
                )));
            }
        }
    }
    Ok((
        Grant {
            prefix,
            permissions,
        },
        ttl,
    ))
}

/// `POST /:bucket/tokens/`: issue an access token (admin).
pub async fn post_token(
    Access(bucket): Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    // 401/403 before any complaint about the body, and before reading it.
    bucket.ensure_admin()?;
    let body = read_body(&headers, body, MAX_FORM_BYTES, BodyLimit::Fields).await?;
    let bucket = bucket.reauthorized()?;
    let (grant, ttl) = token_grant(&body_fields(&headers, &body)?)?;
    let (token, expires_at) = bucket.issue_token(&grant, ttl)?;
    Ok(Json(serde_json::json!({
        "access_token": token,
        "expires_at": expires_at,
        "prefix": grant.prefix,
        "permissions": grant.permissions.names(),
    })))
}

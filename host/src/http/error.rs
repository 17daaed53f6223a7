//! [`ApiError`]: every error the HTTP API answers, mapped to a status once.
//!
//! Errors are problem documents (RFC 9457 shape: `type`, `title`, `status`,
//! `detail`) with `Content-Type: application/problem+json`. Internal failures
//! are logged with their details and answered with a generic detail.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::{AuthError, OperatorError};
use crate::bucket::{BucketError, InvalidKey, Reauthorize};
use crate::script::{Limit, ScriptError};
use crate::storage::StorageError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// A 401 of a request from another site whose Basic login the browser
    /// keeps was ignored (see `http::ambient_login`): answered without a
    /// Basic challenge, which would have the browser drop its login and ask
    /// again, in vain, since the next try comes from the same site.
    #[error(
        "this request came from another site, so the Basic login your browser keeps for this \
         server was not used (any site could act with it): open the page on this server, or \
         send the key as Authorization: Bearer or ?key="
    )]
    LoginIgnored,
    #[error(transparent)]
    Key(#[from] InvalidKey),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than the limit of {limit} bytes: {what}")]
    PayloadTooLarge { limit: usize, what: BodyLimit },
    /// The client stopped sending its request body (see `http::serve`).
    #[error("{0}: send the whole body (as long as Content-Length says) without long pauses")]
    BodyStalled(#[from] super::serve::BodyStalled),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
}

/// Which limit a request body passed, and so what the client can do: the
/// second half of a 413's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// A value, or a script's request body (which the value limit bounds).
    Value,
    /// A bucket's fields (create, change the policy, issue a token).
    Fields,
    /// A Lua script's source.
    LuaSource,
    /// A WebAssembly component, sent as `application/wasm`.
    Component,
    /// A script upload without `application/wasm`, which may be either.
    Script { lua_source: usize, component: usize },
}

impl std::fmt::Display for BodyLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyLimit::Value => f.write_str(
                "a value (and a script's request body) may be at most that large on this server \
                 (`kvdb serve --max-value-bytes`); send less, or split it over several keys",
            ),
            BodyLimit::Fields => {
                f.write_str("send only the bucket's fields (form or JSON), a few short strings")
            }
            BodyLimit::LuaSource => f.write_str(
                "a Lua script may be at most that large on this server \
                 (`kvdb serve --script-source-bytes`); keep data in keys, not in the source. \
                 An upload is Lua unless it starts with `\\0asm` or comes with \
                 Content-Type: application/wasm: send a WebAssembly component unaltered \
                 (`curl -T file.wasm`; `-d @file` alters a binary)",
            ),
            BodyLimit::Component => f.write_str(
                "a WebAssembly component may be at most that large on this server \
                 (`kvdb serve --script-component-bytes`); build it with `--release` and strip it",
            ),
            BodyLimit::Script {
                lua_source,
                component,
            } => write!(
                f,
                "a Lua script may have at most {lua_source} bytes \
                 (`kvdb serve --script-source-bytes`), a WebAssembly component sent as \
                 `application/wasm` at most {component} (`kvdb serve --script-component-bytes`)"
            ),
        }
    }
}

impl From<Reauthorize> for ApiError {
    fn from(e: Reauthorize) -> Self {
        match e {
            Reauthorize::Bucket(e) => Self::Bucket(e),
            Reauthorize::Auth(e) => Self::Auth(e),
        }
    }
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest(detail.into())
    }

    /// The one table from error to status, problem type and title.
    fn classify(&self) -> (StatusCode, &'static str) {
        use BucketError as B;
        match self {
            ApiError::Bucket(B::NotFound) => (StatusCode::NOT_FOUND, "bucket-not-found"),
            ApiError::Bucket(B::KeyNotFound(_)) => (StatusCode::NOT_FOUND, "key-not-found"),
            ApiError::Bucket(B::ScriptNotFound(_)) => (StatusCode::NOT_FOUND, "script-not-found"),
            ApiError::Bucket(B::Unauthorized(_))
            | ApiError::Unauthorized(_)
            | ApiError::Operator(OperatorError::Missing | OperatorError::Wrong)
            | ApiError::LoginIgnored => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Auth(_) => (StatusCode::UNAUTHORIZED, "invalid-credential"),
            ApiError::Bucket(B::Forbidden(_))
            | ApiError::Forbidden(_)
            | ApiError::Operator(OperatorError::Disabled) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Bucket(B::PreconditionFailed(_)) => {
                (StatusCode::PRECONDITION_FAILED, "precondition-failed")
            }
            ApiError::Bucket(B::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Bucket(B::TooLarge { .. } | B::ResultTooLarge { .. })
            | ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            ApiError::Bucket(B::Policy(_) | B::Invalid(_))
            | ApiError::Key(_)
            | ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::BodyStalled(_) => (StatusCode::REQUEST_TIMEOUT, "request-timeout"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            ApiError::Script(ScriptError::Invalid(_)) => {
                (StatusCode::BAD_REQUEST, "script-invalid")
            }
            ApiError::Script(ScriptError::Failed(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "script-error")
            }
            ApiError::Script(ScriptError::Busy(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "script-busy")
            }
            ApiError::Script(ScriptError::Limit { limit, .. }) => match limit {
                Limit::Time => (StatusCode::GATEWAY_TIMEOUT, "script-time-limit"),
                Limit::Instructions => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "script-instruction-limit",
                ),
                Limit::Fuel => (StatusCode::INTERNAL_SERVER_ERROR, "script-fuel-limit"),
                Limit::Memory => (StatusCode::INTERNAL_SERVER_ERROR, "script-memory-limit"),
                Limit::Stack => (StatusCode::INTERNAL_SERVER_ERROR, "script-stack-limit"),
                Limit::Response => (StatusCode::INTERNAL_SERVER_ERROR, "script-response-limit"),
            },
            ApiError::Storage(
                StorageError::BackupTooOld { .. }
                | StorageError::BackupBeforeRestore { .. }
                | StorageError::BackupAhead { .. },
            ) => (StatusCode::CONFLICT, "backup-since"),
            ApiError::Bucket(B::Storage(_) | B::Token(_))
            | ApiError::Storage(_)
            | ApiError::Script(ScriptError::Internal(_))
            | ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Failures of the server itself (the "internal" row of [`Self::classify`]):
    /// logged in full, answered generically.
    fn is_internal(&self) -> bool {
        self.classify().1 == "internal"
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.classify();
        let detail = if self.is_internal() {
            tracing::error!(error = %self, "internal error");
            "the server failed to complete the request; nothing was changed. The failure is in the server log.".to_owned()
        } else {
            self.to_string()
        };
        let mut response = problem(status, kind, &detail);
        if status == StatusCode::UNAUTHORIZED {
            // The schemes that can answer this 401: a bucket takes its keys
            // and tokens as Basic or Bearer; the operator token only as
            // Bearer.
            let challenge = match self {
                ApiError::LoginIgnored => None,
                ApiError::Operator(_) => Some("Bearer realm=\"kvdb operator\""),
                _ => Some("Basic realm=\"kvdb\", Bearer realm=\"kvdb\""),
            };
            if let Some(challenge) = challenge {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
        }
        response
    }
}

/// The JSON text of a problem document.
pub fn problem_body(status: StatusCode, kind: &str, detail: &str) -> String {
    serde_json::json!({
        "type": format!("urn:kvdb:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    })
    .to_string()
}

/// A problem document.
pub fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let mut response = (status, problem_body(status, kind, detail)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::OpConflict;

    #[test]
    fn every_error_maps_to_its_status() {
        let cases: Vec<(ApiError, u16)> = vec![
            (BucketError::NotFound.into(), 404),
            (BucketError::KeyNotFound("k".into()).into(), 404),
            (BucketError::Unauthorized("x".into()).into(), 401),
            (AuthError::WrongKey.into(), 401),
            (OperatorError::Missing.into(), 401),
            (OperatorError::Wrong.into(), 401),
            (OperatorError::Disabled.into(), 403),
            (ApiError::LoginIgnored, 401),
            (BucketError::Forbidden("x".into()).into(), 403),
            (
                BucketError::PreconditionFailed(crate::bucket::Precondition::Changed).into(),
                412,
            ),
            (BucketError::Conflict(OpConflict::Overflow).into(), 409),
            (BucketError::TooLarge { size: 2, limit: 1 }.into(), 413),
            (
                ApiError::PayloadTooLarge {
                    limit: 1,
                    what: BodyLimit::Value,
                },
                413,
            ),
            (InvalidKey::Empty.into(), 400),
            (ApiError::bad_request("x"), 400),
            (ApiError::MethodNotAllowed("x".into()), 405),
            (ApiError::UnsupportedMediaType("x".into()), 415),
            (StorageError::Closed.into(), 500),
            (
                StorageError::BackupTooOld {
                    since: 1,
                    horizon: 2,
                }
                .into(),
                409,
            ),
            (
                StorageError::BackupAhead {
                    since: 9,
                    version: 2,
                }
                .into(),
                409,
            ),
            (ScriptError::Invalid("x".into()).into(), 400),
            (ScriptError::Busy("x".into()).into(), 503),
            (ScriptError::Failed("x".into()).into(), 500),
            (
                ScriptError::Limit {
                    limit: Limit::Time,
                    detail: "x".into(),
                }
                .into(),
                504,
            ),
            (
                ScriptError::Limit {
                    limit: Limit::Memory,
                    detail: "x".into(),
                }
                .into(),
                500,
            ),
        ];
        for (error, status) in cases {
            let text = error.to_string();
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{text}");
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    #[test]
    fn unauthorized_answers_carry_www_authenticate() {
        let response = ApiError::from(AuthError::WrongKey).into_response();
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}

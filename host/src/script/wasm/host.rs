//! The host side of the `kvdb:script` imports (`kv`, `scope`, `log`): each
//! call converts its arguments and calls the shared [`Host`](crate::script::api::Host),
//! so WebAssembly and Lua run the same code for every data operation.
//!
//! Errors the guest should see come back as the WIT `error` variant; nothing
//! here traps.

use super::bindings::kvdb::script::{kv, log, scope, types};
use super::{WasmState, give_way};
use crate::bucket::{Number, Permission, Permissions, Typing, Value};
use crate::script::api::{CallError, ListOptions};

impl From<CallError> for types::Error {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotFound => types::Error::NotFound,
            CallError::PermissionDenied(m) => types::Error::PermissionDenied(m),
            CallError::TypeMismatch(m) => types::Error::TypeMismatch(m),
            CallError::Limit(m) => types::Error::Limit(m),
            CallError::Invalid(m) => types::Error::InvalidInput(m),
            CallError::Internal(m) => types::Error::Internal(m),
        }
    }
}

pub(super) fn to_wit(v: Value) -> types::Value {
    match v {
        Value::Int(i)
        | Value::Number {
            number: Number::Int(i),
            ..
        } => types::Value::Integer(i),
        Value::Float(f)
        | Value::Number {
            number: Number::Float(f),
            ..
        } => types::Value::Float(f),
        Value::Json(bytes) => types::Value::Json(String::from_utf8_lossy(&bytes).into_owned()),
        Value::Raw { bytes, .. } => types::Value::Raw(bytes),
    }
}

fn from_wit(v: types::Value) -> Result<Value, CallError> {
    match v {
        types::Value::Raw(bytes) => Ok(Value::Raw {
            bytes,
            media_type: None,
        }),
        types::Value::Integer(i) => Ok(Value::Int(i)),
        types::Value::Float(f) if f.is_finite() => Ok(Value::Float(f)),
        types::Value::Float(_) => Err(CallError::Invalid("a float must be finite".into())),
        // Typed as an HTTP body sent with `application/json`: a JSON number
        // is a number (it can be counted).
        types::Value::Json(text) => {
            Value::from_body(text.as_bytes(), &Typing::Json).map_err(|e| match e {
                crate::bucket::ValueError::InvalidJson(e) => {
                    CallError::Invalid(format!("not JSON: {e}"))
                }
            })
        }
    }
}

fn permission(p: types::Permission) -> Permission {
    match p {
        types::Permission::Read => Permission::Read,
        types::Permission::Write => Permission::Write,
        types::Permission::Delete => Permission::Delete,
        types::Permission::Enumerate => Permission::Enumerate,
    }
}

fn permissions(list: &[types::Permission]) -> Permissions {
    list.iter()
        .fold(Permissions::NONE, |acc, p| acc.with(permission(*p)))
}

fn wit_permissions(p: Permissions) -> Vec<types::Permission> {
    p.iter()
        .map(|p| match p {
            Permission::Read => types::Permission::Read,
            Permission::Write => types::Permission::Write,
            Permission::Delete => types::Permission::Delete,
            Permission::Enumerate => types::Permission::Enumerate,
        })
        .collect()
}

impl types::Host for WasmState {}

/// Every `kv` call is async: it first hands control back if the run is past
/// its slice on the async worker ([`give_way`]), and a write waiting for its
/// commit suspends the guest.
impl kv::Host for WasmState {
    async fn get(&mut self, key: String) -> Result<Option<types::Value>, types::Error> {
        give_way().await;
        Ok(self.host.get(&key)?.map(to_wit))
    }

    async fn exists(&mut self, key: String) -> Result<bool, types::Error> {
        give_way().await;
        Ok(self.host.exists(&key)?)
    }

    async fn set(
        &mut self,
        key: String,
        value: types::Value,
        ttl: Option<u64>,
    ) -> Result<(), types::Error> {
        give_way().await;
        let value = from_wit(value)?;
        Ok(self.host.set_async(&key, value, ttl).await?)
    }

    async fn delete(&mut self, key: String) -> Result<bool, types::Error> {
        give_way().await;
        Ok(self.host.delete_async(&key).await?)
    }

    async fn incr(&mut self, key: String, by: types::Number) -> Result<types::Value, types::Error> {
        give_way().await;
        let n = match by {
            types::Number::Integer(i) => Number::Int(i),
            types::Number::Float(f) if f.is_finite() => Number::Float(f),
            types::Number::Float(_) => {
                return Err(CallError::Invalid("the amount must be finite".into()).into());
            }
        };
        Ok(to_wit(self.host.incr_async(&key, n).await?))
    }

    async fn merge(&mut self, key: String, patch: String) -> Result<types::Value, types::Error> {
        give_way().await;
        let patch = self.host.json_arg(patch.as_bytes())?;
        Ok(to_wit(self.host.merge_async(&key, patch).await?))
    }

    async fn patch(&mut self, key: String, patch: String) -> Result<types::Value, types::Error> {
        give_way().await;
        let patch = self.host.json_arg(patch.as_bytes())?;
        Ok(to_wit(self.host.patch_async(&key, patch).await?))
    }

    async fn append(&mut self, key: String, bytes: Vec<u8>) -> Result<types::Value, types::Error> {
        give_way().await;
        Ok(to_wit(self.host.append_async(&key, bytes).await?))
    }

    async fn list(
        &mut self,
        prefix: String,
        options: types::ListOptions,
    ) -> Result<Vec<types::Entry>, types::Error> {
        give_way().await;
        let opts = ListOptions {
            limit: options.limit.map(|l| l as usize),
            start: options.start,
            end: options.end,
            reverse: options.reverse,
            values: options.values,
        };
        Ok(self
            .host
            .list(&prefix, opts)?
            .into_iter()
            .map(|(key, value)| types::Entry {
                key,
                value: value.map(to_wit),
            })
            .collect())
    }

    async fn access_token(
        &mut self,
        prefix: String,
        perms: Vec<types::Permission>,
        ttl: u64,
    ) -> Result<types::Token, types::Error> {
        give_way().await;
        let (token, expires_at) = self.host.access_token(&prefix, permissions(&perms), ttl)?;
        Ok(types::Token { token, expires_at })
    }
}

impl scope::Host for WasmState {
    async fn get(&mut self) -> types::ScopeInfo {
        give_way().await;
        let (prefix, perms) = self.host.scope();
        types::ScopeInfo {
            prefix,
            permissions: wit_permissions(perms),
        }
    }

    async fn set(
        &mut self,
        prefix: String,
        perms: Vec<types::Permission>,
    ) -> Result<(), types::Error> {
        give_way().await;
        Ok(self.host.set_scope(&prefix, permissions(&perms))?)
    }
}

impl log::Host for WasmState {
    async fn log(&mut self, level: log::Level, message: String) {
        give_way().await;
        let Some(message) = self.log.line(&message) else {
            return;
        };
        let script = &self.label;
        match level {
            log::Level::Debug => tracing::debug!(%script, "{message}"),
            log::Level::Info => tracing::info!(%script, "{message}"),
            log::Level::Warn => tracing::warn!(%script, "{message}"),
            log::Level::Error => tracing::error!(%script, "{message}"),
        }
    }
}

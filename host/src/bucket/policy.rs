//! A bucket's policy: its master keys, signing key, default TTL and contact.
//!
//! Parsing of policy fields from clients happens here, once: a parsed
//! [`PolicyChange`] has fields of the right types and [`Policy::apply`]
//! cannot fail; what a change may not do (a key given empty at creation,
//! unsetting the secret or signing key) is refused by
//! [`PolicyChange::check_create`] and [`PolicyChange::check_update`], which
//! `Buckets::create` and `Scoped::update_policy` run first.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Bytes of randomness in a generated signing key (HS256 wants >= 32).
const SIGNING_KEY_BYTES: usize = 32;

/// The policy as stored. `signing_key` never leaves the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub secret_key: Option<String>,
    pub read_key: Option<String>,
    pub write_key: Option<String>,
    pub signing_key: String,
    pub default_ttl: u64,
    pub email: Option<String>,
    pub created_at: u64,
}

/// Fields of a create or update request, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyChange {
    secret_key: Option<String>,
    read_key: Option<Option<String>>,
    write_key: Option<Option<String>>,
    signing_key: Option<String>,
    default_ttl: Option<u64>,
    email: Option<Option<String>>,
}

/// A policy field that can't be accepted (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "unknown policy field {0:?}; known fields: secret_key, read_key, write_key, signing_key, default_ttl, email"
    )]
    UnknownField(String),
    #[error("{0} must be a string")]
    NotAString(&'static str),
    #[error(
        "default_ttl must be a whole number of seconds from 0 (keys don't expire) to {max} (100 years), not {0}",
        max = super::MAX_TOKEN_TTL_S
    )]
    BadTtl(String),
    #[error(
        "{0} is empty: give it a value, or leave the field out (without secret_key a bucket has no admin for ever; without read_key or write_key, reading or writing is open to whoever knows the bucket id)"
    )]
    EmptyAtCreation(&'static str),
    #[error("{0} can be changed but not unset")]
    CannotUnset(&'static str),
    #[error("{0} is longer than 1024 bytes")]
    TooLong(&'static str),
    #[error(
        "{0} has a control character (a tab, a line break…) or starts or ends with white space, which `Authorization: Bearer KEY` can't carry or drops; use printable characters (e.g. `openssl rand -hex 16`). In a form, `+` is a space: write a literal + as %2B"
    )]
    Unsendable(&'static str),
    #[error(
        "signing_key has {0} characters: it signs access tokens, and one that short can be guessed from any token it signed; give at least {MIN_SIGNING_KEY} random characters (e.g. `openssl rand -hex 16`), or leave it out to have one made"
    )]
    WeakSigningKey(usize),
}

/// The fewest characters of a `signing_key` a client gives: HS256 with a
/// short key falls to an offline search from one token (found by a
/// review: `signing_key=newkey` was taken, and tokens forged with it).
pub const MIN_SIGNING_KEY: usize = 16;

/// Longest accepted key or email: generous for any generated secret.
const MAX_FIELD: usize = 1024;

fn random_signing_key() -> String {
    let bytes: [u8; SIGNING_KEY_BYTES] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl PolicyChange {
    /// Reads fields from a JSON object or form pairs (all values as JSON).
    /// An empty string means "unset".
    ///
    /// # Errors
    /// An unknown field, a non-string key, a bad TTL.
    pub fn from_fields(fields: BTreeMap<String, serde_json::Value>) -> Result<Self, PolicyError> {
        let mut change = Self::default();
        for (name, value) in fields {
            match name.as_str() {
                "secret_key" => {
                    change.secret_key = Some(key_text(&value, "secret_key")?.unwrap_or_default())
                }
                "signing_key" => {
                    let key = text(&value, "signing_key")?.unwrap_or_default();
                    // Empty is "unset", refused as that by check_create and
                    // check_update.
                    let length = key.chars().count();
                    if (1..MIN_SIGNING_KEY).contains(&length) {
                        return Err(PolicyError::WeakSigningKey(length));
                    }
                    change.signing_key = Some(key);
                }
                "read_key" => change.read_key = Some(key_text(&value, "read_key")?),
                "write_key" => change.write_key = Some(key_text(&value, "write_key")?),
                "email" => change.email = Some(text(&value, "email")?),
                "default_ttl" => change.default_ttl = Some(ttl(&value)?),
                _ => return Err(PolicyError::UnknownField(name)),
            }
        }
        Ok(change)
    }

    /// A new bucket's policy (after [`PolicyChange::check_create`]). A
    /// missing secret key leaves the bucket without an admin; a missing
    /// signing key is generated.
    pub fn create(self, now_s: u64) -> Policy {
        Policy {
            secret_key: self.secret_key.filter(|s| !s.is_empty()),
            read_key: self.read_key.flatten(),
            write_key: self.write_key.flatten(),
            signing_key: self
                .signing_key
                .filter(|s| !s.is_empty())
                .unwrap_or_else(random_signing_key),
            default_ttl: self.default_ttl.unwrap_or(0),
            email: self.email.flatten(),
            created_at: now_s,
        }
    }

    /// Checks a new bucket's fields: a key given empty is refused (most
    /// likely an unset shell variable), since it would silently leave the
    /// bucket without an admin for ever, or readable or writable by anyone
    /// who knows its id.
    ///
    /// # Errors
    /// An empty `secret_key`, `read_key`, `write_key` or `signing_key`.
    pub fn check_create(&self) -> Result<(), PolicyError> {
        // `read_key`/`write_key` given empty (or null) parse as `Some(None)`.
        let empty = [
            ("secret_key", self.secret_key.as_deref() == Some("")),
            ("read_key", self.read_key == Some(None)),
            ("write_key", self.write_key == Some(None)),
            ("signing_key", self.signing_key.as_deref() == Some("")),
        ];
        match empty.into_iter().find(|&(_, is_empty)| is_empty) {
            Some((field, _)) => Err(PolicyError::EmptyAtCreation(field)),
            None => Ok(()),
        }
    }

    /// Checks what an update to an existing policy may not do.
    ///
    /// # Errors
    /// Unsetting the secret or signing key.
    pub fn check_update(&self) -> Result<(), PolicyError> {
        if self.secret_key.as_deref() == Some("") {
            return Err(PolicyError::CannotUnset("secret_key"));
        }
        if self.signing_key.as_deref() == Some("") {
            return Err(PolicyError::CannotUnset("signing_key"));
        }
        Ok(())
    }
}

fn text(value: &serde_json::Value, field: &'static str) -> Result<Option<String>, PolicyError> {
    match value {
        serde_json::Value::String(s) if s.is_empty() => Ok(None),
        serde_json::Value::String(s) if s.len() > MAX_FIELD => Err(PolicyError::TooLong(field)),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Null => Ok(None),
        _ => Err(PolicyError::NotAString(field)),
    }
}

/// A key clients present: one with a control character (`a%0Ab` in a
/// form) or white space at an end can't be sent whole as `Authorization:
/// Bearer KEY` (found by a review: such keys were taken and worked only in
/// `?key=`). A signing key is never sent, so it is not held to this.
fn key_text(value: &serde_json::Value, field: &'static str) -> Result<Option<String>, PolicyError> {
    let key = text(value, field)?;
    if let Some(k) = &key
        && (k.chars().any(char::is_control) || k.trim() != k)
    {
        return Err(PolicyError::Unsendable(field));
    }
    Ok(key)
}

fn ttl(value: &serde_json::Value) -> Result<u64, PolicyError> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => super::whole_number(s),
        _ => None,
    }
    .filter(|t| *t <= super::MAX_TOKEN_TTL_S)
    .ok_or_else(|| PolicyError::BadTtl(value.to_string()))
}

impl Policy {
    /// The policy after `change` (already checked with
    /// [`PolicyChange::check_update`]).
    #[must_use]
    pub fn apply(&self, change: PolicyChange) -> Policy {
        let mut p = self.clone();
        if let Some(k) = change.secret_key.filter(|s| !s.is_empty()) {
            p.secret_key = Some(k);
        }
        if let Some(k) = change.signing_key.filter(|s| !s.is_empty()) {
            p.signing_key = k;
        }
        if let Some(k) = change.read_key {
            p.read_key = k;
        }
        if let Some(k) = change.write_key {
            p.write_key = k;
        }
        if let Some(e) = change.email {
            p.email = e;
        }
        if let Some(t) = change.default_ttl {
            p.default_ttl = t;
        }
        p
    }

    /// The policy as its admin sees it: everything but the signing key.
    pub fn public_view(&self, id: &super::BucketId) -> serde_json::Value {
        serde_json::json!({
            "bucket": id.to_string(),
            "secret_key": self.secret_key,
            "read_key": self.read_key,
            "write_key": self.write_key,
            "default_ttl": self.default_ttl,
            "email": self.email,
            "created_at": self.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: serde_json::Value) -> BTreeMap<String, serde_json::Value> {
        serde_json::from_value(v).expect("object")
    }

    #[test]
    fn creation_refuses_empty_keys() {
        for field in ["secret_key", "read_key", "write_key", "signing_key"] {
            let change = PolicyChange::from_fields(fields(json!({ field: "" }))).expect("parses");
            assert_eq!(
                change.check_create(),
                Err(PolicyError::EmptyAtCreation(field))
            );
        }
        let change = PolicyChange::from_fields(fields(json!({"secret_key": "s", "email": ""})))
            .expect("parses");
        assert_eq!(change.check_create(), Ok(()));
    }

    #[test]
    fn creation_generates_a_signing_key() {
        let p = PolicyChange::from_fields(fields(json!({"read_key": "r", "default_ttl": "60"})))
            .expect("valid")
            .create(5);
        assert_eq!(p.secret_key, None);
        assert_eq!(p.read_key.as_deref(), Some("r"));
        assert_eq!(p.default_ttl, 60);
        assert!(p.signing_key.len() >= 43);
    }

    #[test]
    fn updates_unset_with_empty_strings_but_not_the_secret() {
        let p = PolicyChange::from_fields(fields(json!({"secret_key": "s", "read_key": "r"})))
            .expect("valid")
            .create(0);
        let change = PolicyChange::from_fields(fields(json!({"read_key": ""}))).expect("valid");
        change.check_update().expect("allowed");
        assert_eq!(p.apply(change).read_key, None);
        let unset = PolicyChange::from_fields(fields(json!({"secret_key": ""}))).expect("parses");
        assert_eq!(
            unset.check_update(),
            Err(PolicyError::CannotUnset("secret_key"))
        );
    }

    #[test]
    fn keys_that_a_header_cannot_carry_are_refused() {
        for field in ["secret_key", "read_key", "write_key"] {
            for key in ["a\nb", "nul\0", " lead", "trail\t", "tab\tinside"] {
                assert_eq!(
                    PolicyChange::from_fields(fields(json!({ field: key }))).err(),
                    Some(PolicyError::Unsendable(field)),
                    "{field} {key:?}"
                );
            }
            // Printable, inner spaces and any script: fine.
            for key in ["a b", "clé-ü", "x:y"] {
                PolicyChange::from_fields(fields(json!({ field: key }))).expect(key);
            }
        }
        // A signing key is never sent: not held to it.
        PolicyChange::from_fields(fields(json!({"signing_key": "\n0123456789abcdef "})))
            .expect("signing key");
    }

    #[test]
    fn bad_fields_are_refused() {
        assert!(matches!(
            PolicyChange::from_fields(fields(json!({"admin": "x"}))),
            Err(PolicyError::UnknownField(_))
        ));
        for bad in [
            json!(-1),
            json!("+5"),
            json!(" 5"),
            json!(3_153_600_001_u64),
            json!(1.5),
        ] {
            assert_eq!(
                PolicyChange::from_fields(fields(json!({ "default_ttl": bad }))),
                Err(PolicyError::BadTtl(bad.to_string()))
            );
        }
        for (good, secs) in [(json!("60"), 60), (json!(3_153_600_000_u64), 3_153_600_000)] {
            let change = PolicyChange::from_fields(fields(json!({ "default_ttl": good })));
            assert_eq!(change.map(|c| c.default_ttl), Ok(Some(secs)));
        }
        assert_eq!(
            PolicyChange::from_fields(fields(json!({"read_key": 5}))),
            Err(PolicyError::NotAString("read_key"))
        );
    }
}

//! Access tokens: JWTs (HS256 with the bucket's signing key).
//!
//! Claims: `v` (format version), `bkt` (bucket id), `pfx` (key prefix),
//! `perm` (permission names), `iat` and `exp` (Unix seconds). Rotating the
//! signing key invalidates every token signed with the old one.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::bucket::{BucketId, Grant, Permission, Permissions};

/// The token format this server issues and accepts.
const VERSION: u8 = 1;

/// Clock skew tolerated on `exp`: API.md allows at most a second.
const LEEWAY_S: u64 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    v: u8,
    bkt: String,
    pfx: String,
    perm: Vec<String>,
    iat: u64,
    exp: u64,
}

/// A token that must be refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired: ask for a new one (`POST /BUCKET/tokens/`)")]
    Expired,
    #[error(
        "the access token was issued for another bucket: a token works only on the bucket that issued it (`POST /BUCKET/tokens/` with that bucket's secret key)"
    )]
    OtherBucket,
    #[error(
        "the access token is invalid (bad signature, revoked by a new signing_key, or malformed): ask for a new one (`POST /BUCKET/tokens/`)"
    )]
    Invalid,
    #[error("the access token could not be signed: {0}")]
    Signing(String),
}

/// Signs a token for `grant` on `bucket`, valid until `expires_at`.
///
/// # Errors
/// Signing failed (it does not with an HMAC key; kept typed, not unwrapped).
pub fn issue(
    signing_key: &str,
    bucket: &BucketId,
    grant: &Grant,
    now_s: u64,
    expires_at: u64,
) -> Result<String, TokenError> {
    let claims = Claims {
        v: VERSION,
        bkt: bucket.to_string(),
        pfx: grant.prefix.clone(),
        perm: grant
            .permissions
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        iat: now_s,
        exp: expires_at,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(signing_key.as_bytes()),
    )
    .map_err(|e| TokenError::Signing(e.to_string()))
}

/// The bucket a token names, unverified: only for the error message of a
/// token whose signature does not check out.
fn claimed_bucket(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        bkt: String,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Named>(&json).ok().map(|n| n.bkt)
}

/// Checks a token's signature, expiry and bucket; returns what it grants.
///
/// # Errors
/// Tampered, expired, revoked, malformed or other-bucket tokens.
pub fn verify(
    signing_key: &str,
    bucket: &BucketId,
    token: &str,
    now_s: u64,
) -> Result<(Grant, u64), TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked below against our clock, with our leeway.
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(signing_key.as_bytes()),
        &validation,
    )
    .map_err(|_| {
        // Signed with another bucket's key: say so if the token names
        // another bucket (what it names is the holder's own business).
        match claimed_bucket(token) {
            Some(claimed) if claimed != bucket.to_string() => TokenError::OtherBucket,
            _ => TokenError::Invalid,
        }
    })?;
    let claims = data.claims;
    if claims.v != VERSION {
        return Err(TokenError::Invalid);
    }
    if claims.bkt != bucket.to_string() {
        return Err(TokenError::OtherBucket);
    }
    if claims.exp.saturating_add(LEEWAY_S) <= now_s {
        return Err(TokenError::Expired);
    }
    let perms: Vec<Permission> = claims
        .perm
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| TokenError::Invalid)?;
    Ok((
        Grant {
            prefix: claims.pfx,
            permissions: Permissions::of(&perms),
        },
        claims.exp,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            prefix: "users:1:".into(),
            permissions: Permissions::of(&[Permission::Read, Permission::Enumerate]),
        }
    }

    #[test]
    fn a_token_verifies_to_its_grant() {
        let id = BucketId::random();
        let t = issue("k", &id, &grant(), 100, 200).expect("signs");
        assert_eq!(verify("k", &id, &t, 150), Ok((grant(), 200)));
    }

    #[test]
    fn expired_tampered_rotated_and_foreign_tokens_are_refused() {
        let id = BucketId::random();
        let t = issue("k", &id, &grant(), 100, 200).expect("signs");
        assert_eq!(
            verify("k", &id, &t, 200),
            Ok((grant(), 200)),
            "one second of leeway"
        );
        assert_eq!(verify("k", &id, &t, 201), Err(TokenError::Expired));
        assert_eq!(verify("rotated", &id, &t, 150), Err(TokenError::Invalid));
        assert_eq!(
            verify("k", &BucketId::random(), &t, 150),
            Err(TokenError::OtherBucket)
        );
        // Another bucket's token is signed with that bucket's key.
        assert_eq!(
            verify("other key", &BucketId::random(), &t, 150),
            Err(TokenError::OtherBucket)
        );
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert_eq!(
            verify("k", &id, &parts.join("."), 150),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            verify("k", &id, "not.a.token", 150),
            Err(TokenError::Invalid)
        );
    }
}

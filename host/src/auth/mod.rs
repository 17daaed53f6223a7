//! Authentication: from what a request presents to a [`Scope`].
//!
//! This module finds the credential (Bearer, Basic as user or password,
//! `?key=`, `?access_token=`), compares master keys in constant time, verifies
//! tokens, and builds the scope: the union of what the bucket leaves open and
//! what the credential grants. It decides nothing about a particular
//! operation: that is [`Scoped`](crate::bucket::Scoped)'s job.

pub mod token;

use base64::Engine;
use subtle::ConstantTimeEq;

use crate::bucket::{BucketId, Grant, Permission, Permissions, Policy, Principal, Scope};
pub use token::TokenError;

/// A presented credential that is wrong (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the key is not valid for this bucket: it is none of its secret_key, write_key, read_key, nor an access token (which `POST /BUCKET/tokens/` issues, three dot-separated parts)"
    )]
    WrongKey,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the Authorization header is malformed: {0}")]
    Malformed(&'static str),
}

/// Finds the credentials a request presents, in the order to try them
/// (none: anonymous): the `Authorization` header first (Bearer, or Basic
/// with the key as user name or as password: with both filled in, the user
/// name and then the password, for clients that insist on a user name), then
/// `?access_token=`, then `?key=`.
///
/// # Errors
/// An `Authorization` header that can't be read.
pub fn presented<'a>(
    authorization: Option<&'a str>,
    access_token: Option<&'a str>,
    key: Option<&'a str>,
) -> Result<Vec<String>, AuthError> {
    if let Some(header) = authorization {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Ok(Some(rest.to_owned())
                .filter(|s| !s.is_empty())
                .into_iter()
                .collect());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| AuthError::Malformed("Basic credentials are not base64"))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| AuthError::Malformed("Basic credentials are not UTF-8"))?;
            let (user, password) = text.split_once(':').unwrap_or((&text, ""));
            return Ok([user, password]
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect());
        }
        return Err(AuthError::Malformed("use Bearer or Basic"));
    }
    // An empty parameter is no credential: it does not hide the other one.
    let given = |p: Option<&'a str>| p.filter(|s| !s.is_empty());
    Ok(given(access_token)
        .or(given(key))
        .map(str::to_owned)
        .into_iter()
        .collect())
}

/// Why an operator route (`/_admin/…`) refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    /// The server was started without an operator token (403).
    #[error(
        "operator routes are disabled: start the server with --admin-token (or KVDB_ADMIN_TOKEN)"
    )]
    Disabled,
    /// No `Authorization: Bearer` header (401).
    #[error("this route needs the operator token as `Authorization: Bearer TOKEN`")]
    Missing,
    /// A token that is not the operator's (401).
    #[error("the operator token is wrong")]
    Wrong,
}

/// The operator routes' check: the `Authorization` header must carry the
/// server's `--admin-token` (`expected`; `None`: the routes are disabled)
/// as a Bearer token, the scheme's name in any case (RFC 9110). A bucket's
/// keys never pass it. Compared in constant time; a wrong token is logged,
/// without the token (an operator sees someone guessing).
///
/// # Errors
/// Disabled, missing or wrong, as [`OperatorError`] says.
pub fn operator(expected: Option<&str>, authorization: Option<&str>) -> Result<(), OperatorError> {
    let expected = expected.ok_or(OperatorError::Disabled)?;
    let presented = authorization
        .and_then(|header| header.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    match presented {
        None => Err(OperatorError::Missing),
        Some(token) if same(expected, Some(token)) => Ok(()),
        Some(_) => {
            tracing::warn!("an operator route was refused: the operator token given is wrong");
            Err(OperatorError::Wrong)
        }
    }
}

fn same(a: &str, b: Option<&str>) -> bool {
    b.is_some_and(|b| bool::from(a.as_bytes().ct_eq(b.as_bytes())))
}

/// What anyone may do without a credential.
pub fn open_permissions(policy: &Policy) -> Permissions {
    let mut p = Permissions::NONE;
    if policy.read_key.is_none() {
        p = p.with(Permission::Read);
    }
    if policy.write_key.is_none() {
        p = p.with(Permission::Write).with(Permission::Delete);
    }
    if policy.secret_key.is_none() {
        p = p.with(Permission::Enumerate);
    }
    p
}

/// The scope of a request to `bucket` presenting `credential`.
///
/// # Errors
/// A credential that is neither one of the bucket's keys nor a valid token
/// for it.
pub fn authorize(
    bucket: &BucketId,
    policy: &Policy,
    credential: Option<&str>,
    now_s: u64,
) -> Result<Scope, AuthError> {
    let open = open_permissions(policy);
    let mut scope = Scope {
        admin: false,
        grants: Vec::with_capacity(2),
        principal: Principal::Anonymous,
        expires_at: None,
    };
    if !open.is_empty() {
        scope.grants.push(Grant {
            prefix: String::new(),
            permissions: open,
        });
    }
    let Some(credential) = credential else {
        return Ok(scope);
    };
    scope.principal = Principal::Credential;
    let granted = if same(credential, policy.secret_key.as_deref()) {
        return Ok(Scope::admin());
    } else if same(credential, policy.write_key.as_deref()) {
        Grant {
            prefix: String::new(),
            permissions: Permissions::of(&[
                Permission::Read,
                Permission::Write,
                Permission::Delete,
            ]),
        }
    } else if same(credential, policy.read_key.as_deref()) {
        Grant {
            prefix: String::new(),
            permissions: Permissions::of(&[Permission::Read]),
        }
    } else if credential.bytes().filter(|&b| b == b'.').count() == 2 {
        let (grant, expires_at) = token::verify(&policy.signing_key, bucket, credential, now_s)?;
        scope.expires_at = Some(expires_at);
        grant
    } else {
        return Err(AuthError::WrongKey);
    };
    scope.grants.push(granted);
    Ok(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            secret_key: Some("secret".into()),
            read_key: Some("reader".into()),
            write_key: None,
            signing_key: "sign".into(),
            default_ttl: 0,
            email: None,
            created_at: 0,
        }
    }

    #[test]
    fn credentials_are_found_every_documented_way() {
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let found = |a: Option<&str>, t: Option<&str>, k: Option<&str>| {
            presented(a, t, k).expect("readable")
        };
        assert_eq!(found(Some("Bearer k1"), None, None), ["k1"]);
        assert_eq!(found(Some(&basic("k2:")), None, None), ["k2"]);
        assert_eq!(found(Some(&basic(":k3")), None, None), ["k3"]);
        // Both filled in: the user name, then the password.
        assert_eq!(found(Some(&basic("api:k4")), None, None), ["api", "k4"]);
        assert!(found(Some(&basic(":")), None, None).is_empty());
        assert_eq!(found(None, Some("t"), Some("k")), ["t"]);
        assert_eq!(found(None, None, Some("k")), ["k"]);
        // An empty parameter does not hide the other one.
        assert_eq!(found(None, Some(""), Some("k")), ["k"]);
        assert_eq!(found(None, Some("t"), Some("")), ["t"]);
        assert!(found(None, Some(""), Some("")).is_empty());
        assert!(found(None, None, None).is_empty());
        assert!(presented(Some("Digest x"), None, None).is_err());
    }

    #[test]
    fn scopes_unite_open_permissions_and_the_credential() {
        let id = BucketId::random();
        let anon = authorize(&id, &policy(), None, 0).expect("anonymous");
        assert!(!anon.allows(Permission::Read, "k"));
        assert!(
            anon.allows(Permission::Write, "k"),
            "write_key unset: writing is open"
        );
        assert!(!anon.allows(Permission::Enumerate, "k"));
        let reader = authorize(&id, &policy(), Some("reader"), 0).expect("reader");
        assert!(reader.allows(Permission::Read, "k") && !reader.admin);
        assert!(
            authorize(&id, &policy(), Some("secret"), 0)
                .expect("admin")
                .admin
        );
        assert_eq!(
            authorize(&id, &policy(), Some("wrong"), 0),
            Err(AuthError::WrongKey)
        );
    }
}

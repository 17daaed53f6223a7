//! Permissions and scopes: what a request, a token or a script may do.
//!
//! A [`Scope`] is a set of grants (a key prefix and permissions) plus the admin
//! flag. It is computed once per request by `auth` and checked only by
//! [`Scoped`](super::Scoped): nothing else decides what is allowed.

use std::fmt;

/// One permission on keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Read,
    Write,
    Delete,
    Enumerate,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::Read,
        Permission::Write,
        Permission::Delete,
        Permission::Enumerate,
    ];

    fn bit(self) -> u8 {
        match self {
            Permission::Read => 1,
            Permission::Write => 2,
            Permission::Delete => 4,
            Permission::Enumerate => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Delete => "delete",
            Permission::Enumerate => "enumerate",
        }
    }
}

impl std::str::FromStr for Permission {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "delete" => Ok(Self::Delete),
            "enumerate" => Ok(Self::Enumerate),
            other => Err(format!(
                "unknown permission {other:?}: use read, write, delete or enumerate"
            )),
        }
    }
}

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Self = Self(0);
    pub const ALL: Self = Self(15);

    pub fn of(perms: &[Permission]) -> Self {
        Self(perms.iter().fold(0, |acc, p| acc | p.bit()))
    }

    pub fn has(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    #[must_use]
    pub fn with(self, p: Permission) -> Self {
        Self(self.0 | p.bit())
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |p| self.has(*p))
    }

    /// Parses `read,write` (comma separated).
    ///
    /// # Errors
    /// An unknown permission name.
    pub fn parse_list(s: &str) -> Result<Self, String> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(str::parse::<Permission>)
            .try_fold(Self::NONE, |acc, p| p.map(|p| acc.with(p)))
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Permission::name).collect()
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

/// Permissions on the keys that start with a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub prefix: String,
    pub permissions: Permissions,
}

impl Grant {
    fn allows(&self, p: Permission, key: &str) -> bool {
        self.permissions.has(p) && key.starts_with(&self.prefix)
    }
}

/// How the holder of a scope identified itself; decides 401 against 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// No credential: a refusal is 401 (credentials would help).
    Anonymous,
    /// A key or token: a refusal is 403.
    Credential,
    /// A scope a script set for itself: a refusal is 403, and names that
    /// scope rather than the caller's credential.
    Script,
}

/// What the holder may do in one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub admin: bool,
    pub grants: Vec<Grant>,
    pub principal: Principal,
    /// When the credential stops working (a token's expiry, Unix seconds):
    /// tokens handed on within this scope expire no later.
    pub expires_at: Option<u64>,
}

impl Scope {
    /// Everything, as the bucket's secret key gives.
    pub fn admin() -> Self {
        Self {
            admin: true,
            grants: vec![Grant {
                prefix: String::new(),
                permissions: Permissions::ALL,
            }],
            principal: Principal::Credential,
            expires_at: None,
        }
    }

    /// May the holder use `p` on `key`?
    pub fn allows(&self, p: Permission, key: &str) -> bool {
        self.grants.iter().any(|g| g.allows(p, key))
    }

    /// The prefix a listing of `requested` is confined to, if any grant with
    /// `enumerate` overlaps it: the requested prefix itself when a grant covers
    /// it, the grant's prefix when the request is wider than the grant.
    pub fn listing_prefix(&self, requested: &str) -> Option<String> {
        let enumerable = || {
            self.grants
                .iter()
                .filter(|g| g.permissions.has(Permission::Enumerate))
        };
        if enumerable().any(|g| requested.starts_with(&g.prefix)) {
            return Some(requested.to_owned());
        }
        enumerable()
            .filter(|g| g.prefix.starts_with(requested))
            .map(|g| g.prefix.clone())
            .min()
    }

    /// What the scope grants, for an error message: `read, enumerate on keys
    /// starting with "users:1:"`, `read on every key`, `nothing`.
    /// Grants of one prefix (what the bucket leaves open and what the key
    /// adds) are named together.
    pub fn describe(&self) -> String {
        let mut by_prefix: Vec<(&str, Permissions)> = Vec::new();
        for g in self.grants.iter().filter(|g| !g.permissions.is_empty()) {
            match by_prefix.iter_mut().find(|(prefix, _)| *prefix == g.prefix) {
                Some((_, perms)) => *perms = g.permissions.iter().fold(*perms, Permissions::with),
                None => by_prefix.push((&g.prefix, g.permissions)),
            }
        }
        let grants: Vec<String> = by_prefix
            .into_iter()
            .map(|(prefix, permissions)| {
                let perms = permissions.names().join(", ");
                if prefix.is_empty() {
                    format!("{perms} on every key")
                } else {
                    format!("{perms} on keys starting with {prefix:?}")
                }
            })
            .collect();
        if grants.is_empty() {
            "nothing".into()
        } else {
            grants.join("; ")
        }
    }

    /// Could this scope hand `grant` on to someone else (it holds all of
    /// it)? Each permission is looked at on its own: it may come from a
    /// different grant of this scope (what the bucket leaves open, what the
    /// token adds) than the others; found by a review (read and enumerate
    /// held in two grants could each be handed on, not both in one token).
    pub fn covers(&self, grant: &Grant) -> bool {
        self.admin
            || !grant.permissions.is_empty()
                && grant.permissions.iter().all(|p| {
                    self.grants
                        .iter()
                        .any(|g| grant.prefix.starts_with(&g.prefix) && g.permissions.has(p))
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_scope(prefix: &str, perms: &[Permission]) -> Scope {
        Scope {
            admin: false,
            grants: vec![Grant {
                prefix: prefix.into(),
                permissions: Permissions::of(perms),
            }],
            principal: Principal::Credential,
            expires_at: None,
        }
    }

    #[test]
    fn grants_are_confined_to_their_prefix_and_permissions() {
        let s = token_scope("users:1:", &[Permission::Read]);
        assert!(s.allows(Permission::Read, "users:1:name"));
        assert!(!s.allows(Permission::Read, "users:2:name"));
        assert!(!s.allows(Permission::Write, "users:1:name"));
    }

    #[test]
    fn listings_are_confined_to_the_grant() {
        let s = token_scope("users:1:", &[Permission::Enumerate]);
        assert_eq!(s.listing_prefix(""), Some("users:1:".into()));
        assert_eq!(s.listing_prefix("users:1:a"), Some("users:1:a".into()));
        assert_eq!(s.listing_prefix("users:2:"), None);
        assert_eq!(
            token_scope("", &[Permission::Read]).listing_prefix(""),
            None
        );
    }

    #[test]
    fn a_scope_says_what_it_grants() {
        assert_eq!(
            token_scope("users:1:", &[Permission::Read, Permission::Enumerate]).describe(),
            r#"read, enumerate on keys starting with "users:1:""#
        );
        assert_eq!(
            token_scope("", &[Permission::Write]).describe(),
            "write on every key"
        );
        assert_eq!(token_scope("a", &[]).describe(), "nothing");
    }

    #[test]
    fn grants_of_one_prefix_are_described_together() {
        // What a bucket leaves open (read) and what its write key adds.
        let mut s = token_scope("", &[Permission::Read]);
        s.grants.push(Grant {
            prefix: String::new(),
            permissions: Permissions::of(&[Permission::Write, Permission::Delete]),
        });
        s.grants.push(Grant {
            prefix: "a:".into(),
            permissions: Permissions::of(&[Permission::Enumerate]),
        });
        assert_eq!(
            s.describe(),
            r#"read, write, delete on every key; enumerate on keys starting with "a:""#
        );
    }

    #[test]
    fn a_grant_is_covered_permission_by_permission() {
        // The bucket leaves read open everywhere; the token adds enumerate
        // on "todo:".
        let mut s = token_scope("", &[Permission::Read]);
        s.grants.push(Grant {
            prefix: "todo:".into(),
            permissions: Permissions::of(&[Permission::Enumerate]),
        });
        let grant = |prefix: &str, perms: &[Permission]| Grant {
            prefix: prefix.into(),
            permissions: Permissions::of(perms),
        };
        let both = [Permission::Read, Permission::Enumerate];
        assert!(s.covers(&grant("todo:", &both)));
        assert!(s.covers(&grant("todo:items:", &both)));
        assert!(s.covers(&grant("", &[Permission::Read])));
        assert!(!s.covers(&grant("", &both)), "enumerate is only on todo:");
        assert!(!s.covers(&grant("todo:", &[Permission::Write])));
        assert!(!s.covers(&grant("todo:", &[Permission::Read, Permission::Write])));
    }

    #[test]
    fn permission_lists_parse() {
        assert_eq!(
            Permissions::parse_list("read, write"),
            Ok(Permissions::of(&[Permission::Read, Permission::Write]))
        );
        assert!(Permissions::parse_list("read,admin").is_err());
    }
}

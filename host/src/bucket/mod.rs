//! Buckets: isolated key spaces over the store, and the one authorization point.
//!
//! [`Buckets`] creates and opens buckets (caching their policies); a
//! [`Bucket`] is an opened bucket; [`Scoped`] is a bucket seen through a
//! [`Scope`], and is the *only* code that decides whether an operation is
//! allowed. HTTP handlers and the script runtimes (Lua, WebAssembly) build a
//! scope with `auth` and call `Scoped`; they never check permissions
//! themselves.
//!
//! Storage keys: `id(16) 'p'` holds the policy, `id(16) 'k' key` the values,
//! `id(16) 's' name` a script's metadata and `id(16) 'c' name` its source;
//! deleting a bucket purges the prefix `id(16)` in the background.
//! Reads are snapshot reads on the calling thread (microseconds for one key);
//! writes are jobs for the store's writer, which serialises them, so every
//! read-modify-write here is atomic.

mod id;
mod key;
mod policy;
mod scope;
mod scripts;
pub mod value;

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use sha2::Digest;

pub use id::{BucketId, InvalidBucketId};
pub use key::{InvalidKey, Key, MAX_KEY_BYTES, check_key_text};
pub use policy::{Policy, PolicyChange, PolicyError};
pub use scope::{Grant, Permission, Permissions, Principal, Scope};
pub use scripts::{MAX_SCRIPT_NAME, ScriptKind, ScriptName, StoredScript};
pub use value::{
    MAX_JSON_DEPTH, Number, Op, OpConflict, OperandError, Typing, Value, ValueError, media_essence,
};

use crate::auth::{self, TokenError};
use crate::storage::{NewValue, Snapshot, StorageError, Store, WriteCtx};

/// Entry kind of a stored policy (values use the kinds in [`value`]).
const KIND_POLICY: u8 = 0x10;

/// The longest a token may be valid, and the longest `default_ttl`: 100
/// years (a number every JSON client reads exactly).
pub const MAX_TOKEN_TTL_S: u64 = 100 * 365 * 24 * 3600;

/// A token's validity when its request names none (API.md: 3600 seconds),
/// over HTTP and in scripts.
pub const DEFAULT_TOKEN_TTL_S: u64 = 3600;

/// A whole number as a query or form field gives one (`ttl`, `limit`,
/// `default_ttl`…): ASCII digits only, without sign or spaces (API.md: "a
/// non-negative integer (else 400)").
pub fn whole_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// How many bytes of values one page of a listing holds at most (see
/// [`Scoped::list`]).
pub const LIST_VALUE_BYTES: usize = 32 * 1024 * 1024;

/// For a missing key named as a route without its slash (`GET
/// /BUCKET/scripts`): where the route is (found by a reviewer following the
/// README: the key `scripts` or `tokens` is an ordinary key, API.md).
fn route_hint(key: &str) -> &'static str {
    match key {
        "scripts" => " (scripts are listed at /BUCKET/scripts/, with the slash)",
        "tokens" => " (tokens are issued by POST /BUCKET/tokens/, with the slash)",
        _ => "",
    }
}

/// What a bucket operation can fail with; mapped to HTTP once, in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error(
        "there is no bucket with this id: check it against what `POST /` answered (22 characters); a deleted bucket is gone for good"
    )]
    NotFound,
    #[error("there is no key {0:?} in this bucket{hint}", hint = route_hint(.0))]
    KeyNotFound(String),
    #[error(
        "there is no script {0:?} in this bucket: a script is uploaded with PUT and the secret key (`curl -u SECRET: -T FILE` to this URL), and `GET /BUCKET/scripts/` lists them"
    )]
    ScriptNotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PreconditionFailed(#[from] Precondition),
    #[error("{0}")]
    Conflict(#[from] OpConflict),
    #[error(
        "the value would be {size} bytes; the limit is {limit} bytes on this server (`kvdb serve --max-value-bytes`): store less, or split it over several keys"
    )]
    TooLarge { size: usize, limit: usize },
    /// [`BucketError::TooLarge`] as a caller who may not read the value
    /// learns it: the size would tell the value's.
    #[error(
        "the result would be over the limit of {limit} bytes on this server (`kvdb serve --max-value-bytes`): store less, or split it over several keys"
    )]
    ResultTooLarge { limit: usize },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Limits that apply to every bucket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest value, in bytes (413 above it).
    pub max_value_bytes: usize,
}

/// A precondition on a write, from `If-Match` / `If-None-Match`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    Always,
    /// The current value's ETag must be one of these (`*`: any value).
    IfMatch(Vec<String>),
    /// The key must be absent (`If-None-Match: *`).
    IfAbsent,
    /// Both `If-Match` (checked first, as RFC 9110 orders them) and
    /// `If-None-Match: *`: no value can meet both (found by a review: the
    /// second alone was checked).
    IfMatchAndAbsent(Vec<String>),
}

/// The largest step, up or down, that a caller who may not read a key adds
/// to it in one `PATCH`. Whether an addition overflows tells how large the
/// value is; with steps of any size, 64 requests of a binary search would
/// read a counter exactly (found by a review), with steps of at most this
/// many trillions would be needed.
pub const BLIND_STEP_MAX: i64 = 1_000_000;

/// Values from this size up get their JSON operations made outside the
/// writer ([`Scoped::make_outside`]).
const OUTSIDE_BYTES: usize = 64 * 1024;

/// How many times a JSON operation made outside the writer is made again
/// when its key changed meanwhile, before the writer makes it itself.
const OUTSIDE_TRIES: usize = 3;

/// A JSON operation's result made outside the writer from the value at
/// version `based_on` ([`Scoped::make_outside`]).
struct Made {
    based_on: u64,
    result: Result<(Value, u8, Vec<u8>), BucketError>,
}

/// The key of a bucket's ETags, derived from the store's secret and the
/// bucket's id.
///
/// Versions number the writes of the whole server, so an ETag that showed
/// the version would tell any bucket's users how many writes all the other
/// buckets made in between (found by a review). An ETag is a keyed hash
/// (SipHash-2-4) of the version instead, under a key no user knows or sets
/// (a key derived from something a user can set, such as the signing key,
/// let the version be found by trying them: found by a second review). It
/// still changes on every write and stays the same across restarts; a
/// restored store has a secret of its own, and so other ETags.
#[derive(Clone, Copy)]
pub struct EtagKey([u64; 2]);

impl EtagKey {
    fn of(secret: &[u8; 32], bucket: &BucketId) -> Self {
        let digest = sha2::Sha256::new()
            .chain_update(b"kvdb etag key\0")
            .chain_update(secret)
            .chain_update(bucket.to_bytes())
            .finalize();
        let mut halves = [0u64; 2];
        for (half, bytes) in halves.iter_mut().zip(digest.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(bytes);
            *half = u64::from_le_bytes(word);
        }
        Self(halves)
    }

    /// The strong ETag of a stored version.
    pub fn etag(self, version: u64) -> String {
        let [k0, k1] = self.0;
        let tag = siphasher::sip::SipHasher24::new_with_keys(k0, k1).hash(&version.to_le_bytes());
        format!("\"{tag:016x}\"")
    }
}

impl Condition {
    fn check(&self, current: Option<&Stored>, etag_key: EtagKey) -> Result<(), BucketError> {
        match self {
            Condition::Always => Ok(()),
            Condition::IfAbsent if current.is_none() => Ok(()),
            Condition::IfAbsent => Err(Precondition::Exists.into()),
            // Never both met: refused alike whatever the key holds (which
            // failed would tell a caller who may not read it whether the
            // key exists; found by a review).
            Condition::IfMatchAndAbsent(_) => Err(Precondition::Never.into()),
            Condition::IfMatch(tags) => if_match(tags, current, etag_key),
        }
    }
}

/// `If-Match: tags` against the current value.
fn if_match(
    tags: &[String],
    current: Option<&Stored>,
    etag_key: EtagKey,
) -> Result<(), BucketError> {
    let Some(cur) = current else {
        return Err(Precondition::Missing.into());
    };
    let mine = etag_key.etag(cur.version);
    // If-Match compares strongly (RFC 9110): a weak tag never matches.
    if tags.iter().any(|t| t == "*" || *t == mine) {
        Ok(())
    } else if tags.iter().any(|t| t.strip_prefix("W/") == Some(&mine)) {
        Err(Precondition::Weak.into())
    } else {
        Err(Precondition::Changed.into())
    }
}

/// Why a conditional write was refused (412).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Precondition {
    #[error(
        "If-None-Match: * but the key exists; to overwrite it, send the write without If-None-Match (or with If-Match and its current ETag)"
    )]
    Exists,
    #[error(
        "If-Match and If-None-Match: * together can never both hold (the key must exist and be absent): send one of them"
    )]
    Never,
    #[error(
        "a DELETE with If-None-Match: * never deletes anything (the key would have to be absent): send it without, or with If-Match"
    )]
    DeleteIfAbsent,
    #[error(
        "If-Match: the key does not exist (deleted, expired or never written); to write it only if it is absent, send If-None-Match: * instead"
    )]
    Missing,
    #[error(
        "If-Match compares ETags strongly: send the ETag as answered, without W/ (a cache or proxy may have weakened it)"
    )]
    Weak,
    #[error("If-Match: the value has changed since that ETag; GET the key for its current ETag")]
    Changed,
    /// [`Precondition::Missing`], [`Precondition::Weak`] or
    /// [`Precondition::Changed`] as a caller who may not read the key
    /// learns it: which one would tell whether the key exists, without
    /// writing anything (found by a review).
    #[error(
        "If-Match: that ETag is not the key's current one (why is not said to a credential that can't read the key); send the ETag the last write of it answered"
    )]
    Withheld,
}

/// A value with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub value: Value,
    pub version: u64,
    /// Unix milliseconds; 0 = never.
    pub expires_at: u64,
}

impl Stored {
    fn from_entry(e: crate::storage::Entry) -> Self {
        Self {
            value: Value::decode(e.kind, e.value),
            version: e.version,
            expires_at: e.expires_at,
        }
    }
}

/// What an atomic operation left under its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Patched {
    /// The new value; `None` when the scope may write the key but not read
    /// it.
    pub value: Option<Value>,
    pub version: u64,
    /// Unix milliseconds; 0 = never.
    pub expires_at: u64,
}

/// A listing request (`GET /:bucket/`), already parsed.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub prefix: String,
    /// Exclusive, in the direction of travel.
    pub start: Option<String>,
    /// Exclusive, in the direction of travel.
    pub end: Option<String>,
    pub reverse: bool,
    pub limit: usize,
    pub skip: usize,
    pub values: bool,
    /// Bytes of values after which a page ends early; `None`:
    /// [`LIST_VALUE_BYTES`] or the value limit, whichever is larger.
    pub value_bytes: Option<usize>,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub entries: Vec<(String, Option<Value>)>,
    /// Set when the limit cut the listing short: the `start` of the next page.
    pub next_start: Option<String>,
}

struct Cached {
    version: u64,
    /// `None`: deleted.
    policy: Option<(Arc<Policy>, EtagKey)>,
}

/// All buckets: creation, opening, policy cache. Cheap to share in an `Arc`.
pub struct Buckets {
    store: Store,
    limits: Limits,
    /// Policies by bucket, tagged with the version of their record so that a
    /// stale read can never replace a newer policy (or a deletion).
    cache: RwLock<HashMap<BucketId, Cached>>,
    /// Script metadata read for runs (see `scripts::ScriptCache`).
    scripts: scripts::ScriptCache,
    purge_wanted: tokio::sync::Notify,
    /// One JSON operation on a large value made outside the writer at a
    /// time ([`Scoped::make_outside`]): as when the writer made them, a
    /// document is held in memory once, and concurrent operations on one
    /// document don't each make it from the same version in vain.
    outside: Arc<tokio::sync::Semaphore>,
}

fn policy_key(id: &BucketId) -> Vec<u8> {
    let mut k = id.to_bytes().to_vec();
    k.push(b'p');
    k
}

fn data_prefix(id: &BucketId) -> Vec<u8> {
    let mut k = id.to_bytes().to_vec();
    k.push(b'k');
    k
}

fn data_key(id: &BucketId, key: &str) -> Vec<u8> {
    let mut k = data_prefix(id);
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode_policy(bytes: &[u8]) -> Result<Policy, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("bucket policy: {e}")))
}

fn now_s(now_ms: u64) -> u64 {
    now_ms / 1000
}

impl Buckets {
    pub fn new(store: Store, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            store,
            limits,
            cache: RwLock::new(HashMap::new()),
            scripts: scripts::ScriptCache::default(),
            purge_wanted: tokio::sync::Notify::new(),
            outside: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Woken when a deleted bucket's data waits to be purged.
    pub fn purge_wanted(&self) -> &tokio::sync::Notify {
        &self.purge_wanted
    }

    fn remember(&self, id: BucketId, version: u64, policy: Option<Arc<Policy>>) {
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match cache.get(&id) {
            Some(c) if c.version >= version => {}
            _ => {
                let policy = policy.map(|p| (p, EtagKey::of(self.store.secret(), &id)));
                cache.insert(id, Cached { version, policy });
            }
        }
    }

    /// Whether `id` was deleted by this process (deletions are remembered
    /// for as long as it runs).
    fn is_deleted(&self, id: BucketId) -> bool {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .is_some_and(|c| c.policy.is_none())
    }

    /// Creates a bucket with a fresh random id.
    ///
    /// # Errors
    /// An empty key in `change` ([`PolicyChange::check_create`]), or a
    /// storage failure.
    pub async fn create(
        &self,
        change: PolicyChange,
    ) -> Result<(BucketId, Arc<Policy>), BucketError> {
        change.check_create()?;
        let id = BucketId::random();
        let (policy, version) = self
            .store
            .write(move |ctx| -> Result<_, BucketError> {
                let policy = change.create(now_s(ctx.now_ms()));
                let bytes = encode_policy(&policy)?;
                if ctx.get(&policy_key(&id))?.is_some() {
                    // 122 random bits collided: refuse rather than overwrite
                    // (the server's failure, not the client's: a 500).
                    return Err(StorageError::Engine(
                        "a new bucket's random id is taken; try again".into(),
                    )
                    .into());
                }
                let version = ctx.put(&policy_key(&id), KIND_POLICY, &bytes, 0)?;
                Ok((policy, version))
            })
            .await??;
        let policy = Arc::new(policy);
        self.remember(id, version, Some(policy.clone()));
        Ok((id, policy))
    }

    /// Opens an existing bucket.
    ///
    /// # Errors
    /// [`BucketError::NotFound`], or a storage failure.
    pub fn open(self: &Arc<Self>, id: BucketId) -> Result<Bucket, BucketError> {
        let cached = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|c| (c.version, c.policy.clone()));
        let (version, (policy, etag_key)) = match cached {
            Some((version, Some(cached))) => (version, cached),
            Some((_, None)) => return Err(BucketError::NotFound),
            None => {
                let entry = self
                    .store
                    .snapshot()?
                    .get(&policy_key(&id))?
                    .ok_or(BucketError::NotFound)?;
                let policy = Arc::new(decode_policy(&entry.value)?);
                self.remember(id, entry.version, Some(policy.clone()));
                (
                    entry.version,
                    (policy, EtagKey::of(self.store.secret(), &id)),
                )
            }
        };
        Ok(Bucket {
            buckets: self.clone(),
            id,
            policy,
            version,
            etag_key,
        })
    }

    /// The version of the policy record `id` is known by now (`None`: not
    /// read yet).
    fn policy_version(&self, id: BucketId) -> Option<u64> {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|c| c.version)
    }
}

/// An opened bucket: its id and policy, not yet bound to a scope.
#[derive(Clone)]
pub struct Bucket {
    buckets: Arc<Buckets>,
    id: BucketId,
    policy: Arc<Policy>,
    /// The version of the policy record `policy` was read from.
    version: u64,
    etag_key: EtagKey,
}

impl Bucket {
    /// The largest value this server stores, in bytes.
    pub fn max_value_bytes(&self) -> usize {
        self.buckets.limits.max_value_bytes
    }

    pub fn id(&self) -> BucketId {
        self.id
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The bucket seen through `scope`: every operation is checked against it.
    pub fn scoped(self, scope: Scope) -> Scoped {
        Scoped {
            bucket: self,
            scope,
            credentials: None,
        }
    }

    /// The bucket seen through the scope of `credentials` (see
    /// [`authorize_first`]), which the scope keeps so that
    /// [`Scoped::reauthorized`] can judge them again under a newer policy.
    ///
    /// # Errors
    /// None is valid: the last one's refusal (a wrong key, an invalid
    /// token).
    pub fn authorized(self, credentials: Vec<String>) -> Result<Scoped, auth::AuthError> {
        let now = now_s(self.buckets.store.now_ms());
        let scope = authorize_first(&self.id, &self.policy, &credentials, now)?;
        Ok(Scoped {
            bucket: self,
            scope,
            credentials: Some(credentials),
        })
    }
}

/// The scope of a request presenting `credentials` to bucket `id` under
/// `policy` (see [`auth::authorize`]): the first one valid for it, tried in
/// order ([`auth::presented`]); none is anonymous.
fn authorize_first(
    id: &BucketId,
    policy: &Policy,
    credentials: &[String],
    now_s: u64,
) -> Result<Scope, auth::AuthError> {
    let mut refused = None;
    for credential in credentials {
        match auth::authorize(id, policy, Some(credential), now_s) {
            Ok(scope) => return Ok(scope),
            // The last refusal is the one reported: with Basic `api:KEY`
            // the password is the credential meant (an expired token says
            // so, not "the key is not valid").
            Err(e) => refused = Some(e),
        }
    }
    match refused {
        Some(e) => Err(e),
        None => auth::authorize(id, policy, None, now_s),
    }
}

/// What a write job that changes what may be done (the policy, the
/// scripts, the bucket's deletion) checks first, inside the writer: the
/// bucket exists and, if its policy changed since the admin's scope was
/// authorized, the same credentials still make an admin under the stored
/// one. [`Scoped::reauthorized`] judges a request again once its body is
/// read; this closes the moment between that and the write, in which a
/// rotation of the secret key could commit and then be undone by a request
/// made with the old one.
pub(crate) struct AdminCheck {
    id: BucketId,
    based_on: u64,
    credentials: Option<Vec<String>>,
}

impl AdminCheck {
    /// The bucket's policy record, once the check passes.
    pub(crate) fn check(
        &self,
        ctx: &mut WriteCtx<'_>,
    ) -> Result<crate::storage::Entry, BucketError> {
        let entry = ctx
            .get(&policy_key(&self.id))?
            .ok_or(BucketError::NotFound)?;
        if entry.version == self.based_on {
            return Ok(entry);
        }
        if let Some(credentials) = &self.credentials {
            let policy = decode_policy(&entry.value)?;
            let admin = authorize_first(&self.id, &policy, credentials, now_s(ctx.now_ms()))
                .is_ok_and(|scope| scope.admin);
            if !admin {
                return Err(BucketError::Unauthorized(
                    "the bucket's policy changed while this request was on its way, and its credential is no longer the secret key: send it again with the current one".into(),
                ));
            }
        }
        Ok(entry)
    }
}

/// A bucket seen through a scope: the one authorization point.
pub struct Scoped {
    bucket: Bucket,
    scope: Scope,
    /// What the scope was authorized from ([`Bucket::authorized`]); `None`
    /// for a scope a script set.
    credentials: Option<Vec<String>>,
}

/// Why [`Scoped::reauthorized`] refused.
#[derive(Debug, thiserror::Error)]
pub enum Reauthorize {
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// Checks, inside a write job, that the bucket still exists: a write racing
/// with the bucket's deletion must not leave orphan data behind.
fn ensure_bucket(ctx: &mut WriteCtx<'_>, id: &BucketId) -> Result<(), BucketError> {
    match ctx.get(&policy_key(id))? {
        Some(_) => Ok(()),
        None => Err(BucketError::NotFound),
    }
}

fn expiry(now_ms: u64, ttl_s: Option<u64>, default_ttl: u64) -> u64 {
    match ttl_s.unwrap_or(default_ttl) {
        0 => 0,
        s => now_ms.saturating_add(s.saturating_mul(1000)),
    }
}

fn lower_max<'a>(a: Bound<&'a [u8]>, b: Bound<&'a [u8]>) -> Bound<&'a [u8]> {
    match (a, b) {
        (Bound::Unbounded, x) | (x, Bound::Unbounded) => x,
        (Bound::Included(x) | Bound::Excluded(x), Bound::Included(y) | Bound::Excluded(y))
            if x != y =>
        {
            if x > y {
                a
            } else {
                b
            }
        }
        (Bound::Excluded(_), _) => a,
        _ => b,
    }
}

fn upper_min<'a>(a: Bound<&'a [u8]>, b: Bound<&'a [u8]>) -> Bound<&'a [u8]> {
    match (a, b) {
        (Bound::Unbounded, x) | (x, Bound::Unbounded) => x,
        (Bound::Included(x) | Bound::Excluded(x), Bound::Included(y) | Bound::Excluded(y))
            if x != y =>
        {
            if x < y {
                a
            } else {
                b
            }
        }
        (Bound::Excluded(_), _) => a,
        _ => b,
    }
}

impl Scoped {
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The strong ETag of a version of a key of this bucket ([`EtagKey`]).
    pub fn etag(&self, version: u64) -> String {
        self.bucket.etag_key.etag(version)
    }

    /// A read's `If-Match: tags` against the value it found (RFC 9110: a
    /// `GET` whose `If-Match` fails is a 412 too, not the value).
    ///
    /// # Errors
    /// [`BucketError::PreconditionFailed`], as for a write.
    pub fn check_if_match(&self, tags: &[String], stored: &Stored) -> Result<(), BucketError> {
        if_match(tags, Some(stored), self.bucket.etag_key)
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    fn store(&self) -> &Store {
        &self.bucket.buckets.store
    }

    /// A refusal of `what`, which needs `needs` (the strongest permission
    /// it needs): a 401 without credentials, else a 403 that says which
    /// keys would do.
    fn refuse(&self, what: String, needs: Permission) -> BucketError {
        match self.scope.principal {
            Principal::Anonymous => BucketError::Unauthorized(format!(
                "{what} needs a key or an access token for this bucket"
            )),
            Principal::Credential => BucketError::Forbidden(format!(
                "{what} is not allowed with this credential, which grants {}; {}, or an access token that grants it, may",
                self.scope.describe(),
                match needs {
                    Permission::Read => "the read, write or secret key",
                    Permission::Write | Permission::Delete => "the write or secret key",
                    Permission::Enumerate => "the secret key",
                }
            )),
            Principal::Script => BucketError::Forbidden(format!(
                "{what} is not allowed in the scope the script set, which grants {}",
                self.scope.describe()
            )),
        }
    }

    fn require(&self, p: Permission, key: &str) -> Result<(), BucketError> {
        if self.scope.allows(p, key) {
            Ok(())
        } else {
            Err(self.refuse(format!("{} on key {key:?}", p.name()), p))
        }
    }

    /// Reads of a bucket deleted since this handle was opened (by a script
    /// still running when its bucket goes) find nothing: the entries stay on
    /// disk until the background purge reaches them. Writes check the same
    /// inside their write job ([`ensure_bucket`]).
    fn ensure_exists(&self) -> Result<(), BucketError> {
        if self.bucket.buckets.is_deleted(self.bucket.id) {
            Err(BucketError::NotFound)
        } else {
            Ok(())
        }
    }

    /// [`Self::require_admin`], and what the write job checks again
    /// ([`AdminCheck`]).
    fn admin_check(&self) -> Result<AdminCheck, BucketError> {
        self.require_admin()?;
        Ok(AdminCheck {
            id: self.bucket.id,
            based_on: self.bucket.version,
            credentials: self.credentials.clone(),
        })
    }

    fn require_admin(&self) -> Result<(), BucketError> {
        if self.scope.admin {
            return Ok(());
        }
        if self.bucket.policy.secret_key.is_none() {
            return Err(BucketError::Forbidden(
                "this bucket was created without a secret_key, so it has no admin: it can't be deleted, and its policy, tokens and scripts can't be managed".into(),
            ));
        }
        let what = "this operation needs the bucket's secret key (access tokens never grant it): send the secret key as the user name, e.g. `curl -u SECRET:`";
        Err(match self.scope.principal {
            Principal::Anonymous => BucketError::Unauthorized(what.into()),
            Principal::Credential => BucketError::Forbidden(format!(
                "{what}; the credential given is not the secret key"
            )),
            Principal::Script => BucketError::Forbidden(
                "this operation needs the bucket's secret key, which a scope the script set never is".into(),
            ),
        })
    }

    /// Fails unless this scope is the bucket's admin: lets a handler refuse
    /// early, before expensive work (compiling an upload).
    ///
    /// # Errors
    /// Not the admin.
    pub fn ensure_admin(&self) -> Result<(), BucketError> {
        self.require_admin()
    }

    /// Refuses a write of `key` that this scope can't make, before the
    /// request's body is read (the write checks again).
    ///
    /// # Errors
    /// No write permission on `key`.
    pub fn ensure_writable(&self, key: &Key) -> Result<(), BucketError> {
        self.require(Permission::Write, key.as_str())
    }

    /// Refuses a delete of `key` that this scope can't make, before the
    /// request's headers are looked at (the delete checks again).
    ///
    /// # Errors
    /// No delete permission on `key`.
    pub fn ensure_deletable(&self, key: &Key) -> Result<(), BucketError> {
        self.require(Permission::Delete, key.as_str())
    }

    fn check_size(&self, value: &Value) -> Result<(), BucketError> {
        let limit = self.bucket.buckets.limits.max_value_bytes;
        let size = value.size();
        if size > limit {
            return Err(BucketError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// The live value under `key`.
    ///
    /// # Errors
    /// No read permission on `key`, or a storage failure.
    pub fn get(&self, key: &Key) -> Result<Option<Stored>, BucketError> {
        self.require(Permission::Read, key.as_str())?;
        self.ensure_exists()?;
        self.read_with(&self.store().snapshot()?, key)
    }

    fn read_with(&self, snap: &Snapshot, key: &Key) -> Result<Option<Stored>, BucketError> {
        Ok(snap
            .get(&data_key(&self.bucket.id, key.as_str()))?
            .map(Stored::from_entry))
    }

    /// Sets `key` to `value`; returns the new version. `ttl_s`: seconds
    /// (0 = never), else the bucket's `default_ttl`.
    ///
    /// # Errors
    /// No write permission, a failed condition, a value over the size limit,
    /// or a storage failure.
    pub async fn set(
        &self,
        key: &Key,
        value: Value,
        ttl_s: Option<u64>,
        condition: Condition,
    ) -> Result<u64, BucketError> {
        self.require(Permission::Write, key.as_str())?;
        key.check_writable()
            .map_err(|e| BucketError::Invalid(e.to_string()))?;
        self.check_size(&value)?;
        let id = self.bucket.id;
        let etag_key = self.bucket.etag_key;
        let dkey = data_key(&id, key.as_str());
        let default_ttl = self.bucket.policy.default_ttl;
        let (kind, bytes) = value.into_encoded();
        self.store()
            .write(move |ctx| -> Result<u64, BucketError> {
                ensure_bucket(ctx, &id)?;
                if condition != Condition::Always {
                    let current = ctx.get(&dkey)?.map(Stored::from_entry);
                    condition.check(current.as_ref(), etag_key)?;
                }
                let expires_at = expiry(ctx.now_ms(), ttl_s, default_ttl);
                Ok(ctx.put(&dkey, kind, &bytes, expires_at)?)
            })
            .await?
            .map_err(|e| self.withheld(key, e))
    }

    /// `e` as this scope may learn it about `key`: why an `If-Match`
    /// failed only if it may read the key ([`Precondition::Withheld`]).
    fn withheld(&self, key: &Key, e: BucketError) -> BucketError {
        match e {
            BucketError::PreconditionFailed(
                Precondition::Missing | Precondition::Weak | Precondition::Changed,
            ) if !self.scope.allows(Permission::Read, key.as_str()) => {
                Precondition::Withheld.into()
            }
            other => other,
        }
    }

    /// Applies an atomic operation to `key` (HTTP `PATCH`); returns the new
    /// version and expiry, and the new value if this scope may also read the
    /// key: write permission does not imply read. For a scope that can't
    /// read the key, an operation that does not apply, or whose result
    /// would be too large, fails without saying why or how large (that
    /// would describe the value); that it failed still tells something
    /// (that the value is not a number, or that it is within
    /// [`BLIND_STEP_MAX`] of overflowing), and so such a scope adds at most
    /// [`BLIND_STEP_MAX`] in one operation.
    ///
    /// # Errors
    /// No write permission (a JSON patch needs read too, and so does a
    /// larger step), a failed condition (412), an operation that does not
    /// apply to the current value (409), a result over the size limit
    /// (413), or a storage failure.
    pub async fn patch(
        &self,
        key: &Key,
        op: Op,
        ttl_s: Option<u64>,
        condition: Condition,
    ) -> Result<Patched, BucketError> {
        let readable = self.scope.allows(Permission::Read, key.as_str());
        if !readable
            && let Op::Add(step) = &op
            && step.exceeds(BLIND_STEP_MAX)
            && self.scope.allows(Permission::Write, key.as_str())
        {
            let why = format!(
                "so it adds at most {BLIND_STEP_MAX} (or -{BLIND_STEP_MAX}) in one request: with larger steps, which of them overflow would tell the value"
            );
            // Without a credential, one that can read is what it lacks (401).
            return Err(match self.scope.principal {
                Principal::Anonymous => BucketError::Unauthorized(format!(
                    "a request without a key or an access token may not read {:?}, {why}; send smaller steps, or a key or access token that can read the key",
                    key.as_str()
                )),
                Principal::Credential => BucketError::Forbidden(format!(
                    "this credential may not read {:?}, {why}; send smaller steps, or use a credential that can read the key",
                    key.as_str()
                )),
                Principal::Script => BucketError::Forbidden(format!(
                    "the scope the script set may not read {:?}, {why}; add smaller steps, or set a scope that can read the key",
                    key.as_str()
                )),
            });
        }
        let stored = self
            .apply_op(key, op, ttl_s, condition)
            .await
            .map_err(|e| match e {
                BucketError::Conflict(_) if !readable => OpConflict::Withheld.into(),
                e @ BucketError::PreconditionFailed(_) => self.withheld(key, e),
                BucketError::TooLarge { limit, .. } if !readable => {
                    BucketError::ResultTooLarge { limit }
                }
                other => other,
            })?;
        Ok(Patched {
            value: readable.then_some(stored.value),
            version: stored.version,
            expires_at: stored.expires_at,
        })
    }

    /// Applies an atomic operation to `key` for a script; returns the new
    /// value. A script is its bucket admin's code and may set any scope for
    /// itself, so it gets what the operation produced; whether its caller
    /// sees it is the script's decision.
    ///
    /// # Errors
    /// No write permission (a JSON patch, which reads the value, needs read
    /// permission too), an operation that does not apply to the current
    /// value (409), a result over the size limit, or a storage failure.
    pub async fn patch_for_script(&self, key: &Key, op: Op) -> Result<Stored, BucketError> {
        self.apply_op(key, op, None, Condition::Always).await
    }

    async fn apply_op(
        &self,
        key: &Key,
        op: Op,
        ttl_s: Option<u64>,
        condition: Condition,
    ) -> Result<Stored, BucketError> {
        self.require(Permission::Write, key.as_str())?;
        key.check_writable()
            .map_err(|e| BucketError::Invalid(e.to_string()))?;
        if op.reads() && !self.scope.allows(Permission::Read, key.as_str()) {
            // It needs write as well: which keys would do is the write key's
            // answer (found by a review).
            return Err(self.refuse(format!(
                "a JSON patch of key {:?} reads the value (a test, copy, move or remove succeeds or fails on what it holds), so it needs read as well as write (a merge patch needs write only); it",
                key.as_str()
            ), Permission::Write));
        }
        let id = self.bucket.id;
        let etag_key = self.bucket.etag_key;
        let dkey = data_key(&id, key.as_str());
        let default_ttl = self.bucket.policy.default_ttl;
        let limit = self.bucket.buckets.limits.max_value_bytes;
        let op = Arc::new(op);
        if matches!(*op, Op::MergePatch(_) | Op::JsonPatch(_)) && self.is_large(&dkey)? {
            let mut turn = self
                .bucket
                .buckets
                .outside
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| StorageError::Closed)?;
            for _ in 0..OUTSIDE_TRIES {
                let (made, back) = self.make_outside(&dkey, &op, turn).await?;
                turn = back;
                let Some(made) = made else {
                    break;
                };
                if let Some(stored) = self.store_made(&dkey, made, ttl_s, &condition).await? {
                    return Ok(stored);
                }
            }
        }
        self.store()
            .write(move |ctx| -> Result<Stored, BucketError> {
                ensure_bucket(ctx, &id)?;
                let expires_at = expiry(ctx.now_ms(), ttl_s, default_ttl);
                let (version, value) = ctx.update(&dkey, |current| {
                    let current = current.map(Stored::from_entry);
                    condition.check(current.as_ref(), etag_key)?;
                    let value = op.apply(current.map(|c| c.value), limit)?;
                    if value.size() > limit {
                        return Err(BucketError::TooLarge {
                            size: value.size(),
                            limit,
                        });
                    }
                    let (kind, bytes) = value.encode();
                    let new = NewValue {
                        kind,
                        expires_at,
                        value: bytes,
                    };
                    Ok((new, value))
                })??;
                Ok(Stored {
                    value,
                    version,
                    expires_at,
                })
            })
            .await?
    }

    /// Whether the value under `dkey` is large enough for its JSON
    /// operations to be made outside the writer ([`OUTSIDE_BYTES`]).
    fn is_large(&self, dkey: &[u8]) -> Result<bool, BucketError> {
        let current = self.store().snapshot()?.get(dkey)?;
        Ok(current.is_some_and(|e| e.value.len() >= OUTSIDE_BYTES))
    }

    /// [`Scoped::apply_op`] of a JSON operation on a large value, first
    /// step: parsing, changing and writing out a document of megabytes
    /// takes a while, and the writer, which commits every bucket's writes,
    /// would wait for it (a client merging into a 16 MiB document again and
    /// again held up every write of the server by a second each, in a
    /// review). So the new value is made from a snapshot on a blocking
    /// thread ([`Scoped::store_made`] stores it). `None`: no such value
    /// (absent, or under [`OUTSIDE_BYTES`]).
    ///
    /// `turn` is the one-at-a-time permit ([`Buckets::outside`]): the
    /// blocking work holds it and hands it back, so that a caller that goes
    /// away (a client hanging up, a script at its deadline) does not let
    /// the next operation start while this one still holds its document
    /// (found by a review).
    async fn make_outside(
        &self,
        dkey: &[u8],
        op: &Arc<Op>,
        turn: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(Option<Made>, tokio::sync::OwnedSemaphorePermit), BucketError> {
        let current = self.store().snapshot()?.get(dkey)?.map(Stored::from_entry);
        let Some(current) = current.filter(|c| c.value.size() >= OUTSIDE_BYTES) else {
            return Ok((None, turn));
        };
        let based_on = current.version;
        let limit = self.bucket.buckets.limits.max_value_bytes;
        let change = op.clone();
        let (result, turn) = tokio::task::spawn_blocking(move || {
            let made = (|| {
                let value = change.apply(Some(current.value), limit)?;
                if value.size() > limit {
                    return Err(BucketError::TooLarge {
                        size: value.size(),
                        limit,
                    });
                }
                let (kind, bytes) = value.encode();
                Ok((value, kind, bytes))
            })();
            (made, turn)
        })
        .await
        .map_err(|e| StorageError::Engine(format!("a JSON operation's thread failed: {e}")))?;
        Ok((Some(Made { based_on, result }), turn))
    }

    /// Second step of [`Scoped::make_outside`]: the writer stores what was
    /// made only if the key is still at the version it was made from, and
    /// its condition holds. `None`: the key changed meanwhile.
    async fn store_made(
        &self,
        dkey: &[u8],
        made: Made,
        ttl_s: Option<u64>,
        condition: &Condition,
    ) -> Result<Option<Stored>, BucketError> {
        let id = self.bucket.id;
        let etag_key = self.bucket.etag_key;
        let default_ttl = self.bucket.policy.default_ttl;
        let dkey = dkey.to_vec();
        let condition = condition.clone();
        let Made { based_on, result } = made;
        self.store()
            .write(move |ctx| -> Result<Option<Stored>, BucketError> {
                ensure_bucket(ctx, &id)?;
                let expires_at = expiry(ctx.now_ms(), ttl_s, default_ttl);
                // The inner error: `None` when the key has moved on.
                let outcome = ctx.update(&dkey, |now| {
                    let now = now.map(Stored::from_entry);
                    if now.as_ref().map(|c| c.version) != Some(based_on) {
                        return Err(None);
                    }
                    condition.check(now.as_ref(), etag_key).map_err(Some)?;
                    let (value, kind, bytes) = result.map_err(Some)?;
                    let new = NewValue {
                        kind,
                        expires_at,
                        value: bytes,
                    };
                    Ok((new, value))
                })?;
                match outcome {
                    Ok((version, value)) => Ok(Some(Stored {
                        value,
                        version,
                        expires_at,
                    })),
                    Err(None) => Ok(None),
                    Err(Some(e)) => Err(e),
                }
            })
            .await?
    }

    /// Deletes `key`.
    ///
    /// # Errors
    /// No delete permission, a failed condition, the key is absent
    /// ([`BucketError::KeyNotFound`]), or a storage failure.
    pub async fn delete(&self, key: &Key, condition: Condition) -> Result<(), BucketError> {
        self.require(Permission::Delete, key.as_str())?;
        // Refused unread: it can't delete anything, and whether it found
        // the key (412) or not (404) would tell a caller who may not read
        // it (found by a review).
        if matches!(
            condition,
            Condition::IfAbsent | Condition::IfMatchAndAbsent(_)
        ) {
            return Err(Precondition::DeleteIfAbsent.into());
        }
        let id = self.bucket.id;
        let etag_key = self.bucket.etag_key;
        let dkey = data_key(&id, key.as_str());
        let name = key.to_string();
        self.store()
            .write(move |ctx| -> Result<(), BucketError> {
                ensure_bucket(ctx, &id)?;
                let current = ctx.get(&dkey)?.map(Stored::from_entry);
                condition.check(current.as_ref(), etag_key)?;
                if current.is_none() {
                    return Err(BucketError::KeyNotFound(name));
                }
                ctx.delete(&dkey)?;
                Ok(())
            })
            .await?
            .map_err(|e| self.withheld(key, e))
    }

    /// The bytes of values after which a page of a listing ends early:
    /// [`LIST_VALUE_BYTES`], or the value limit if that is larger.
    pub fn list_value_bytes(&self) -> usize {
        LIST_VALUE_BYTES.max(self.bucket.buckets.limits.max_value_bytes)
    }

    /// Lists keys (and values) as `query` asks, confined to what the scope may
    /// enumerate. Blocking: call it off the async threads for large limits.
    ///
    /// A page with values ends early (with `next_start` set, as at its
    /// limit) once it holds [`LIST_VALUE_BYTES`] of them, or the value limit
    /// if that is larger: a page of 10,000 values of 16 MiB would otherwise
    /// be built in memory whole.
    ///
    /// # Errors
    /// No enumerate permission on the prefix (or no read permission when
    /// values are asked for), or a storage failure.
    pub fn list(&self, query: &ListQuery) -> Result<Listing, BucketError> {
        let Some(prefix) = self.scope.listing_prefix(&query.prefix) else {
            return Err(self.refuse(
                format!("enumerate (listing keys) under prefix {:?}", query.prefix),
                Permission::Enumerate,
            ));
        };
        if query.values && !self.scope.allows(Permission::Read, &prefix) {
            // It needs enumerate as well: which keys would do is the
            // secret key's answer (found by a review).
            return Err(self.refuse(
                format!("values=true (read on the keys under prefix {prefix:?})"),
                Permission::Enumerate,
            ));
        }
        self.ensure_exists()?;
        let base = data_prefix(&self.bucket.id);
        let with_base = |s: &str| {
            let mut k = base.clone();
            k.extend_from_slice(s.as_bytes());
            k
        };
        let lo_prefix = with_base(&prefix);
        let hi_prefix = crate::storage::prefix_end(&lo_prefix);
        let start = query.start.as_deref().map(with_base);
        let end = query.end.as_deref().map(with_base);
        let (travel_from, travel_to) = (
            start.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
            end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
        );
        let (lower, upper) = if query.reverse {
            (travel_to, travel_from)
        } else {
            (travel_from, travel_to)
        };
        let lower = lower_max(Bound::Included(&lo_prefix), lower);
        let upper = upper_min(
            hi_prefix
                .as_deref()
                .map_or(Bound::Unbounded, Bound::Excluded),
            upper,
        );
        let mut listing = Listing::default();
        let mut skipped = 0;
        let budget = query.value_bytes.unwrap_or_else(|| self.list_value_bytes());
        let mut value_bytes = 0usize;
        self.store()
            .snapshot()?
            .scan(lower, upper, query.reverse, &mut |k, entry| {
                let Ok(key) = std::str::from_utf8(&k[base.len()..]) else {
                    return true;
                };
                if skipped < query.skip {
                    skipped += 1;
                    return true;
                }
                value_bytes =
                    value_bytes.saturating_add(if query.values { entry.value.len() } else { 0 });
                if listing.entries.len() == query.limit
                    || (value_bytes > budget && !listing.entries.is_empty())
                {
                    listing.next_start = listing.entries.last().map(|(k, _)| k.clone());
                    return false;
                }
                let value = query.values.then(|| Value::decode(entry.kind, entry.value));
                listing.entries.push((key.to_owned(), value));
                true
            })?;
        Ok(listing)
    }

    /// The policy, for the admin.
    ///
    /// # Errors
    /// Not the admin.
    pub fn policy(&self) -> Result<serde_json::Value, BucketError> {
        self.require_admin()?;
        Ok(self.bucket.policy.public_view(&self.bucket.id))
    }

    /// Changes the policy; returns the new one as the admin sees it.
    ///
    /// # Errors
    /// Not the admin, a change that unsets the secret or signing key, or a
    /// storage failure.
    pub async fn update_policy(
        &self,
        change: PolicyChange,
    ) -> Result<serde_json::Value, BucketError> {
        let admin = self.admin_check()?;
        change.check_update()?;
        let id = self.bucket.id;
        let (policy, version) = self
            .store()
            .write_durable(move |ctx| -> Result<_, BucketError> {
                let entry = admin.check(ctx)?;
                let policy = decode_policy(&entry.value)?.apply(change);
                let bytes = encode_policy(&policy)?;
                let version = ctx.put(&policy_key(&id), KIND_POLICY, &bytes, 0)?;
                Ok((policy, version))
            })
            .await??;
        let view = policy.public_view(&id);
        self.bucket
            .buckets
            .remember(id, version, Some(Arc::new(policy)));
        Ok(view)
    }

    /// Deletes the bucket: it is gone at once; its data is purged in the
    /// background, in small steps that never hold up other buckets.
    ///
    /// # Errors
    /// Not the admin, or a storage failure.
    pub async fn delete_bucket(&self) -> Result<(), BucketError> {
        let admin = self.admin_check()?;
        let id = self.bucket.id;
        self.store()
            .write_durable(move |ctx| -> Result<(), BucketError> {
                admin.check(ctx)?;
                ctx.delete(&policy_key(&id))?;
                ctx.purge_prefix(&id.to_bytes())?;
                Ok(())
            })
            .await??;
        self.bucket.buckets.remember(id, u64::MAX, None);
        self.bucket.buckets.scripts.changed();
        self.bucket.buckets.purge_wanted.notify_one();
        Ok(())
    }

    /// This scope, judged again if the bucket's policy changed since it was
    /// authorized, or its token has expired since: the same credentials
    /// under the current policy (a token revoked or run out, a key rotated
    /// or set meanwhile), or the bucket's deletion.
    /// For requests that read a body after their headers were authorized:
    /// a body may trickle in for as long as it keeps coming, and what it
    /// asks must not be done on a credential that was taken back meanwhile.
    ///
    /// # Errors
    /// The bucket is gone, or the credentials no longer open it.
    pub fn reauthorized(mut self) -> Result<Scoped, Reauthorize> {
        if self.credentials.is_none() {
            return Ok(self);
        }
        let buckets = &self.bucket.buckets;
        // A token that ran out while the body came in is judged again too.
        let expired = self
            .scope
            .expires_at
            .is_some_and(|at| now_s(buckets.store.now_ms()) > at);
        if !expired && buckets.policy_version(self.bucket.id) == Some(self.bucket.version) {
            return Ok(self);
        }
        let credentials = self.credentials.take().unwrap_or_default();
        let bucket = buckets.open(self.bucket.id)?;
        Ok(bucket.authorized(credentials)?)
    }

    /// The same bucket seen through another scope. For script runtimes only:
    /// a script (uploaded by the admin) may set its own scope for the rest of
    /// its run, and every later call is checked against that scope.
    #[must_use]
    pub fn rescoped(&self, scope: Scope) -> Scoped {
        self.bucket.clone().scoped(scope)
    }

    /// Issues an access token for `grant`, if this scope holds all of it
    /// (what scripts may hand out); returns the token and its expiry, which
    /// is never later than the scope's own (a token's scope ends with it).
    ///
    /// # Errors
    /// The grant reaches beyond this scope.
    pub fn issue_delegated_token(
        &self,
        grant: &Grant,
        ttl_s: u64,
    ) -> Result<(String, u64), BucketError> {
        check_token_request(grant, ttl_s)?;
        if !self.scope.covers(grant) {
            // The strongest permission asked for says which keys would do.
            let needs = [Permission::Enumerate, Permission::Write, Permission::Delete]
                .into_iter()
                .find(|&p| grant.permissions.has(p))
                .unwrap_or(Permission::Read);
            return Err(self.refuse(
                format!(
                    "issuing a token for {:?} on prefix {:?}",
                    grant.permissions.names(),
                    grant.prefix
                ),
                needs,
            ));
        }
        self.sign_token(grant, ttl_s, self.scope.expires_at)
    }

    fn sign_token(
        &self,
        grant: &Grant,
        ttl_s: u64,
        not_after: Option<u64>,
    ) -> Result<(String, u64), BucketError> {
        let now = now_s(self.store().now_ms());
        let expires_at = now.saturating_add(ttl_s).min(not_after.unwrap_or(u64::MAX));
        let token = auth::token::issue(
            &self.bucket.policy.signing_key,
            &self.bucket.id,
            grant,
            now,
            expires_at,
        )?;
        Ok((token, expires_at))
    }

    /// Issues an access token for `grant`, valid for `ttl_s` seconds; returns
    /// the token and its expiry (Unix seconds). Needs the secret key.
    ///
    /// # Errors
    /// Not the admin.
    pub fn issue_token(&self, grant: &Grant, ttl_s: u64) -> Result<(String, u64), BucketError> {
        self.require_admin()?;
        check_token_request(grant, ttl_s)?;
        self.sign_token(grant, ttl_s, None)
    }
}

/// A policy as stored. Failing is the server's fault (a 500), never the
/// client's.
fn encode_policy(policy: &Policy) -> Result<Vec<u8>, BucketError> {
    serde_json::to_vec(policy)
        .map_err(|e| StorageError::Engine(format!("encoding a policy: {e}")).into())
}

/// What every token request must be, over HTTP and from a script alike: a
/// prefix a key could have, at least one permission, a ttl of 1 second to
/// [`MAX_TOKEN_TTL_S`].
fn check_token_request(grant: &Grant, ttl_s: u64) -> Result<(), BucketError> {
    check_key_text(&grant.prefix)
        .map_err(|e| BucketError::Invalid(format!("a token's prefix: {e}")))?;
    if grant.permissions.is_empty() {
        return Err(BucketError::Invalid(
            "a token's permissions must name at least one of read, write, delete, enumerate".into(),
        ));
    }
    if !(1..=MAX_TOKEN_TTL_S).contains(&ttl_s) {
        return Err(BucketError::Invalid(format!(
            "a token's ttl is a whole number of seconds from 1 to {MAX_TOKEN_TTL_S} (100 years), not {ttl_s}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::memory::MemoryBackend;
    use crate::storage::{Durability, Store};

    /// Buckets over an in-memory store, and one bucket in them.
    async fn one_bucket(max_value_bytes: usize) -> (Arc<Buckets>, BucketId) {
        let store =
            Store::open(Arc::new(MemoryBackend::new()), Durability::Relaxed).expect("store");
        let buckets = Buckets::new(store, Limits { max_value_bytes });
        let (id, _) = buckets
            .create(PolicyChange::default())
            .await
            .expect("create");
        (buckets, id)
    }

    fn change(fields: &[(&str, &str)]) -> PolicyChange {
        PolicyChange::from_fields(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
                .collect(),
        )
        .expect("policy change")
    }

    /// An admin's change authorized before a rotation of the secret key
    /// but written after it is refused in the writer (it would undo the
    /// rotation); one whose key still opens the bucket goes through.
    #[tokio::test]
    async fn an_admin_change_authorized_before_a_rotation_is_judged_again_in_the_writer() {
        let store =
            Store::open(Arc::new(MemoryBackend::new()), Durability::Relaxed).expect("store");
        let buckets = Buckets::new(
            store,
            Limits {
                max_value_bytes: 1 << 20,
            },
        );
        let (id, _) = buckets
            .create(change(&[("secret_key", "old")]))
            .await
            .expect("create");
        let as_admin = |key: &str| {
            buckets
                .open(id)
                .expect("open")
                .authorized(vec![key.to_owned()])
                .expect("admin")
        };
        let stale = as_admin("old");
        let stale_too = as_admin("old");
        as_admin("old")
            .update_policy(change(&[("secret_key", "new")]))
            .await
            .expect("rotate");
        let refused = stale
            .update_policy(change(&[("secret_key", "old-again")]))
            .await;
        assert!(
            matches!(refused, Err(BucketError::Unauthorized(_))),
            "{refused:?}"
        );
        assert!(matches!(
            stale_too.delete_bucket().await,
            Err(BucketError::Unauthorized(_))
        ));
        // The rotation stands.
        assert_eq!(
            buckets
                .open(id)
                .expect("open")
                .policy()
                .secret_key
                .as_deref(),
            Some("new")
        );
        // A scope authorized before a change that leaves its key valid is
        // still the admin's.
        let before = as_admin("new");
        as_admin("new")
            .update_policy(change(&[("default_ttl", "60")]))
            .await
            .expect("default_ttl");
        before
            .update_policy(change(&[("read_key", "r")]))
            .await
            .expect("a change by a key that still opens the bucket");
    }

    #[tokio::test]
    async fn a_json_operation_made_outside_the_writer_is_stored_on_its_version_only() {
        let (buckets, id) = one_bucket(1 << 20).await;
        let admin = buckets.open(id).expect("open").scoped(Scope::admin());
        let doc = |n: i64| {
            let pad = "x".repeat(OUTSIDE_BYTES);
            Value::Json(
                serde_json::json!({"n": n, "pad": pad})
                    .to_string()
                    .into_bytes(),
            )
        };
        let key = Key::new("doc").expect("key");
        let dkey = data_key(&id, "doc");
        admin
            .set(&key, doc(1), None, Condition::Always)
            .await
            .expect("set");
        let op = Arc::new(Op::MergePatch(serde_json::json!({"m": 2})));
        let turn = || buckets.outside.clone().try_acquire_owned().expect("turn");
        let (made, _) = admin.make_outside(&dkey, &op, turn()).await.expect("make");
        let made = made.expect("a large value");
        // Another write meanwhile: what was made from the old version is
        // not stored.
        admin
            .set(&key, doc(5), None, Condition::Always)
            .await
            .expect("set");
        let stale = admin
            .store_made(&dkey, made, None, &Condition::Always)
            .await;
        assert!(stale.expect("store").is_none(), "stored over a newer value");
        // Made again from the new version, it is.
        let (made, _) = admin.make_outside(&dkey, &op, turn()).await.expect("make");
        let stored = admin
            .store_made(
                &dkey,
                made.expect("a large value"),
                None,
                &Condition::Always,
            )
            .await
            .expect("store")
            .expect("stored");
        let now = stored.value.to_json().expect("JSON");
        assert_eq!((now["n"].clone(), now["m"].clone()), (5.into(), 2.into()));
        // A failed condition is checked against the value it would replace.
        let (made, _) = admin.make_outside(&dkey, &op, turn()).await.expect("make");
        let refused = admin
            .store_made(
                &dkey,
                made.expect("a large value"),
                None,
                &Condition::IfAbsent,
            )
            .await;
        assert!(matches!(refused, Err(BucketError::PreconditionFailed(_))));
        // A small value is left to the writer.
        let small = Key::new("small").expect("key");
        admin
            .set(&small, Value::Json(b"{}".to_vec()), None, Condition::Always)
            .await
            .expect("set");
        let made = admin
            .make_outside(&data_key(&id, "small"), &op, turn())
            .await;
        assert!(made.expect("make").0.is_none());
    }

    /// A JSON operation on a large value whose caller goes away (a client
    /// hanging up, a script at its deadline) keeps its turn until its
    /// blocking work ends: the next one does not start beside it, holding
    /// another document (found by a review).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_json_operation_on_a_large_value_keeps_its_turn_until_made() {
        let (buckets, id) = one_bucket(64 << 20).await;
        let admin = buckets.open(id).expect("open").scoped(Scope::admin());
        let key = Key::new("doc").expect("key");
        let mut doc = b"{\"a\":[".to_vec();
        doc.extend(b"0,".repeat(2_000_000));
        doc.extend(b"0]}");
        admin
            .set(&key, Value::Json(doc), None, Condition::Always)
            .await
            .expect("set");
        let merge = admin.patch_for_script(&key, Op::MergePatch(serde_json::json!({"m": 1})));
        let gone = tokio::time::timeout(std::time::Duration::from_millis(5), merge).await;
        assert!(
            gone.is_err(),
            "the merge was made within 5 ms: this proves nothing"
        );
        assert_eq!(
            buckets.outside.available_permits(),
            0,
            "the turn was given back while the merge was still being made"
        );
        for _ in 0..600 {
            if buckets.outside.available_permits() == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the turn was never given back");
    }

    #[test]
    fn etags_are_keyed_by_the_store_secret_and_the_bucket() {
        let (one, other) = (BucketId::random(), BucketId::random());
        let a = EtagKey::of(&[1; 32], &one);
        assert_eq!(a.etag(7), EtagKey::of(&[1; 32], &one).etag(7), "stable");
        assert_ne!(a.etag(7), EtagKey::of(&[2; 32], &one).etag(7), "keyed");
        assert_ne!(
            a.etag(7),
            EtagKey::of(&[1; 32], &other).etag(7),
            "per bucket"
        );
        let tags: std::collections::HashSet<String> = (0..10_000).map(|v| a.etag(v)).collect();
        assert_eq!(tags.len(), 10_000, "one per version");
        for tag in [a.etag(1), a.etag(2)] {
            assert_eq!(tag.len(), 18, "{tag}");
            assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
            assert_ne!(tag, "\"1\"");
        }
    }

    #[tokio::test]
    async fn a_handle_opened_before_its_bucket_was_deleted_reads_nothing() {
        // As a script run does: its handle lives on while the bucket is
        // deleted. No purge runs here (no background task), so the entries
        // are still in the store.
        let (buckets, id) = one_bucket(1024).await;
        let key = Key::new("k").expect("key");
        let admin = buckets.open(id).expect("open").scoped(Scope::admin());
        admin
            .set(&key, Value::Int(1), None, Condition::Always)
            .await
            .expect("set");
        let running = buckets.open(id).expect("open").scoped(Scope::admin());
        assert!(running.get(&key).expect("get").is_some());
        admin.delete_bucket().await.expect("delete");
        assert!(matches!(running.get(&key), Err(BucketError::NotFound)));
        assert!(matches!(
            running.list(&ListQuery {
                limit: 10,
                ..ListQuery::default()
            }),
            Err(BucketError::NotFound)
        ));
        assert!(matches!(
            running
                .set(&key, Value::Int(2), None, Condition::Always)
                .await,
            Err(BucketError::NotFound)
        ));
    }
}

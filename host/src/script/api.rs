//! The host API that every script runtime calls: one Rust function per data
//! operation, so Lua and WebAssembly cannot drift apart.
//!
//! Every call goes through the run's [`Scoped`] bucket, the one authorization
//! point. Errors come back as [`CallError`], a value the script receives and
//! can act on; a denied call never aborts the run by itself.

use crate::bucket::{
    BucketError, Condition, Grant, Key, ListQuery, Number, Op, Permission, Permissions, Principal,
    Scope, Scoped, Value,
};

/// An error a script receives from a data call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("not found")]
    NotFound,
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("type mismatch: {0}")]
    TypeMismatch(String),
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<BucketError> for CallError {
    fn from(e: BucketError) -> Self {
        match e {
            BucketError::NotFound
            | BucketError::KeyNotFound(_)
            | BucketError::ScriptNotFound(_) => CallError::NotFound,
            BucketError::Unauthorized(m) | BucketError::Forbidden(m) => {
                CallError::PermissionDenied(m)
            }
            BucketError::Conflict(c) => CallError::TypeMismatch(c.to_string()),
            BucketError::PreconditionFailed(m) => CallError::TypeMismatch(m.to_string()),
            BucketError::TooLarge { .. } | BucketError::ResultTooLarge { .. } => {
                CallError::Limit(e.to_string())
            }
            BucketError::Policy(_) | BucketError::Invalid(_) => CallError::Invalid(e.to_string()),
            BucketError::Token(_) | BucketError::Storage(_) => {
                tracing::error!(error = %e, "script data call failed");
                CallError::Internal("the server failed to complete the call".into())
            }
        }
    }
}

/// Options of a listing from a script.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub limit: Option<usize>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub reverse: bool,
    pub values: bool,
}

/// Most keys one script listing returns: scripts page with `start`.
pub const MAX_LIST: usize = 10_000;

/// The first this many keys of a listing are read on the thread the script
/// runs on; the rest in `block_in_place` (a key costs about a microsecond).
const INLINE_LIST: usize = 1000;

/// A write a synchronous caller (a Lua run) started and waits for where
/// it can: not ready at its first poll (see [`Write`]).
pub type PendingWrite =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CallError>> + Send>>;

/// A write from a synchronous caller, after its first poll: most are done
/// then (a relaxed write committed inline); one waiting for its commit is
/// for the caller to wait for, on its worker without holding it (a Lua run
/// suspends itself until it is done) or on its thread ([`Host::wait_write`]).
pub enum Write {
    Done(Result<(), CallError>),
    Pending(PendingWrite),
}

/// The scoped bucket of one run, with the calls a script can make.
pub struct Host {
    /// Shared with the writes a Lua run started ([`Write`]), which outlive
    /// the call that started them.
    scoped: std::sync::Arc<Scoped>,
    runtime: tokio::runtime::Handle,
    /// A data call of this run had to wait on its thread (see
    /// [`Host::wait_write`]).
    waited: std::sync::atomic::AtomicBool,
    /// When the run's time is up: a call waiting for the store stops
    /// waiting then ([`Host::wait_write`]).
    deadline: Option<tokio::time::Instant>,
    /// A call stopped waiting at the deadline: the run is over its time,
    /// whatever the script does next.
    timed_out: std::sync::atomic::AtomicBool,
}

fn key(k: &str) -> Result<Key, CallError> {
    Key::new(k).map_err(|e| CallError::Invalid(e.to_string()))
}

impl Host {
    /// `runtime` drives the store's async writes. The run itself may be on
    /// one of its worker threads or on a blocking thread (see
    /// `Host::wait_write`).
    pub fn new(scoped: Scoped, runtime: tokio::runtime::Handle) -> Self {
        Self {
            scoped: std::sync::Arc::new(scoped),
            runtime,
            waited: std::sync::atomic::AtomicBool::new(false),
            deadline: None,
            timed_out: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a data call of this run stopped waiting for the store at the
    /// run's deadline: the run ends with its time limit.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The same host for a run whose time is up at `deadline`: set by the
    /// runtime as the run starts.
    #[must_use]
    pub fn with_deadline(mut self, deadline: tokio::time::Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Whether a data call of this run had to wait for the store on its
    /// thread ([`Host::wait_write`]): such a run is better off on a blocking
    /// thread than on an async worker.
    pub fn waited(&self) -> bool {
        self.waited.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bucket's value size limit: the most a script may hand over as one
    /// value.
    pub fn max_value_bytes(&self) -> usize {
        self.scoped.bucket().max_value_bytes()
    }

    /// The error of a write whose run's time ran out while it waited for
    /// the store; the run ends with its time limit ([`Host::timed_out`]).
    pub fn write_timed_out(&self) -> CallError {
        self.timed_out
            .store(true, std::sync::atomic::Ordering::Relaxed);
        CallError::Limit(
            "the script's time limit ran out while this write waited for the store (it may still be applied)"
                .into(),
        )
    }

    /// Waits on this thread for a [`Write::Pending`] of a synchronous
    /// caller that can't suspend itself (a Lua run inside a function called
    /// from C, or on a blocking thread), in
    /// [`tokio::task::block_in_place`], so that a run on a worker thread
    /// hands that worker's other tasks to another thread instead of stalling
    /// them (and its script's later runs start on a blocking thread:
    /// [`Host::waited`]). On a blocking thread `block_in_place` just runs
    /// the closure.
    ///
    /// The wait ends at the run's deadline: while the thread waits here no
    /// script code runs, so the Lua hook can't stop the run (a guest's merge
    /// queued behind 30 large merges answered after 12 s with a 1 s limit,
    /// holding its state and a thread; found by a review). The call then
    /// fails with a limit error, and the run ends with its time limit
    /// ([`Host::timed_out`]).
    ///
    /// # Errors
    /// The write's error, or the run's time ran out.
    pub fn wait_write(&self, mut write: PendingWrite) -> Result<(), CallError> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(out) = write.as_mut().poll(&mut cx) {
            return out;
        }
        self.waited
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let Some(deadline) = self.deadline else {
            return tokio::task::block_in_place(|| self.runtime.block_on(write));
        };
        tokio::task::block_in_place(|| {
            self.runtime
                .block_on(tokio::time::timeout_at(deadline, write))
        })
        .map_err(|_| self.write_timed_out())?
    }

    /// The value under `key`, if any.
    ///
    /// # Errors
    /// Permission denied, an invalid key, or an internal failure.
    pub fn get(&self, k: &str) -> Result<Option<Value>, CallError> {
        Ok(self.scoped.get(&key(k)?)?.map(|s| s.value))
    }

    /// Whether `key` holds a value (needs `read`).
    ///
    /// # Errors
    /// As [`Host::get`].
    pub fn exists(&self, k: &str) -> Result<bool, CallError> {
        Ok(self.scoped.get(&key(k)?)?.is_some())
    }

    /// Sets `key`; `ttl` in seconds (0: never), else the bucket's default.
    /// For a caller that awaits the write's commit (a WebAssembly guest, on
    /// a fiber: the run is suspended meanwhile and its thread serves other
    /// requests); a synchronous caller starts it with [`Host::start_write`].
    /// The run's time limit is the caller's to enforce.
    ///
    /// # Errors
    /// Permission denied, an invalid key, a value over the size limit.
    pub async fn set_async(
        &self,
        k: &str,
        value: Value,
        ttl: Option<u64>,
    ) -> Result<(), CallError> {
        let k = key(k)?;
        self.scoped
            .set(&k, value, ttl, Condition::Always)
            .await
            .map(drop)
            .map_err(CallError::from)
    }

    /// Deletes `key`; `false` if it was absent (awaited: see
    /// [`Host::set_async`]).
    ///
    /// # Errors
    /// Permission denied, an invalid key.
    pub async fn delete_async(&self, k: &str) -> Result<bool, CallError> {
        let k = key(k)?;
        match self.scoped.delete(&k, Condition::Always).await {
            Ok(()) => Ok(true),
            Err(BucketError::KeyNotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// An atomic operation on `key`; the new value.
    async fn op(&self, k: &str, op: Op) -> Result<Value, CallError> {
        let k = key(k)?;
        Ok(self.scoped.patch_for_script(&k, op).await?.value)
    }

    /// Adds `n` atomically (a missing key counts as 0); the new value
    /// (awaited: see [`Host::set_async`]).
    ///
    /// # Errors
    /// Permission denied, a non-numeric value, overflow.
    pub async fn incr_async(&self, k: &str, n: Number) -> Result<Value, CallError> {
        self.op(k, Op::Add(n)).await
    }

    /// A JSON argument given as text (a merge or JSON patch), read. Text
    /// over the value size limit is refused unread: the document it builds
    /// takes up to 16 times the text, outside a script's memory limit
    /// (found by a review).
    ///
    /// # Errors
    /// Text over the limit, or not JSON.
    pub fn json_arg(&self, text: &[u8]) -> Result<serde_json::Value, CallError> {
        let limit = self.max_value_bytes();
        if text.len() > limit {
            return Err(CallError::Limit(format!(
                "the JSON text is {} bytes, over the value size limit ({limit} bytes)",
                text.len()
            )));
        }
        serde_json::from_slice(text).map_err(|e| CallError::Invalid(format!("not JSON: {e}")))
    }

    /// RFC 7396 merge into a JSON value; the new value (awaited: see
    /// [`Host::set_async`]).
    ///
    /// # Errors
    /// Permission denied, a non-JSON value.
    pub async fn merge_async(&self, k: &str, patch: serde_json::Value) -> Result<Value, CallError> {
        self.op(k, Op::MergePatch(patch)).await
    }

    /// RFC 6902 patch of a JSON value; the new value (awaited: see
    /// [`Host::set_async`]). A JSON patch reads the value (it fails or not
    /// on the paths the document holds), so it needs read permission too.
    ///
    /// # Errors
    /// Permission denied, a malformed patch, a failed `test`.
    pub async fn patch_async(&self, k: &str, patch: serde_json::Value) -> Result<Value, CallError> {
        let patch = serde_json::from_value(patch)
            .map_err(|e| CallError::Invalid(format!("not a JSON patch: {e}")))?;
        self.op(k, Op::JsonPatch(patch)).await
    }

    /// Appends bytes to a raw value; the new value (awaited: see
    /// [`Host::set_async`]).
    ///
    /// # Errors
    /// Permission denied, a non-raw value, the size limit.
    pub async fn append_async(&self, k: &str, bytes: Vec<u8>) -> Result<Value, CallError> {
        self.op(
            k,
            Op::Append {
                bytes,
                media_type: None,
            },
        )
        .await
    }

    /// Starts a write for a synchronous caller (a Lua run), one of the
    /// `*_async` calls: `write` gets a copy of this host (the same scope,
    /// deadline and runtime) for the write to keep, as it may outlive the
    /// call that started it. Its first poll tells whether it is done, or to
    /// wait for (see [`Write`]).
    pub fn start_write<F>(&self, write: impl FnOnce(Host) -> F) -> Write
    where
        F: std::future::Future<Output = Result<(), CallError>> + Send + 'static,
    {
        let mut write: PendingWrite = Box::pin(write(Self {
            scoped: std::sync::Arc::clone(&self.scoped),
            runtime: self.runtime.clone(),
            waited: std::sync::atomic::AtomicBool::new(false),
            deadline: self.deadline,
            timed_out: std::sync::atomic::AtomicBool::new(false),
        }));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match write.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(done) => Write::Done(done),
            std::task::Poll::Pending => Write::Pending(write),
        }
    }

    /// Keys (and values) under `prefix`, in byte order; a page ends early
    /// once it holds [`crate::bucket::LIST_VALUE_BYTES`] of values.
    ///
    /// # Errors
    /// Permission denied (`enumerate`; `read` too with values).
    pub fn list(
        &self,
        prefix: &str,
        opts: ListOptions,
    ) -> Result<Vec<(String, Option<Value>)>, CallError> {
        let query = ListQuery {
            prefix: prefix.to_owned(),
            start: opts.start,
            end: opts.end,
            reverse: opts.reverse,
            limit: opts.limit.unwrap_or(MAX_LIST).min(MAX_LIST),
            skip: 0,
            values: opts.values,
            value_bytes: None,
        };
        // The first INLINE_LIST keys on this thread; a longer scan is
        // blocking work, continued in `block_in_place` (off the async worker,
        // as a write that waits: see `wait_write`).
        let limit = query.limit;
        let first = ListQuery {
            limit: limit.min(INLINE_LIST),
            ..query.clone()
        };
        let mut listing = self.scoped.list(&first)?;
        // One listing, one budget of values: the second page gets what the
        // first left (it had a whole budget of its own, so one call could
        // build twice as much; found by a review).
        let left = self.scoped.list_value_bytes().saturating_sub(
            listing
                .entries
                .iter()
                .filter_map(|(_, v)| v.as_ref().map(Value::size))
                .sum(),
        );
        if let Some(next) = listing.next_start.take()
            && limit > INLINE_LIST
            && listing.entries.len() == INLINE_LIST
            && left > 0
        {
            let rest = ListQuery {
                start: Some(next),
                limit: limit - INLINE_LIST,
                value_bytes: Some(left),
                ..query
            };
            let more = tokio::task::block_in_place(|| self.scoped.list(&rest))?;
            listing.entries.extend(more.entries);
        }
        Ok(listing.entries)
    }

    /// A token for `prefix` and `permissions`, valid `ttl` seconds, within
    /// what the current scope holds; the token and its expiry.
    ///
    /// # Errors
    /// The grant reaches beyond the current scope, or invalid input.
    pub fn access_token(
        &self,
        prefix: &str,
        permissions: Permissions,
        ttl: u64,
    ) -> Result<(String, u64), CallError> {
        let grant = Grant {
            prefix: prefix.to_owned(),
            permissions,
        };
        Ok(self.scoped.issue_delegated_token(&grant, ttl)?)
    }

    /// The scope as a script sees it: a prefix (the shortest of the
    /// scope's grants) and the permissions that hold on every key under it.
    /// A caller's scope can have more than one grant (what the bucket leaves
    /// open and what a token adds); a permission granted only under a longer
    /// prefix is left out, so that a script assigning just the prefix (or
    /// just the permissions) never gets a right its caller had only on
    /// other keys.
    pub fn scope(&self) -> (String, Permissions) {
        let scope = self.scoped.scope();
        let prefix = scope
            .grants
            .iter()
            .map(|g| g.prefix.as_str())
            .min_by_key(|p| p.len())
            .unwrap_or("")
            .to_owned();
        let permissions = scope
            .grants
            .iter()
            .filter(|g| prefix.starts_with(&g.prefix))
            .fold(Permissions::NONE, |acc, g| {
                g.permissions.iter().fold(acc, Permissions::with)
            });
        (prefix, permissions)
    }

    /// Replaces the scope for the rest of the run: every later call is
    /// checked against `prefix` and `permissions` alone. The caller's
    /// credential still ends when it ends: tokens the script hands on
    /// expire no later.
    ///
    /// # Errors
    /// A prefix that no key could have.
    pub fn set_scope(&mut self, prefix: &str, permissions: Permissions) -> Result<(), CallError> {
        crate::bucket::check_key_text(prefix).map_err(|e| CallError::Invalid(e.to_string()))?;
        self.scoped = std::sync::Arc::new(self.scoped.rescoped(Scope {
            admin: false,
            grants: vec![Grant {
                prefix: prefix.to_owned(),
                permissions,
            }],
            principal: Principal::Script,
            expires_at: self.scoped.scope().expires_at,
        }));
        Ok(())
    }
}

/// Parses permission names as scripts give them.
///
/// # Errors
/// An unknown name.
pub fn permissions<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Permissions, CallError> {
    names.into_iter().try_fold(Permissions::NONE, |acc, n| {
        n.parse::<Permission>()
            .map(|p| acc.with(p))
            .map_err(CallError::Invalid)
    })
}

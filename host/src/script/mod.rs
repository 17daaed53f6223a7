//! Scripts: what a run gets (a [`Request`]), what it gives back (a
//! [`Response`]), its [`Limits`], how it fails ([`ScriptError`]), and the
//! [`api::Host`] that every runtime calls for every data operation.
//!
//! Runtimes (`lua`, `wasm`) own their interpreters and sandboxes and
//! translate values; they never touch storage or decide permissions: all data
//! calls go through [`api::Host`], which goes through the run's
//! [`Scoped`](crate::bucket::Scoped) bucket. A run starts on the async
//! worker that took the request and moves to a blocking thread if it runs
//! longer than [`INLINE_SLICE`] (see [`lua`] and [`wasm`] for how each
//! runtime suspends a run); Lua scripts whose runs do not fit are remembered
//! in [`SlowScripts`] and start on a blocking thread for a while (a
//! WebAssembly run can always be suspended, so its scripts are not). Each
//! runtime holds its runs in flight, and each bucket's, to [`RunShares`].

pub mod api;
pub mod lua;
pub mod wasm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bucket::BucketId;

/// The HTTP statuses a script may answer: final ones. An informational
/// status (1xx) is not a response (hyper would answer it with an empty 500,
/// and 101 would switch the connection away from HTTP).
pub const ANSWERABLE_STATUS: std::ops::RangeInclusive<u16> = 200..=599;

/// Gives a script's response the type of plain text if the script set no
/// `Content-Type` (both runtimes; one without content loses it when it is
/// sent, in `http::scripts`).
pub(crate) fn default_content_type(headers: &mut Vec<(String, String)>) {
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type".into(), "text/plain; charset=utf-8".into()));
    }
}

/// Refuses a status a script may not answer ([`ANSWERABLE_STATUS`]), saying
/// which ones it may.
///
/// # Errors
/// The status is outside [`ANSWERABLE_STATUS`].
pub fn check_status(code: u16) -> Result<(), String> {
    if ANSWERABLE_STATUS.contains(&code) {
        Ok(())
    } else {
        Err(format!(
            "invalid HTTP status {code}: a script answers 200 to 599"
        ))
    }
}

/// Response headers a script may not set: the server frames the response
/// (and the hop-by-hop ones are the connection's, not the response's).
const RESERVED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "trailer",
    "te",
    "proxy-connection",
];

/// Response headers that act on the whole origin (or beyond) rather than on
/// the page: every bucket's scripts share this origin, so a script may not
/// set cookies for the others, clear their site data, have the browser
/// report later requests (with their `?key=`) elsewhere, pin HTTPS or an
/// alternative service for the host, widen a service worker's scope, or ask
/// for a login; nor may it give orders to a reverse proxy in front of the
/// server (nginx's `X-Accel-*`, which [`check_header`] refuses by prefix,
/// and the `X-Sendfile` family: serving files or internal locations).
const ORIGIN_WIDE_HEADERS: &[&str] = &[
    "set-cookie",
    "set-cookie2",
    "clear-site-data",
    "nel",
    "report-to",
    "reporting-endpoints",
    "strict-transport-security",
    "expect-ct",
    "public-key-pins",
    "public-key-pins-report-only",
    "alt-svc",
    "accept-ch",
    "accept-ch-lifetime",
    "critical-ch",
    "origin-agent-cluster",
    "service-worker-allowed",
    "set-login",
    "sec-session-registration",
    "attribution-reporting-register-source",
    "attribution-reporting-register-trigger",
    "shared-storage-write",
    "observe-browsing-topics",
    "www-authenticate",
    "proxy-authenticate",
    "access-control-allow-credentials",
    "x-sendfile",
    "x-sendfile2",
    "x-lighttpd-send-file",
];

/// The most headers a script's response may carry, and their total size
/// (names and values): beyond, the run ends with the response limit.
pub const MAX_RESPONSE_HEADERS: usize = 100;
pub const MAX_RESPONSE_HEADER_BYTES: usize = 64 * 1024;

/// A response header a script set, as it will be sent: its lower-case
/// name; or why it can't be sent (an invalid name or value, or one the
/// server sets). The same check for every runtime.
///
/// # Errors
/// The message, naming the header.
pub fn check_header(name: &str, value: &str) -> Result<String, String> {
    let shown: String = name.chars().take(64).collect();
    let lower = name.to_ascii_lowercase();
    if axum::http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        return Err(format!("invalid header name {shown:?}"));
    }
    if axum::http::HeaderValue::from_str(value).is_err() {
        return Err(format!(
            "invalid value of the header {shown:?} (control characters such as a line break?)"
        ));
    }
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!("the header {shown:?} is set by the server"));
    }
    if ORIGIN_WIDE_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-accel-") {
        return Err(format!(
            "the header {shown:?} is not allowed: it would act on every bucket's scripts, which share this origin"
        ));
    }
    Ok(lower)
}

/// Refuses more than [`MAX_RESPONSE_HEADERS`] headers or more than
/// [`MAX_RESPONSE_HEADER_BYTES`] of them.
///
/// # Errors
/// The limit's detail.
pub fn check_header_total(headers: &[(String, String)]) -> Result<(), String> {
    let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if headers.len() > MAX_RESPONSE_HEADERS || bytes > MAX_RESPONSE_HEADER_BYTES {
        return Err(format!(
            "the response has {} headers of {bytes} bytes; the limit is {MAX_RESPONSE_HEADERS} headers of {MAX_RESPONSE_HEADER_BYTES} bytes",
            headers.len()
        ));
    }
    Ok(())
}

/// Loads a script's source, for a runtime that has not compiled it yet.
pub type SourceLoader<'a> = &'a (dyn Fn() -> Result<Vec<u8>, ScriptError> + Sync);

/// The script runtimes of a server and the limits they enforce.
pub struct Runtimes {
    pub limits: Limits,
    pub lua: lua::LuaRuntime,
    pub wasm: wasm::WasmRuntime,
}

impl Runtimes {
    /// Runtimes enforcing `limits`; compiled WebAssembly is also kept in the
    /// directory `compiled` if given (see [`wasm::WasmRuntime::new`]).
    ///
    /// # Errors
    /// The WebAssembly engine can't be set up.
    pub fn new(limits: Limits, compiled: Option<&std::path::Path>) -> Result<Self, ScriptError> {
        Ok(Self {
            limits,
            lua: lua::LuaRuntime::new(limits),
            wasm: wasm::WasmRuntime::new(limits, compiled)?,
        })
    }
}

/// Runs of one runtime in flight at once, in all and per bucket: a run
/// takes a [`RunShare`] before it starts and gives it back when it ends.
///
/// A runtime holds at most `total` runs (the WebAssembly pool's slots; for
/// Lua, the states and threads that runs waiting on a blocking thread hold),
/// and one bucket at most a quarter of them, so that a bucket whose scripts
/// are slow, or flooded, gets 503s (`script-busy`, with `Retry-After`), not
/// every other bucket. A run beyond either is refused at once, not queued.
pub struct RunShares {
    counts: Arc<Mutex<RunCounts>>,
    /// "Lua" or "WebAssembly", for the messages.
    runtime: &'static str,
    total: u32,
    per_bucket: u32,
}

#[derive(Default)]
struct RunCounts {
    total: u32,
    buckets: HashMap<BucketId, u32>,
}

/// One run's place among its runtime's runs, given back when dropped.
pub struct RunShare {
    counts: Arc<Mutex<RunCounts>>,
    bucket: BucketId,
}

fn lock_counts(counts: &Mutex<RunCounts>) -> std::sync::MutexGuard<'_, RunCounts> {
    counts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RunShares {
    /// At most `total` runs in flight (held to [`RUNS_RANGE`]), a quarter
    /// of them per bucket.
    pub fn new(runtime: &'static str, total: u32) -> Self {
        let total = runs_in_range(total);
        Self {
            counts: Arc::default(),
            runtime,
            total,
            per_bucket: total / 4,
        }
    }

    /// Runs the runtime may have in flight at once.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Runs one bucket may have in flight at once.
    pub fn per_bucket(&self) -> u32 {
        self.per_bucket
    }

    /// A place for one more run of `bucket`.
    ///
    /// # Errors
    /// [`ScriptError::Busy`]: the bucket has its whole share in flight, or
    /// the runtime all its runs.
    pub fn take(&self, bucket: BucketId) -> Result<RunShare, ScriptError> {
        let mut counts = lock_counts(&self.counts);
        if counts.total >= self.total {
            return Err(ScriptError::Busy(format!(
                "the server already has {} {} script runs in flight: retry in a moment",
                self.total, self.runtime
            )));
        }
        let n = counts.buckets.entry(bucket).or_insert(0);
        if *n >= self.per_bucket {
            return Err(ScriptError::Busy(format!(
                "this bucket already has {} {} script runs in flight: retry in a moment",
                self.per_bucket, self.runtime
            )));
        }
        *n += 1;
        counts.total += 1;
        Ok(RunShare {
            counts: self.counts.clone(),
            bucket,
        })
    }
}

impl Drop for RunShare {
    fn drop(&mut self) {
        let mut counts = lock_counts(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.buckets.get_mut(&self.bucket) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.buckets.remove(&self.bucket);
            }
        }
    }
}

/// How long a run may execute on the async worker that took its request
/// before it moves to a blocking thread: long enough for a typical script,
/// short enough not to hold up the worker's other requests noticeably.
pub const INLINE_SLICE: Duration = Duration::from_micros(200);

/// How long a script stays known as slow: then one run tries the worker
/// again (load changes: a write that waited under load may not when idle).
const SLOW_FOR: Duration = Duration::from_secs(1);

/// Scripts known as slow past which the set starts over.
const MAX_SLOW_SCRIPTS: usize = 4096;

/// Lua scripts (by the digest of their code) whose recent runs did not fit on
/// an async worker: the hook found one past [`INLINE_SLICE`] where it could
/// not suspend it, or two runs within a second held it 1 ms of CPU time, or
/// one waited on the worker's thread (for a write where it could not be
/// suspended, or in a library call past its slice). Their runs start on a blocking thread
/// for a second (`SLOW_FOR`).
#[derive(Default)]
pub struct SlowScripts {
    scripts: Mutex<HashMap<[u8; 32], Instant>>,
    /// Whether `scripts` may hold anything: most of the time it is empty,
    /// and a run then looks no further (no lock).
    any: AtomicBool,
}

impl SlowScripts {
    /// Whether runs of `digest` should start on a blocking thread.
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut slow = self
            .scripts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match slow.get(digest) {
            Some(since) if since.elapsed() < SLOW_FOR => true,
            Some(_) => {
                // Give it a run on the worker; it is marked again if it is
                // still slow.
                slow.remove(digest);
                self.any.store(!slow.is_empty(), Ordering::Release);
                false
            }
            None => false,
        }
    }

    /// A run of `digest` did not fit on an async worker.
    pub fn mark(&self, digest: [u8; 32]) {
        let mut slow = self
            .scripts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slow.len() >= MAX_SLOW_SCRIPTS {
            slow.clear();
        }
        slow.insert(digest, Instant::now());
        self.any.store(true, Ordering::Release);
    }
}

/// `BUCKET/SCRIPT` for the log, formatted only when something is logged.
pub struct Label(crate::bucket::BucketId, crate::bucket::ScriptName);

impl Label {
    pub fn of(script: &crate::bucket::StoredScript) -> Self {
        Self(script.bucket, script.name.clone())
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// The limits of one run. Each stops only the offending run, with a
/// [`ScriptError::Limit`] that names it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time of a run.
    pub time: Duration,
    /// Lua VM instructions of a run.
    pub instructions: u64,
    /// WebAssembly fuel of a run (about one unit per instruction).
    pub fuel: u64,
    /// Memory a run may allocate beyond what its runtime already holds.
    pub memory_bytes: usize,
    /// Bytes of response body a run may produce.
    pub response_bytes: usize,
    /// Largest Lua source accepted on upload.
    pub source_bytes: usize,
    /// Largest WebAssembly component accepted on upload (a Python guest
    /// carries its interpreter: ~18 MB).
    pub component_bytes: usize,
    /// Runs in flight at once per runtime; a quarter of them per bucket
    /// (see [`RunShares`]). The WebAssembly pool has as many slots.
    pub runs: u32,
}

/// Default [`Limits::runs`]: above the number of threads that run scripts at
/// once on this class of machine.
pub const DEFAULT_RUNS: u32 = 256;

/// The range of [`Limits::runs`]: at least one run per bucket; at most
/// 1024, for which the WebAssembly pool reserves 2048 linear-memory slots of
/// ~4 GiB of address space each (reserved, not used).
pub const RUNS_RANGE: std::ops::RangeInclusive<u32> = 4..=1024;

/// Blocking threads the server keeps beyond those its script runs may hold.
const SPARE_BLOCKING_THREADS: usize = 128;

/// `runs` held to [`RUNS_RANGE`] (the flag is; a library caller might not
/// be).
fn runs_in_range(runs: u32) -> u32 {
    runs.clamp(*RUNS_RANGE.start(), *RUNS_RANGE.end())
}

/// The blocking threads a server with `runs` runs in flight per runtime
/// needs: one for every run of both runtimes (each may go on on one), and
/// [`SPARE_BLOCKING_THREADS`] for the rest of the server's blocking work
/// (listings, JSON operations, uploads, writes waiting in
/// `block_in_place`), which runs then can't take.
pub fn blocking_threads(runs: u32) -> usize {
    2 * runs_in_range(runs) as usize + SPARE_BLOCKING_THREADS
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(1),
            instructions: 50_000_000,
            fuel: 500_000_000,
            memory_bytes: 32 * 1024 * 1024,
            response_bytes: 1024 * 1024,
            source_bytes: 256 * 1024,
            component_bytes: 64 * 1024 * 1024,
            runs: DEFAULT_RUNS,
        }
    }
}

impl Limits {
    /// What a run stopped at its time limit is told (either runtime,
    /// however it was stopped).
    pub fn time_detail(&self) -> String {
        format!(
            "the script ran longer than {} ms: {TIME_HINT}",
            self.time.as_millis()
        )
    }
}

/// What to do about a limit, added to its error (either runtime): the run's
/// own share of work, and the flag that sets the limit (the unit test
/// `wasm::tests::the_hints_name_real_flags` holds them to `kvdb serve`'s flags).
pub(crate) const TIME_HINT: &str = "do less per request (a write waits for its commit to be durable); \
     the server's operator sets the limit with --script-time-ms";
/// See [`TIME_HINT`].
pub(crate) const MEMORY_HINT: &str = "use less memory per request (smaller values, fewer of them at once); \
     the server's operator sets the limit with --script-memory-bytes";
/// See [`TIME_HINT`].
pub(crate) const RESPONSE_HINT: &str = "answer less per request (e.g. a page of a listing at a time); \
     the server's operator sets the limit with --script-response-bytes";
/// See [`TIME_HINT`] (Lua).
pub(crate) const INSTRUCTIONS_HINT: &str = "do less work per request; \
     the server's operator sets the limit with --script-instructions";

/// Which limit a run hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Time,
    Instructions,
    Fuel,
    Memory,
    Stack,
    Response,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Time => "time",
            Limit::Instructions => "instructions",
            Limit::Fuel => "fuel",
            Limit::Memory => "memory",
            Limit::Stack => "stack",
            Limit::Response => "response-size",
        }
    }
}

/// The HTTP request a script runs for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Query and form (or JSON object) body parameters, the body winning on a
    /// clash. Scripts see them with `remote_addr` added: see [`Request::vars`].
    pub fields: Vec<(String, String)>,
    /// The client's address, if known.
    pub remote_addr: Option<std::net::IpAddr>,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The variables a script sees: the fields, then `remote_addr`, the
    /// client's address. A field of that name from the client is left out,
    /// so that a guest that takes the first match can't be lied to.
    pub fn vars(&self) -> impl Iterator<Item = (&str, std::borrow::Cow<'_, str>)> {
        self.fields
            .iter()
            .filter(|(k, _)| k != REMOTE_ADDR)
            .map(|(k, v)| (k.as_str(), std::borrow::Cow::Borrowed(v.as_str())))
            .chain(
                self.remote_addr
                    .map(|a| ("remote_addr", std::borrow::Cow::Owned(a.to_string()))),
            )
    }

    /// [`Request::vars`], moved out of the request (its fields are left
    /// empty) instead of copied.
    pub fn take_vars(&mut self) -> Vec<(String, String)> {
        let mut vars = std::mem::take(&mut self.fields);
        vars.retain(|(k, _)| k != REMOTE_ADDR);
        if let Some(addr) = self.remote_addr {
            vars.push((REMOTE_ADDR.to_owned(), addr.to_string()));
        }
        vars
    }
}

/// The variable that holds the client's address.
const REMOTE_ADDR: &str = "remote_addr";

/// What a script answers.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The longest message of a script's error that a response carries (a
/// script's own error text, or a guest's panic line): past it the message is
/// cut, so that an error can't make a response over the size limit (found
/// by a review: `error(string.rep("A", 8e6))` answered 8 MB).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// `message`, cut to [`MAX_ERROR_MESSAGE`] bytes (at a character boundary)
/// with a note of how long it was.
#[must_use]
pub fn clip_message(message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (cut: the message is {} bytes)",
        &message[..end],
        message.len()
    )
}

/// How much one run may write to the server log (Lua's `print`, the
/// WebAssembly `log` calls): past it, one line says so and the rest is
/// dropped (found by a review: a script logged 1 GB in one run).
pub const LOG_BUDGET: usize = 64 * 1024;

/// What a run has left of [`LOG_BUDGET`].
#[derive(Debug)]
pub struct LogBudget {
    left: usize,
    noted: bool,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            left: LOG_BUDGET,
            noted: false,
        }
    }
}

impl LogBudget {
    /// Whether anything more will be logged.
    #[must_use]
    pub fn spent(&self) -> bool {
        self.left == 0
    }

    /// The line to log for `text`: control characters escaped (a script
    /// can't forge log lines), cut to what is left of the budget; once it is
    /// spent, one notice and then `None`.
    pub fn line(&mut self, text: &str) -> Option<String> {
        if self.left == 0 {
            if self.noted {
                return None;
            }
            self.noted = true;
            return Some(format!(
                "(the rest of this run's log is dropped: a run logs at most {LOG_BUDGET} bytes)"
            ));
        }
        let mut line = String::with_capacity(text.len().min(self.left));
        for c in text.chars() {
            if line.len() >= self.left {
                break;
            }
            if c.is_control() && c != '\t' {
                line.extend(c.escape_default());
            } else {
                line.push(c);
            }
        }
        self.left = self.left.saturating_sub(line.len().max(1));
        Some(line)
    }
}

/// How a run or an upload fails.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("the script is invalid: {0}")]
    Invalid(String),
    #[error("the script failed: {0}")]
    Failed(String),
    #[error("the script exceeded its {} limit: {detail}", limit.name())]
    Limit { limit: Limit, detail: String },
    /// The runtime is at capacity: its runs, or the bucket's share of them,
    /// are all in flight (see [`RunShares`]).
    #[error("{0}")]
    Busy(String),
    #[error("the script runtime failed: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::{Ordering, Request, SLOW_FOR, SlowScripts};
    use std::time::Instant;

    /// A bucket holds at most a quarter of the runs, the runtime at most
    /// all of them; a place comes back when its share is dropped.
    #[test]
    fn runs_are_held_to_the_bucket_share_and_the_total() {
        use super::{BucketId, RunShares, ScriptError};
        let shares = RunShares::new("Lua", 8);
        assert_eq!(shares.per_bucket(), 2);
        let busy = |r: Result<super::RunShare, ScriptError>| match r {
            Err(ScriptError::Busy(m)) => m,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a run past the share was let in"),
        };
        let a = BucketId::random();
        let a1 = shares.take(a).expect("first");
        let a2 = shares.take(a).expect("second");
        let m = busy(shares.take(a));
        assert!(
            m.contains("this bucket already has 2 Lua script runs"),
            "{m}"
        );
        drop(a1);
        let a3 = shares.take(a).expect("a place came back");
        // Three more buckets fill the runtime's 8.
        let others: Vec<_> = (0..3)
            .flat_map(|_| {
                let b = BucketId::random();
                [shares.take(b).expect("b1"), shares.take(b).expect("b2")]
            })
            .collect();
        let m = busy(shares.take(BucketId::random()));
        assert!(
            m.contains("the server already has 8 Lua script runs"),
            "{m}"
        );
        drop(others);
        drop((a2, a3));
        let all: Vec<_> = (0..4)
            .flat_map(|_| {
                let b = BucketId::random();
                [shares.take(b).expect("b1"), shares.take(b).expect("b2")]
            })
            .collect();
        assert_eq!(all.len(), 8);
        assert_eq!(RunShares::new("Lua", 4).per_bucket(), 1);
        // Below the range, the least the range allows.
        assert_eq!(RunShares::new("Lua", 0).total(), 4);
    }

    #[test]
    fn long_error_messages_are_cut_at_a_character_boundary() {
        let short = "line 3: oops".to_owned();
        assert_eq!(super::clip_message(short.clone()), short);
        let long = "é".repeat(super::MAX_ERROR_MESSAGE);
        let cut = super::clip_message(long.clone());
        assert!(cut.len() < super::MAX_ERROR_MESSAGE + 100, "{}", cut.len());
        assert!(cut.ends_with(&format!("(cut: the message is {} bytes)", long.len())));
    }

    #[test]
    fn a_runs_log_is_escaped_and_ends_at_its_budget() {
        let mut log = super::LogBudget::default();
        assert_eq!(
            log.line("a\nforged line\r\u{1b}[31m\tok").as_deref(),
            Some("a\\nforged line\\r\\u{1b}[31m\tok")
        );
        let big = "x".repeat(super::LOG_BUDGET);
        let line = log.line(&big).expect("what is left");
        assert!(line.len() < super::LOG_BUDGET, "cut to the budget");
        assert!(log.spent());
        assert!(log.line("more").is_some_and(|n| n.contains("dropped")));
        assert_eq!(log.line("more"), None);
    }

    #[test]
    fn taken_vars_are_the_vars_in_the_same_order() {
        for remote_addr in [None, Some(std::net::IpAddr::from([10, 0, 0, 7]))] {
            let mut request = Request {
                fields: vec![
                    ("name".into(), "World".into()),
                    ("remote_addr".into(), "spoofed".into()),
                ],
                remote_addr,
                ..Request::default()
            };
            let vars: Vec<(String, String)> = request
                .vars()
                .map(|(k, v)| (k.to_owned(), v.into_owned()))
                .collect();
            assert!(
                vars.iter().all(|(_, v)| v != "spoofed"),
                "the client's remote_addr is left out: {vars:?}"
            );
            assert_eq!(request.take_vars(), vars);
        }
    }

    #[test]
    fn a_script_marked_slow_is_known_as_slow_and_no_other() {
        let slow = SlowScripts::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(!slow.contains(&a), "nothing is slow at first");
        slow.mark(a);
        assert!(slow.contains(&a), "a run marked slow starts off the worker");
        assert!(!slow.contains(&b), "another script is not slow");
        slow.mark(b);
        assert!(slow.contains(&a) && slow.contains(&b));
    }

    #[test]
    fn a_slow_mark_expires_and_the_empty_set_is_looked_up_no_more() {
        let slow = SlowScripts::default();
        let a = [1u8; 32];
        slow.mark(a);
        let Some(long_ago) = Instant::now().checked_sub(SLOW_FOR * 2) else {
            return; // The machine has been up for less than that.
        };
        slow.scripts
            .lock()
            .expect("not poisoned")
            .insert(a, long_ago);
        assert!(
            !slow.contains(&a),
            "after SLOW_FOR it tries the worker again"
        );
        assert!(!slow.any.load(Ordering::Acquire), "the set is empty again");
        assert!(slow.scripts.lock().expect("not poisoned").is_empty());
    }
}

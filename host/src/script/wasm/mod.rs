//! The WebAssembly runtime (wasmtime, component model): components of the
//! `kvdb:script` world, compiled once and run in a fresh instance per request.
//!
//! - Upload validates: not WebAssembly, a core module, or a component for
//!   another world are each refused with a message saying which. The compiled,
//!   pre-linked component (`ScriptPre`) is cached by the SHA-256 of its
//!   bytes: the same component in two buckets is compiled once. With a
//!   directory for compiled code (the data directory's `compiled/`), the
//!   machine code is also kept there (wasmtime's own cache, keyed by the
//!   component's bytes and the engine's settings), so that a restart loads
//!   it instead of compiling every component again.
//! - Each run gets a new store from the pooling allocator with fuel, a memory
//!   limit on all its linear memories together ([`RunLimits`]), at most
//!   [`MAX_MEMORIES`] memories, [`MAX_TABLES`] tables and
//!   [`MAX_CORE_INSTANCES`] core instances (checked at upload), and an epoch
//!   deadline (a 10 ms ticker thread that
//!   ticks only while runs are in flight), and WASI with nothing granted: no
//!   files, sockets or environment; clocks and random only (made at the
//!   guest's first WASI call: most small handlers make none). Guest
//!   stdout/stderr go to the log, tagged with the script. What a run hands
//!   the host at once (its response, one call's arguments) is bounded before
//!   wasmtime copies it out (see [`HANDOVER_SLACK`]), and so is the
//!   randomness it asks for in one call.
//! - Data calls go through [`crate::script::api::Host`] (see the `host` module).
//!
//! - The pool has a slot for each of [`Limits::runs`] runs in flight, and
//!   one bucket's runs may hold at most a quarter of them at once (see
//!   [`RunShares`]): a bucket whose scripts are slow, or flooded, gets 503s,
//!   not every other bucket.
//! - Runs are async calls (the guest on a fiber) that hand control back every
//!   `YIELD_FUEL`, whose data calls are async imports (a write waiting for
//!   its commit suspends the guest, and every call first hands control back
//!   if the run is past its slice: host calls use no fuel): a run starts on
//!   the async worker that took the request and moves to a blocking thread
//!   once its polls have taken [`INLINE_SLICE`]. Unlike Lua's, a script's
//!   later runs start on the worker all the same: a run can always be
//!   suspended, so one past its slice holds no worker, and under load a
//!   short run is often past its slice by the wall clock (its thread
//!   preempted); marking the script sent every run of the visitors counter
//!   through a blocking thread.

mod bindings;
mod host;
mod output;
mod world;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable, ResourceTableError};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::SourceLoader;
use super::api::Host;
use super::{
    INLINE_SLICE, Label, Limit, Limits, MEMORY_HINT, RESPONSE_HINT, Request, Response, RunShares,
    ScriptError,
};
use crate::bucket::StoredScript;
use bindings::kvdb::script::types::Response as WitResponse;
use bindings::{Script, ScriptPre};

/// Epoch tick: the granularity of the wall-clock deadline.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How often an idle ticker (no run in flight) wakes to see whether its
/// runtime is gone.
const IDLE_TICKER_CHECK: Duration = Duration::from_secs(1);

/// Guest output kept per run for the log (and for a panic's message).
const CAPTURED_OUTPUT: usize = 64 * 1024;

/// Linear memories, tables and core instances one component may have.
/// Components built by `cargo` for `wasm32-wasip2` have one memory, two
/// tables and three core modules; `componentize-py` ones one memory and
/// fourteen core modules (the Python guests of the tests run within these).
/// Without these caps a single run could take
/// every slot of the pool (every other run would fail) and, with a memory
/// limit per memory, the memory limit many times over.
pub const MAX_MEMORIES: u32 = 2;
/// See [`MAX_MEMORIES`].
pub const MAX_TABLES: u32 = 8;
/// See [`MAX_MEMORIES`].
pub const MAX_CORE_INSTANCES: u32 = 32;

/// Fuel between the guest's hand-backs to the async runtime (about as many
/// instructions: tens of microseconds).
const YIELD_FUEL: u64 = 100_000;

/// Handles a run may hold at once (WASI streams, pollables and the like):
/// each takes host memory, outside the run's memory limit.
pub const MAX_HANDLES: usize = 1024;

/// Compiled components kept in memory; past it the one run least recently
/// makes way.
const MAX_CACHED: usize = 256;

/// What a run may hand the host in one go (its response, or the arguments of
/// one call) beyond twice the larger of the value size and response limits
/// (a UTF-16 string counts two bytes a character): keys, options and
/// response headers. wasmtime copies such data out of the guest
/// before any of KVdb's checks see it, and the host's copy can be several
/// times the guest's bytes (a response header is 16 bytes in the guest and
/// 48 in the host before its strings); wasmtime's own bound is 128 MiB a
/// call. Found by a review: a guest within a 32 MiB memory limit answered
/// two million empty headers, ~100 MB of host memory a run before the
/// header limit refused them.
const HANDOVER_SLACK: usize = 1 << 20;

/// The most bytes of randomness a run may ask for in one call (WASI's
/// default is 64 MiB, allocated by the host before the guest's memory limit
/// can refuse it).
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// The start of the message of wasmtime's error (a private type) for a
/// guest that handed the host more than its hostcall fuel allows at once.
const HANDOVER_EXCEEDED: &str = "too much data is being copied between the host and the guest";

/// What to do about a limit, added to its error: the run's own share of
/// work, and the flag that sets the limit (the unit test
/// `the_hints_name_real_flags` holds them to `kvdb serve`'s flags; the
/// hints both runtimes share are in the parent module).
const FUEL_HINT: &str = "do less work per request (fuel is about one unit per instruction); \
     the server's operator sets the limit with --script-fuel";
/// See [`FUEL_HINT`]: what a run hands over at once is bounded by two
/// limits, neither of them the memory limit.
const HANDOVER_HINT: &str = "hand over smaller values and responses; the server's operator \
     sets the limits with --max-value-bytes and --script-response-bytes";

/// What a run's store holds.
pub struct WasmState {
    host: Host,
    /// What is left of the run's log (the `log` calls).
    log: crate::script::LogBudget,
    /// WASI, made at the guest's first WASI call: a guest that makes none
    /// (a small handler) does not pay for its set-up (random generators
    /// seeded, streams and clocks boxed) on every run.
    wasi: Option<Wasi>,
    table: ResourceTable,
    limits: RunLimits,
    label: Label,
}

/// A run's memory limit, on all its linear memories together (wasmtime's
/// `StoreLimits` bounds each memory alone). Growing past it traps with
/// [`OverMemory`] rather than failing the guest's `memory.grow`, so the run
/// ends with a clear error instead of the guest's own abort.
struct RunLimits {
    memory_bytes: usize,
    /// The sum of the run's memories' sizes.
    used: usize,
}

/// The trap of a run that grew its memories past the limit.
#[derive(Debug, thiserror::Error)]
#[error("the script's memory would grow to {wanted} bytes; the limit is {limit}")]
struct OverMemory {
    wanted: usize,
    limit: usize,
}

impl ResourceLimiter for RunLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let wanted = self.used.saturating_sub(current).saturating_add(desired);
        if wanted > self.memory_bytes {
            return Err(OverMemory {
                wanted,
                limit: self.memory_bytes,
            }
            .into());
        }
        if maximum.is_some_and(|max| desired > max) {
            // The guest's own declared maximum: `memory.grow` fails, as the
            // guest asked.
            return Ok(false);
        }
        self.used = wanted;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES as usize
    }

    fn tables(&self) -> usize {
        MAX_TABLES as usize
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES as usize
    }
}

/// A run's WASI: nothing granted but clocks and random, and stdout/stderr
/// kept for the log.
struct Wasi {
    ctx: WasiCtx,
    stdout: output::CappedOutput,
    stderr: output::CappedOutput,
}

impl Wasi {
    fn new() -> Self {
        let stdout = output::CappedOutput::new(CAPTURED_OUTPUT);
        let stderr = output::CappedOutput::new(CAPTURED_OUTPUT);
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        Self {
            ctx,
            stdout,
            stderr,
        }
    }
}

/// What a run wrote to stdout and stderr, and whether some was dropped.
#[derive(Default)]
struct Output {
    stdout: (Vec<u8>, bool),
    stderr: (Vec<u8>, bool),
}

impl Output {
    fn of(wasi: Option<Wasi>) -> Self {
        wasi.map_or_else(Self::default, |w| Self {
            stdout: w.stdout.contents(),
            stderr: w.stderr.contents(),
        })
    }
}

impl WasiView for WasmState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.get_or_insert_with(Wasi::new).ctx,
            table: &mut self.table,
        }
    }
}

/// A compiled script ready to instantiate (shared: a run takes it from the
/// cache with one reference count).
#[derive(Clone)]
pub struct Prepared(Arc<ScriptPre<WasmState>>);

/// The WebAssembly runtime.
pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<WasmState>,
    limits: Limits,
    /// Compiled scripts by the SHA-256 of their bytes.
    cache: Mutex<Compiled>,
    /// One lock per component being compiled for a run, so that the runs
    /// that find it missing compile it once, not each.
    compiling: Mutex<HashMap<[u8; 32], Arc<Mutex<()>>>>,
    ticker: Ticker,
    shares: RunShares,
}

/// Compiled components by the SHA-256 of their bytes, each with when it was
/// last asked for. Full, the least recently asked for makes way: one tenant
/// uploading many components does not empty it for everyone else (it was
/// cleared whole; found by a review).
struct Compiled<P = Prepared> {
    entries: HashMap<[u8; 32], (P, u64)>,
    clock: u64,
}

impl<P> Default for Compiled<P> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
        }
    }
}

impl<P: Clone> Compiled<P> {
    fn get(&mut self, digest: &[u8; 32]) -> Option<P> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(digest).map(|(prepared, used)| {
            *used = now;
            prepared.clone()
        })
    }

    fn insert(&mut self, digest: [u8; 32], prepared: P) {
        if self.entries.len() >= MAX_CACHED && !self.entries.contains_key(&digest) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(d, _)| *d);
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(digest, (prepared, self.clock));
    }
}

/// Locks `m`; a panic elsewhere while it was held leaves nothing half done
/// in what these locks guard.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The epoch ticker thread, which advances the engine's epoch every
/// [`EPOCH_TICK`] while at least one run is in flight and sleeps otherwise, so
/// that an idle server does not wake a hundred times a second.
struct Ticker {
    runs: Arc<AtomicUsize>,
    thread: std::thread::Thread,
}

/// A run in flight: keeps the ticker ticking until dropped.
struct Ticking(Arc<AtomicUsize>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ticker {
    /// Starts the thread; it ends once `engine` is dropped.
    fn spawn(engine: &Engine) -> std::io::Result<Self> {
        let weak = engine.weak();
        let runs = Arc::new(AtomicUsize::new(0));
        let in_flight = runs.clone();
        let handle = std::thread::Builder::new()
            .name("kvdb-wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    if in_flight.load(Ordering::Acquire) == 0 {
                        drop(engine);
                        // Unparked by the next run; the timeout only checks
                        // whether the runtime still exists.
                        std::thread::park_timeout(IDLE_TICKER_CHECK);
                        continue;
                    }
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Self {
            runs,
            thread: handle.thread().clone(),
        })
    }

    /// Marks a run as started (waking the ticker if it was idle) until the
    /// guard is dropped.
    fn start(&self) -> Ticking {
        if self.runs.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Ticking(self.runs.clone())
    }
}

/// wasmtime's compilation cache in `dir` (created if missing).
fn disk_cache(dir: &Path) -> wasmtime::Result<Cache> {
    let mut config = CacheConfig::new();
    config.with_directory(std::path::absolute(dir)?);
    Cache::new(config)
}

/// A linker with what a script may import: WASI 0.2 (granting clocks and
/// random only, see [`Wasi`]) and the `kvdb:script` interfaces.
fn linker(engine: &Engine) -> wasmtime::Result<Linker<WasmState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    Script::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

fn internal(e: impl std::fmt::Display) -> ScriptError {
    ScriptError::Internal(e.to_string())
}

impl WasmRuntime {
    /// A runtime that keeps compiled code in memory only (`compiled: None`),
    /// or also in the directory `compiled`, for the next process.
    ///
    /// That directory is only a cache: if it can't be used (not creatable, a
    /// file in its place), the runtime logs a warning and keeps compiled
    /// code in memory only.
    ///
    /// # Errors
    /// The engine can't be configured (e.g. the pool can't be reserved).
    pub fn new(limits: Limits, compiled: Option<&Path>) -> Result<Self, ScriptError> {
        let mut config = Config::new();
        if let Some(dir) = compiled {
            match disk_cache(dir) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(e) => tracing::warn!(
                    dir = %dir.display(),
                    "compiled WebAssembly is kept in memory only (each component compiles again after a restart): {e:#}"
                ),
            }
        }
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.epoch_interruption(true);
        // The pool has a slot for every run the shares let in.
        let shares = RunShares::new("WebAssembly", limits.runs);
        let slots = shares.total();
        let mut pool = PoolingAllocationConfig::default();
        // Enough core instances, memories and tables for every instance
        // slot to hold a component at the per-component caps: one component
        // can't take the pool's share of another kind (found by a review).
        pool.total_component_instances(slots)
            .total_core_instances(slots * MAX_CORE_INSTANCES)
            .total_memories(slots * MAX_MEMORIES)
            .total_tables(slots * MAX_TABLES)
            .max_memory_size(limits.memory_bytes)
            .max_memories_per_component(MAX_MEMORIES)
            .max_tables_per_component(MAX_TABLES)
            .max_core_instances_per_component(MAX_CORE_INSTANCES)
            // Keep a slot's first pages and tables mapped between instances
            // (reset with memset instead of madvise), and give pages back in
            // batches: each madvise flushes the TLB on every core.
            .linear_memory_keep_resident(4 * 1024 * 1024)
            .table_keep_resident(64 * 1024)
            .decommit_batch_size(64)
            // Linux 6.7+: reset only the pages a run dirtied (found with the
            // PAGEMAP_SCAN ioctl) instead of every kept-resident page.
            .pagemap_scan(wasmtime::Enabled::Auto)
            // Each run's fiber stack (runs are async calls).
            .total_stacks(slots);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(internal)?;
        let linker = linker(&engine).map_err(internal)?;
        let ticker = Ticker::spawn(&engine).map_err(internal)?;
        Ok(Self {
            engine,
            linker,
            limits,
            cache: Mutex::new(Compiled::default()),
            compiling: Mutex::new(HashMap::new()),
            ticker,
            shares,
        })
    }

    /// Compiles and links an upload; the message says what is wrong with it.
    ///
    /// # Errors
    /// [`ScriptError::Invalid`]: not WebAssembly, a core module, not a
    /// component of the `kvdb:script` world.
    pub fn compile(&self, bytes: &[u8]) -> Result<Prepared, ScriptError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(ScriptError::Invalid(
                "this is not WebAssembly (it does not start with \\0asm)".into(),
            ));
        }
        if bytes.len() < 8 {
            return Err(ScriptError::Invalid(format!(
                "this is not WebAssembly: {} bytes, shorter than a WebAssembly header (8)",
                bytes.len()
            )));
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(ScriptError::Invalid(
                "this is a core WebAssembly module, not a component: build with `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)".into(),
            ));
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| {
            ScriptError::Invalid(format!("this is not a valid WebAssembly component: {e:#}"))
        })?;
        // What does not link is said from the component's names when they
        // tell (another version of kvdb:script, an import this server lacks),
        // else by wasmtime.
        let misfit = || {
            let ty = component.component_type();
            world::misfit(
                ty.imports(&self.engine).map(|(name, _)| name),
                ty.exports(&self.engine).map(|(name, _)| name),
            )
            .map(|why| {
                ScriptError::Invalid(format!(
                    "the component does not fit the kvdb:script world (see wit/kvdb.wit): {why}"
                ))
            })
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            misfit().unwrap_or_else(|| {
                ScriptError::Invalid(format!(
                    "the component does not fit the kvdb:script world (see wit/kvdb.wit): {e:#}"
                ))
            })
        })?;
        let pre = ScriptPre::new(pre).map_err(|e| {
            misfit().unwrap_or_else(|| {
                ScriptError::Invalid(format!(
                    "the component does not export the kvdb:script `handle` function: {e:#}"
                ))
            })
        })?;
        Ok(Prepared(Arc::new(pre)))
    }

    /// [`WasmRuntime::compile`], through the cache: bytes compiled before
    /// (in any bucket) are not compiled again.
    ///
    /// # Errors
    /// As [`WasmRuntime::compile`].
    pub fn compile_cached(&self, bytes: &[u8]) -> Result<Prepared, ScriptError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
        if let Some(prepared) = self.cached(&digest) {
            return Ok(prepared);
        }
        let prepared = self.compile(bytes)?;
        lock(&self.cache).insert(digest, prepared.clone());
        Ok(prepared)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Prepared> {
        lock(&self.cache).get(digest)
    }

    /// `script` compiled: from the cache, or compiled once however many
    /// runs ask for it at the same time.
    fn prepared(
        &self,
        script: &StoredScript,
        source: SourceLoader<'_>,
    ) -> Result<Prepared, ScriptError> {
        if let Some(prepared) = self.cached(&script.digest) {
            return Ok(prepared);
        }
        let gate = lock(&self.compiling)
            .entry(script.digest)
            .or_default()
            .clone();
        let compiled = {
            let _one_at_a_time = lock(&gate);
            match self.cached(&script.digest) {
                Some(prepared) => Ok(prepared),
                // Not compiled in this process yet (a restart, or made way
                // for others): compile once.
                None => source().and_then(|bytes| {
                    self.compile_cached(&bytes).map_err(|e| match e {
                        ScriptError::Invalid(m) => ScriptError::Failed(m),
                        other => other,
                    })
                }),
            }
        };
        let mut compiling = lock(&self.compiling);
        // Nobody else waits on this gate (they would hold a clone). Ours
        // goes while the map is locked, so that of two runs finishing at
        // once the second sees itself as the last (found by a review).
        let last = Arc::strong_count(&gate) == 2;
        drop(gate);
        if last {
            compiling.remove(&script.digest);
        }
        compiled
    }

    /// Runs `script` for `request` in a fresh instance: on this (async)
    /// thread for up to [`INLINE_SLICE`] of guest time, then on a blocking
    /// thread.
    ///
    /// # Errors
    /// A trap (with the guest's panic message when there is one), or a limit.
    pub async fn run(
        &self,
        script: &StoredScript,
        source: SourceLoader<'_>,
        host: Host,
        mut request: Request,
    ) -> Result<Response, ScriptError> {
        // Taken before compiling: a compile is work a bucket's share bounds
        // (runs of components evicted from the cache compiled them before
        // any share was taken; found by a review).
        let share = self.shares.take(script.bucket)?;
        let prepared = match self.cached(&script.digest) {
            Some(prepared) => prepared,
            // Not compiled in this process yet (a restart): compile once, in
            // block_in_place (compiling takes milliseconds).
            None => tokio::task::block_in_place(|| self.prepared(script, source))?,
        };
        // Twice the larger limit: wasmtime counts a string in the guest's
        // encoding, two bytes a character in UTF-16.
        let handover = host
            .max_value_bytes()
            .max(self.limits.response_bytes)
            .saturating_mul(2)
            .saturating_add(HANDOVER_SLACK);
        let limits = RunLimits {
            memory_bytes: self.limits.memory_bytes,
            used: 0,
        };
        // The epoch deadline stops guest code; this one also stops a run
        // waiting in the host, on a WASI pollable (a sleep, found by a
        // review: a guest slept past its limit, holding a pool slot and a
        // thread after its client had gone) or a write waiting for its
        // commit (an async import), where no guest code runs and the epoch
        // is never looked at. A little later than the epoch's, so that a
        // run in guest code ends with its own trap.
        let deadline = tokio::time::Instant::now() + self.limits.time + 2 * EPOCH_TICK;
        let mut store = Store::new(
            &self.engine,
            WasmState {
                host,
                log: crate::script::LogBudget::default(),
                wasi: None,
                table: {
                    let mut table = ResourceTable::new();
                    // A WASI pollable takes two entries (it and what it
                    // polls): the guest's handle limit comes first.
                    table.set_max_capacity(4 * MAX_HANDLES);
                    table
                },
                limits,
                label: Label::of(script),
            },
        );
        store.limiter(|s| &mut s.limits);
        // Handles (WASI streams and pollables, resources) live in host
        // memory, outside the memory limit: wasmtime's default of 100,000
        // let a guest hold ~28 MB a run (found by a review).
        store.set_max_component_handles(MAX_HANDLES);
        store.set_fuel(self.limits.fuel).map_err(internal)?;
        // wasmtime's "hostcall fuel": what it lifts out of the guest for one
        // call's arguments or for the response (a list at its elements'
        // host size, a string at its bytes in the guest), checked before it
        // allocates.
        store.set_hostcall_fuel(handover);
        // The guest hands control back every so often, so that a long run
        // can leave the async worker (see below).
        store
            .fuel_async_yield_interval(Some(YIELD_FUEL))
            .map_err(internal)?;
        // At every tick its code looks at (at most an `EPOCH_TICK` apart
        // while the guest runs), the run ends if its time is up, and hands
        // control back if it is past its slice on the async worker: a host
        // call without a slice check of its own (WASI's, such as a 1 MiB
        // `get-random-bytes`) uses no fuel, and a guest looping over them
        // held its worker to its time limit (found by a review).
        let time_up = Instant::now() + self.limits.time;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= time_up {
                UpdateDeadline::Interrupt
            } else if past_the_slice() {
                UpdateDeadline::Yield(1)
            } else {
                UpdateDeadline::Continue(1)
            })
        });
        let vars = request.take_vars();
        let wit_request = bindings::kvdb::script::types::Request {
            method: request.method,
            path: request.path,
            vars,
            headers: request.headers,
            body: request.body,
        };
        // The epoch advances while the guard lives: as long as the guest can
        // run. It moves with the run, which outlives this function if the
        // client goes away once the run is on a blocking thread.
        let ticking = self.ticker.start();
        let mut call: Call = Box::pin(async move {
            let _ticking = ticking;
            // Given back after the store (and its pool slot): locals drop in
            // reverse order.
            let _share = share;
            let mut store = store;
            let run = async {
                match prepared.0.instantiate_async(&mut store).await {
                    Ok(instance) => instance.call_handle(&mut store, &wit_request).await,
                    Err(e) => Err(e),
                }
            };
            let result = tokio::time::timeout_at(deadline, run)
                .await
                .unwrap_or_else(|_| Err(wasmtime::Error::new(Trap::Interrupt)));
            let output = Output::of(store.data_mut().wasi.take());
            (result, output)
        });
        let (result, output) = match on_the_worker_for_a_slice(&mut call).await {
            Some(done) => done,
            None => off_the_worker(call).await?,
        };
        let Output {
            stdout: (stdout, stdout_dropped),
            stderr: (stderr, stderr_dropped),
        } = output;
        log_output(script, "stdout", &stdout, stdout_dropped);
        log_output(script, "stderr", &stderr, stderr_dropped);
        let response = result.map_err(|e| self.classify(&e, &stderr, handover))?;
        if response.body.len() > self.limits.response_bytes {
            return Err(ScriptError::Limit {
                limit: Limit::Response,
                detail: format!(
                    "the response is {} bytes; the limit is {}: {RESPONSE_HINT}",
                    response.body.len(),
                    self.limits.response_bytes
                ),
            });
        }
        crate::script::check_status(response.status)
            .map_err(|e| ScriptError::Failed(format!("the script answered an {e}")))?;
        crate::script::check_header_total(&response.headers).map_err(|detail| {
            ScriptError::Limit {
                limit: Limit::Response,
                detail,
            }
        })?;
        let mut headers = Vec::with_capacity(response.headers.len() + 1);
        for (name, value) in response.headers {
            let name = crate::script::check_header(&name, &value)
                .map_err(|e| ScriptError::Failed(format!("the script's response: {e}")))?;
            headers.push((name, value));
        }
        crate::script::default_content_type(&mut headers);
        Ok(Response {
            status: response.status,
            headers,
            body: response.body,
        })
    }

    fn classify(&self, e: &wasmtime::Error, stderr: &[u8], handover: usize) -> ScriptError {
        let limit = |limit, detail: String| ScriptError::Limit { limit, detail };
        if e.chain().any(|c| c.is::<PoolConcurrencyLimitError>()) {
            return ScriptError::Busy(
                "too many WebAssembly scripts are running at once: retry in a moment".into(),
            );
        }
        if e.chain()
            .any(|c| c.to_string().starts_with(HANDOVER_EXCEEDED))
        {
            return limit(
                Limit::Memory,
                format!(
                    "the script handed the host more than {handover} bytes at once (in its response or in one call); a run may hand over at most twice the larger of the value size limit and the response limit, plus {HANDOVER_SLACK} bytes: {HANDOVER_HINT}"
                ),
            );
        }
        if e.chain().any(|c| {
            matches!(c.downcast_ref(), Some(ResourceTableError::Full))
                || c.to_string().contains("store handle limit exceeded")
        }) {
            return limit(
                Limit::Memory,
                format!(
                    "the script held more than {MAX_HANDLES} handles at once (WASI streams, pollables, resources); drop those it no longer needs"
                ),
            );
        }
        if e.chain().any(|c| c.is::<OverMemory>()) {
            return limit(
                Limit::Memory,
                format!(
                    "the script tried to use more than {} bytes of memory: {MEMORY_HINT}",
                    self.limits.memory_bytes
                ),
            );
        }
        let trap = e.downcast_ref::<Trap>();
        match trap {
            Some(Trap::OutOfFuel) => {
                return limit(
                    Limit::Fuel,
                    format!(
                        "the script used more than {} fuel: {FUEL_HINT}",
                        self.limits.fuel
                    ),
                );
            }
            Some(Trap::Interrupt) => {
                return limit(Limit::Time, self.limits.time_detail());
            }
            Some(Trap::StackOverflow) => {
                return limit(Limit::Stack, "the script overflowed its stack".into());
            }
            _ => {}
        }
        let output = String::from_utf8_lossy(stderr);
        if let Some(message) = panic_detail(&output) {
            return ScriptError::Failed(crate::script::clip_message(message));
        }
        // The trap itself ("wasm trap: out of bounds memory access"), or
        // what the host refused, not the backtrace's heading; and what the
        // guest said last (a Python traceback ends with the exception).
        let cause = trap.map_or_else(|| e.root_cause().to_string(), ToString::to_string);
        let mut message = cause
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("the script trapped")
            .to_owned();
        if matches!(trap, Some(Trap::MemoryOutOfBounds)) {
            // A Rust (or C) guest keeps its stack at the start of its
            // memory, below its data: recursing past it wraps the stack
            // pointer, and the next access traps here, not as a stack
            // overflow (found by a review, with the examples' 64 KiB stack).
            message.push_str(
                " (in a Rust or C guest most often its stack overflowing, whose size is set when it is linked, e.g. `-C link-arg=-zstack-size=65536`: recurse less, or link it with a larger stack)",
            );
        }
        if let Some(last) = output.lines().map(str::trim).rfind(|l| !l.is_empty()) {
            message.push_str("; its last line on stderr: ");
            message.push_str(last);
        }
        ScriptError::Failed(crate::script::clip_message(message))
    }
}

/// The most bytes of what a guest wrote before it panicked that a panic's
/// detail repeats (the whole detail is cut at 4 KiB too).
const BEFORE_PANIC_BYTES: usize = 512;

/// A guest's panic, from its stderr: the panic's line and message, and what
/// the guest wrote just before it, which for a Python guest is its
/// exception. componentize-py prints the traceback and then panics with
/// "Python function threw an unexpected exception": the exception
/// (`ValueError: boom`) was only in the server log (found by a reviewer
/// writing guests). `None` without a panic.
fn panic_detail(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    // Rust's panic hook writes "thread '…' panicked at FILE:LINE:COL:"; the
    // last such line is the panic (a Python message may say "panicked" too).
    let at = lines
        .iter()
        .rposition(|l| l.contains(" panicked at "))
        .or_else(|| lines.iter().position(|l| l.contains("panicked")))?;
    let mut message = lines[at].trim().to_owned();
    // Rust's panic message follows on the next line.
    let next = lines.get(at + 1).map(|l| l.trim()).unwrap_or_default();
    if !next.is_empty() {
        message.push(' ');
        message.push_str(next);
    }
    let before = &lines[..at];
    // A Python traceback ends with the exception's line, the first one
    // after the (last) traceback's heading that is not indented; a message
    // of several lines goes on below it. Other guests: their last line.
    let said = match before
        .iter()
        .rposition(|l| l.trim_end() == "Traceback (most recent call last):")
    {
        Some(heading) => before[heading + 1..]
            .iter()
            .find(|l| !l.trim().is_empty() && !l.starts_with(char::is_whitespace)),
        None => before.iter().rfind(|l| !l.trim().is_empty()),
    };
    if let Some(said) = said.map(|l| l.trim()).filter(|l| *l != next) {
        let mut end = said.len().min(BEFORE_PANIC_BYTES);
        while !said.is_char_boundary(end) {
            end -= 1;
        }
        message.push_str("; before it on stderr: ");
        message.push_str(&said[..end]);
        if end < said.len() {
            message.push('…');
        }
    }
    Some(message)
}

fn log_output(script: &StoredScript, stream: &str, bytes: &[u8], dropped: bool) {
    if bytes.is_empty() {
        return;
    }
    let label = Label::of(script);
    // At most LOG_BUDGET bytes a stream, escaped as the log calls are.
    let mut budget = crate::script::LogBudget::default();
    for line in String::from_utf8_lossy(bytes).lines() {
        if let Some(line) = budget.line(line) {
            tracing::info!(script = %label, stream, "{line}");
        }
    }
    if dropped && !budget.spent() {
        tracing::info!(
            script = %label,
            stream,
            "(the rest of this run's {stream} is dropped: a run keeps at most {CAPTURED_OUTPUT} bytes of it)"
        );
    }
}

/// A run in progress.
type Call = Pin<Box<dyn Future<Output = Ran> + Send>>;

/// A run's result, and its output.
type Ran = (wasmtime::Result<WitResponse>, Output);

thread_local! {
    /// When the slice of the run being polled on this async worker ends
    /// (`None` on a blocking thread, and between polls).
    static SLICE_END: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// [`SLICE_END`] for one poll, put back as it was when the poll ends (by a
/// panic too, which would otherwise leave it set for whatever this thread
/// polls next).
struct SliceEnd(Option<Instant>);

impl SliceEnd {
    fn set(end: Instant) -> Self {
        Self(SLICE_END.replace(Some(end)))
    }
}

impl Drop for SliceEnd {
    fn drop(&mut self) {
        SLICE_END.set(self.0);
    }
}

/// Hands control back (the run goes `Pending`) if the run being polled on
/// this async worker is past its slice, so that it moves to a blocking
/// thread before a host call that may take a while: copying a large value,
/// a listing, a write that commits inline. Guest code hands control back
/// every `YIELD_FUEL`, but host calls use no fuel: a guest looping over
/// large `get`s held its worker until its time limit.
pub(super) async fn give_way() {
    if past_the_slice() {
        tokio::task::yield_now().await;
    }
}

/// Whether the run being polled on this async worker is past its slice
/// (never on a blocking thread).
fn past_the_slice() -> bool {
    SLICE_END.get().is_some_and(|end| Instant::now() >= end)
}

/// Polls `call` on this async worker until it ends (`Some`) or has used
/// [`INLINE_SLICE`] of time in its polls (`None`: the rest is for a blocking
/// thread). Time waiting to be polled again (for a write's commit) does not
/// count.
async fn on_the_worker_for_a_slice(call: &mut Call) -> Option<Ran> {
    let mut used = Duration::ZERO;
    std::future::poll_fn(|cx| {
        let started = Instant::now();
        let polled = {
            let _slice = SliceEnd::set(started + INLINE_SLICE.saturating_sub(used));
            call.as_mut().poll(cx)
        };
        used += started.elapsed();
        match polled {
            Poll::Ready(done) => Poll::Ready(Some(done)),
            Poll::Pending if used >= INLINE_SLICE => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Runs `call` to its end on a blocking thread.
async fn off_the_worker(call: Call) -> Result<Ran, ScriptError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || runtime.block_on(call))
        .await
        .map_err(|e| ScriptError::Internal(format!("script thread: {e}")))
}

#[cfg(test)]
mod tests {
    use super::{Compiled, MAX_CACHED, panic_detail};

    /// A componentize-py guest's stderr (0.25.1) as captured from a run
    /// whose `handle` raised `ValueError("boom")` after writing a line.
    const PYTHON_STDERR: &str = "before the exception
Traceback (most recent call last):
  File \"/0/app.py\", line 15, in handle
  File \"/0/app.py\", line 8, in fail
  File \"/0/app.py\", line 7, in fail
ValueError: boom

thread '<unnamed>' (1) panicked at runtime/src/lib.rs:1280:25:
Python function threw an unexpected exception
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace
";

    #[test]
    fn a_python_guests_panic_names_its_exception() {
        assert_eq!(
            panic_detail(PYTHON_STDERR).as_deref(),
            Some(
                "thread '<unnamed>' (1) panicked at runtime/src/lib.rs:1280:25: Python function \
                 threw an unexpected exception; before it on stderr: ValueError: boom"
            )
        );
        // A message of several lines: its first; a chained exception: the
        // last one raised.
        let several = PYTHON_STDERR.replace("ValueError: boom", "KeyError: 'a'\nand more");
        assert!(panic_detail(&several).is_some_and(|d| d.ends_with("stderr: KeyError: 'a'")));
        let chained = PYTHON_STDERR.replace(
            "ValueError: boom",
            "ValueError: boom\n\nDuring handling of the above exception, another exception \
             occurred:\n\nTraceback (most recent call last):\n  File \"/0/app.py\", line 9, \
             in handle\napp.Oops: second",
        );
        assert!(panic_detail(&chained).is_some_and(|d| d.ends_with("stderr: app.Oops: second")));
        // Bounded.
        let long = PYTHON_STDERR.replace("boom", &"é".repeat(5000));
        let detail = panic_detail(&long).expect("a panic");
        assert!(
            detail.len() < 700 && detail.ends_with('…'),
            "{}",
            detail.len()
        );
    }

    #[test]
    fn a_rust_guests_panic_is_its_line_and_message() {
        let stderr = "thread '<unnamed>' panicked at src/lib.rs:113:24:
hostile guest panics on purpose (4f2a)
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace
";
        assert_eq!(
            panic_detail(stderr).as_deref(),
            Some(
                "thread '<unnamed>' panicked at src/lib.rs:113:24: hostile guest panics on \
                 purpose (4f2a)"
            )
        );
        // What it wrote before comes after.
        let said = format!("loading the config\n{stderr}");
        assert!(
            panic_detail(&said)
                .is_some_and(|d| d.ends_with("; before it on stderr: loading the config"))
        );
        assert_eq!(panic_detail("no panic here\n"), None);
        assert_eq!(panic_detail(""), None);
    }

    fn digest(n: usize) -> [u8; 32] {
        let mut d = [0; 32];
        d[..8].copy_from_slice(&(n as u64).to_le_bytes());
        d
    }

    #[test]
    fn a_full_cache_lets_the_least_recently_asked_for_make_way() {
        let mut cache = Compiled::<usize>::default();
        for n in 0..MAX_CACHED {
            cache.insert(digest(n), n);
        }
        // The first one is in use; the others are not.
        assert_eq!(cache.get(&digest(0)), Some(0));
        for n in MAX_CACHED..MAX_CACHED + 10 {
            cache.insert(digest(n), n);
        }
        assert_eq!(cache.entries.len(), MAX_CACHED);
        assert_eq!(cache.get(&digest(0)), Some(0), "the one in use was dropped");
        for n in 1..=10 {
            assert_eq!(cache.get(&digest(n)), None, "{n} stayed");
        }
        for n in 11..MAX_CACHED + 10 {
            assert_eq!(cache.get(&digest(n)), Some(n));
        }
        // Inserting what is there replaces it and drops nothing.
        cache.insert(digest(0), 7);
        assert_eq!(cache.entries.len(), MAX_CACHED);
        assert_eq!(cache.get(&digest(0)), Some(7));
    }

    /// Every `--flag` a limit's hint names is one of `kvdb serve`'s (both
    /// runtimes' hints).
    #[test]
    fn the_hints_name_real_flags() {
        use clap::CommandFactory;
        let serve = crate::config::ServeArgs::command();
        let mut named = 0;
        for hint in [
            super::FUEL_HINT,
            crate::script::TIME_HINT,
            crate::script::INSTRUCTIONS_HINT,
            super::MEMORY_HINT,
            super::RESPONSE_HINT,
            super::HANDOVER_HINT,
        ] {
            for flag in hint.split_whitespace().filter_map(|w| w.strip_prefix("--")) {
                let flag = flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
                assert!(
                    serve.get_arguments().any(|a| a.get_long() == Some(flag)),
                    "--{flag} (in \"{hint}\") is no flag of kvdb serve"
                );
                named += 1;
            }
        }
        assert_eq!(named, 7);
    }
}

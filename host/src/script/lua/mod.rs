//! The Lua runtime (Lua 5.4 through `mlua`): a pool of sandboxed states, a
//! compiled-chunk cache per state, and runs confined by [`Limits`].
//!
//! Building a sandboxed state costs far more than a plain GET, so states are
//! reused from a pool, and each run gets a fresh global environment (its
//! globals never outlive it) over a read-only base, and library tables are
//! read-only proxies, so nothing a run does is visible to the next one (see
//! the `sandbox` module). A state whose run hit a limit is dropped, not
//! reused.
//!
//! Where runs execute: handing a run to a blocking thread costs more than a
//! short script's whole run, so a run starts on the async worker that took
//! the request, inside a Lua thread (coroutine). If it is still running after
//! [`INLINE_SLICE`] (and has used 60 µs of CPU time on the worker, or is
//! 0.8 ms past it: a preempted run stays, see `Meter::slice_over`), the
//! instruction hook suspends it and it goes on on a blocking thread. The
//! hook can't suspend code Lua calls from C (a
//! metamethod, a sort comparator, an `xpcall` handler), so a run leaves the
//! worker before the library calls that may get there (see the sandbox's
//! wrappers and `meter::leave_worker_function`); each data call looks at the
//! slice first. A write that waits for its commit suspends the run too,
//! which the runtime resumes on an async worker once the write is done
//! (see `State::on_the_worker`); where Lua can't suspend it, the write waits
//! in `block_in_place` (see [`Host::wait_write`]), and a pattern call still
//! matching when the slice ends goes on there (see `pattern`). Either way
//! (if on the worker), as when the hook finds a run past its slice where it
//! can't suspend it, or when two runs within a second held the worker
//! [`SLOW_RUN_CPU`] of CPU time before they left it, its script is
//! remembered as slow and its later runs start on a blocking thread. Data
//! calls go through [`Host`], never to storage directly.
//!
//! Runs in flight are held to [`Limits::runs`], and one bucket's to a
//! quarter of them ([`RunShares`]): each holds a state, and may hold a
//! blocking thread, until it ends (a run on a blocking thread goes on after
//! its client has gone, to its limit).

mod bindings;
mod bytecode;
mod meter;
mod pattern;
mod sandbox;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlua::thread::ThreadStatus;
use mlua::{Function, Lua, Thread};

use super::SourceLoader;
use super::api::{CallError, Host, PendingWrite, Write};
use super::{
    INLINE_SLICE, Label, Limit, Limits, Request, Response, RunShare, RunShares, ScriptError,
    SlowScripts,
};
use crate::bucket::{ScriptName, StoredScript};

/// Compiled scripts cached per state; past it the oldest go.
const MAX_CACHED_CHUNKS: usize = 256;

/// The most source bytes of the scripts a state keeps compiled: past it the
/// oldest go (a larger script is not kept at all). A compiled chunk takes
/// up to ~7 times its source (a table of short string literals), outside
/// every run's memory limit: 256 chunks of 255 KB each in each of the idle
/// states grew a server by gigabytes (found by a review). Hundreds of small
/// scripts fit, and twice the largest script; at most ~4 MiB a state,
/// ~250 MiB for all the idle ones.
const MAX_CACHED_SOURCE_BYTES: usize = 512 * 1024;

/// Idle states kept for reuse (more exist while that many runs are in
/// flight). Runs waiting for their writes hold a state each, one a
/// connection: with 32 kept, a Lua counter at 64 connections built a new
/// state (compiling the sandbox) for every other run, three times a run's
/// cost.
const MAX_IDLE_STATES: usize = 64;

/// The most garbage of its last run an idle state keeps uncollected (see
/// [`LuaRuntime::give_back`]).
const IDLE_GARBAGE_BYTES: usize = 1024 * 1024;

/// The CPU time on its worker after which a run that leaves it marks its
/// script slow. A run past its slice leaves once it has used
/// [`meter::LONG_ON_WORKER`] (or is 0.8 ms past it) at its next hook tick
/// or library or data call; one that used far more did so in long single
/// calls (`s:sub(2)` of an 8 MiB string, 200 of them before a hook tick),
/// and after a second such run within a second its script's runs start on
/// a blocking thread for a second. A long loop of Lua code is not marked:
/// each of its runs leaves the worker after its slice and ~60 µs of CPU
/// time there. A short script's run now and then takes far more than its
/// usual 10–30 µs (Lua's collector finishing a cycle): marking at 60 µs,
/// or 150, sent a Lua counter at 64 connections to blocking threads for
/// most of every few seconds.
const SLOW_RUN_CPU: Duration = Duration::from_millis(1);

/// How a run's time on its async worker ended.
enum Worker {
    /// The run ended.
    Ended(mlua::Result<()>),
    /// Past its slice (or before code Lua calls from C, see
    /// `meter::leave_worker_function`), the run goes on on a blocking
    /// thread; `long`: it used at least [`SLOW_RUN_CPU`] of CPU time on the
    /// worker.
    Moved { long: bool },
}

/// The Lua runtime: a pool of sandboxed states.
pub struct LuaRuntime {
    limits: Limits,
    /// Shared with the blocking threads that collect a state's garbage
    /// before it goes back (see [`LuaRuntime::give_back`]).
    idle: Arc<Mutex<Vec<State>>>,
    slow: SlowScripts,
    /// Scripts with one run in the last second that held its worker long
    /// (see `SLOW_RUN_CPU`): a second marks them slow.
    suspects: SlowScripts,
    /// Runs in flight, in all and per bucket: each holds a state (and may
    /// hold a blocking thread) until it ends.
    shares: RunShares,
}

/// One sandboxed Lua state with what it needs to start runs quickly.
struct State {
    lua: Lua,
    base: sandbox::Base,
    /// Compiled chunks by the SHA-256 of their source and the script name
    /// (the name is in error messages), each with whether a run used it
    /// since it was cached or last spared.
    chunks: HashMap<ChunkKey, (Function, bool)>,
    /// The cached chunks' keys, source sizes and the memory each took
    /// when compiled, oldest first. Eviction gives a chunk used since a
    /// second chance (to the back, unmarked), so that a script run often
    /// stays compiled while many others come and go ("second chance", an
    /// O(1) approximation of least recently used).
    cached: VecDeque<(ChunkKey, usize, usize)>,
    /// The source bytes of the cached chunks.
    cached_source_bytes: usize,
    /// The Lua thread of the last run that finished normally, for the next.
    spare_thread: Option<Thread>,
    /// The limits of the state's current run, for its hook.
    meter: Arc<meter::Meter>,
    /// The memory the state keeps between runs: its libraries, measured
    /// after a full collection, and its cached chunks, each as much as its
    /// compile took. A run may allocate up to its memory limit above it.
    /// Earlier runs' garbage is not kept: it counts against the run, and
    /// Lua collects it before failing an allocation.
    /// (The limit was set above what the state used when the run started,
    /// garbage included, so a pooled state's runs could keep more each
    /// time; found by a review.)
    kept: usize,
}

/// A compiled chunk's key: the SHA-256 of its source, and the script's name.
type ChunkKey = ([u8; 32], ScriptName);

/// What a run accumulates; lives in the state's app data during the run.
pub(crate) struct Run {
    pub host: Host,
    pub limits: Limits,
    /// The instruction and time limits, as the hook counts them (shared
    /// with the state).
    pub(in crate::script::lua) meter: Arc<meter::Meter>,
    /// The response limit, once hit. A limit, once hit, stays hit: every
    /// later hook call raises again, so a script can't `pcall` its way past
    /// it.
    pub exceeded: Option<(Limit, String)>,
    /// `kvdb.exit` was called: the run ends with what it has said so far.
    pub exited: bool,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bucket and script, for the log.
    pub label: Label,
    /// The request, and the tables built from it once read (see
    /// `bindings::request_field_function`).
    pub request: Request,
    /// What is left of the run's log (`print`).
    pub log: crate::script::LogBudget,
    pub var: Option<mlua::Table>,
    pub headers_table: Option<mlua::Table>,
    pub scope_table: Option<mlua::Table>,
    /// A write the script started that was not done at once, until the run
    /// (suspended meanwhile, see `State::on_the_worker`) or the write's
    /// wrapper waits for it.
    write: Option<PendingWrite>,
    /// Its outcome, once the runtime waited for it, until the wrapper
    /// takes it.
    written: Option<Result<(), CallError>>,
}

pub(crate) type RunCell = RefCell<Run>;

/// What a run's thread starts with: the compiled chunk and its environment.
type Start = (Function, mlua::Table);

impl Run {
    /// Whether the run was stopped (a limit, or `kvdb.exit`): it does
    /// nothing more, even if the script caught the error that stopped it.
    /// Every stop goes through the meter, which the hook looks at too.
    pub fn stopped(&self) -> bool {
        self.meter.stopped()
    }

    /// A write started: its outcome if it is done, else `None`: the
    /// sandbox's wrapper then suspends the run until it is (see
    /// `meter::await_write_function`) and takes the outcome from
    /// [`Run::finish_write`].
    pub fn start_write(&mut self, write: Write) -> Option<Result<(), CallError>> {
        match write {
            Write::Done(done) => Some(done),
            Write::Pending(write) => {
                self.write = Some(write);
                self.written = None;
                self.meter.set_write_waiting(true);
                None
            }
        }
    }

    /// The outcome of the write [`Run::start_write`] left pending: waited
    /// for on the worker while the run was suspended, or now, on this
    /// thread, if it could not be (see `Host::wait_write`).
    pub fn finish_write(&mut self) -> Result<(), CallError> {
        self.meter.set_write_waiting(false);
        let done = match (self.written.take(), self.write.take()) {
            (Some(done), _) => done,
            (None, Some(write)) => {
                let on_worker = self.meter.on_worker();
                let done = self.host.wait_write(write);
                if on_worker && self.host.waited() {
                    // Waited in block_in_place on the worker: a thread
                    // hand-off there, which its script's later runs avoid
                    // by starting on a blocking thread.
                    self.meter.mark_left_worker();
                }
                done
            }
            (None, None) => Err(CallError::Internal("no write is waiting".into())),
        };
        if self.host.timed_out() {
            // The run's time is up (its deadline came a little before the
            // hook's, set after the compile): it does nothing more, and
            // starts no more writes.
            self.meter.time_up();
        }
        done
    }

    /// The outcome of the write the run was suspended for, waited for by
    /// the runtime, for [`Run::finish_write`].
    fn written(&mut self, done: Result<(), CallError>) {
        self.written = Some(done);
        self.meter.set_write_waiting(false);
    }

    /// Stops the run over the response limit (the first `detail` is kept);
    /// the error to raise.
    pub fn over_response_limit(&mut self, detail: String) -> mlua::Error {
        self.meter.stop();
        self.exceeded.get_or_insert((Limit::Response, detail));
        mlua::Error::runtime("the response size limit was exceeded")
    }
}

/// The message a run that failed with `e` ends with: [`lua_error`], and
/// for an error a Rust function raised (a binding's argument refused),
/// which carries no position of its own, the script's line from the
/// traceback taken where it was raised (found by a review:
/// `kvdb.status("abc")` said neither where nor which call). What `pcall`
/// catches stays without it, as Lua's own errors do there.
fn run_error(e: &mlua::Error) -> String {
    let message = lua_error(e);
    if has_position(&message) {
        return message;
    }
    match raised_at(e).and_then(script_position) {
        Some(position) => crate::script::clip_message(format!("{position}: {message}")),
        None => message,
    }
}

/// The traceback of the innermost Rust function's error in `e`.
fn raised_at(e: &mlua::Error) -> Option<&str> {
    match e {
        mlua::Error::CallbackError { cause, traceback } => {
            raised_at(cause).or(Some(traceback.as_str()))
        }
        mlua::Error::WithContext { cause, .. } => raised_at(cause),
        _ => None,
    }
}

fn lua_error(e: &mlua::Error) -> String {
    // The first line: "name:LINE: message" without the traceback.
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return lua_error(cause),
        mlua::Error::WithContext { cause, .. } => return lua_error(cause),
        other => other.to_string(),
    };
    let line = text.lines().next().unwrap_or("").trim();
    let message = line
        .strip_prefix("runtime error: ")
        .or_else(|| line.strip_prefix("syntax error: "))
        .unwrap_or(line);
    // A message from inside the sandbox's own Lua (a library wrapper)
    // names the script's line instead.
    let message = match message.strip_prefix("sandbox:") {
        Some(rest) if has_position(message) => rest.split_once(": ").map_or(rest, |(_, m)| m),
        _ => message,
    };
    if has_position(message) {
        return crate::script::clip_message(message.to_owned());
    }
    // An error raised inside a library function written in C (`ipairs(nil)`
    // indexing nil) carries no position: take the script's innermost line
    // from the traceback, so that the message still says where.
    crate::script::clip_message(match script_position(&text) {
        Some(position) => format!("{position}: {message}"),
        None => message.to_owned(),
    })
}

/// Whether `message` starts with a Lua position, `name:LINE: `.
pub(super) fn has_position(message: &str) -> bool {
    message
        .split_once(": ")
        .is_some_and(|(head, _)| is_position(head))
}

/// Whether `s` is a Lua position, `name:LINE`.
fn is_position(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(name, line)| {
        !name.is_empty() && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The innermost frame of the script itself in an error's traceback
/// (`name:LINE`), skipping library functions (`[C]`) and the sandbox's own
/// Lua.
/// None when tail calls come first: the frame that made the call is gone
/// from the traceback, and the next one would name its caller's line
/// (`return kvdb.status(c)` in a helper; found by a review).
fn script_position(text: &str) -> Option<&str> {
    text.lines()
        .skip_while(|l| !l.starts_with("stack traceback:"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("[C]") && !l.starts_with("sandbox:"))
        .find_map(|l| {
            if l.starts_with("(...tail calls...)") {
                return Some(None);
            }
            let (position, _) = l.split_once(": in ")?;
            is_position(position).then_some(Some(position))
        })
        .flatten()
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        // Lua's own message for a failed allocation, as the runner's `pcall`
        // caught and re-raised it (see `sandbox::RUNNER`).
        mlua::Error::RuntimeError(m) => m.lines().next() == Some("not enough memory"),
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            is_memory_error(cause)
        }
        _ => false,
    }
}

/// Puts `state` in the pool `idle` unless it is full.
fn pool(idle: &Mutex<Vec<State>>, state: State) {
    let mut idle = idle
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if idle.len() < MAX_IDLE_STATES {
        idle.push(state);
    }
}

impl LuaRuntime {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            idle: Arc::new(Mutex::new(Vec::new())),
            slow: SlowScripts::default(),
            suspects: SlowScripts::default(),
            shares: RunShares::new("Lua", limits.runs),
        }
    }

    fn take(&self) -> Result<State, ScriptError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match idle {
            Some(state) => Ok(state),
            None => State::new().map_err(|e| ScriptError::Internal(e.to_string())),
        }
    }

    /// Puts `state` back in the pool. If its last run left more than
    /// [`IDLE_GARBAGE_BYTES`] of garbage (one that went on on a blocking
    /// thread was collected there), that is collected first, on a blocking
    /// thread, after the answer, holding the run's `share` (a full
    /// collection costs with the whole heap, chunks and libraries too).
    fn give_back(&self, state: State, share: Option<RunShare>) {
        if !state.has_garbage() {
            pool(&self.idle, state);
            return;
        }
        let idle = Arc::clone(&self.idle);
        let collect = move || {
            let _share = share;
            let mut state = state;
            // A state Lua fails to collect is not trusted again.
            if state.collect_garbage() {
                pool(&idle, state);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(collect)),
            Err(_) => collect(),
        }
    }

    /// Checks that `source` compiles (uploads); the message names the line.
    ///
    /// # Errors
    /// [`ScriptError::Invalid`] with Lua's message.
    pub fn validate(&self, name: &str, source: &[u8]) -> Result<(), ScriptError> {
        if source.iter().all(u8::is_ascii_whitespace) {
            return Err(ScriptError::Invalid("the script is empty".into()));
        }
        let state = self.take()?;
        // The chunk goes before the state: it is not kept.
        let compiled = sandbox::compile(&state.lua, name, source).map(drop);
        self.give_back(state, None);
        compiled.map_err(|e| ScriptError::Invalid(lua_error(&e)))
    }

    /// Runs `script` for `request` with `host` as its scoped bucket: on this
    /// (async) thread for up to [`INLINE_SLICE`], then on a blocking thread.
    ///
    /// # Errors
    /// A Lua error (with its message and line), or a limit.
    pub async fn run(
        &self,
        script: &StoredScript,
        source: SourceLoader<'_>,
        host: Host,
        request: Request,
    ) -> Result<Response, ScriptError> {
        let share = self.shares.take(script.bucket)?;
        let state = self.take()?;
        let (state, result, share) = self
            .execute(state, share, script, source, host, request)
            .await;
        // A state that hit a limit or failed inside is not trusted again.
        if let (Ok(_) | Err(ScriptError::Failed(_)), Some(state)) = (&result, state) {
            self.give_back(state, share);
        }
        result
    }

    /// `share` is held until the run has ended, on whichever thread: a run
    /// on a blocking thread goes on if its client goes away. A run that
    /// ended on the worker hands it back, for the collection of its garbage
    /// (see [`LuaRuntime::give_back`]).
    async fn execute(
        &self,
        mut state: State,
        share: RunShare,
        script: &StoredScript,
        source: SourceLoader<'_>,
        host: Host,
        request: Request,
    ) -> (
        Option<State>,
        Result<Response, ScriptError>,
        Option<RunShare>,
    ) {
        let inline = !self.slow.contains(&script.digest);
        let slice_end = inline.then(|| Instant::now() + INLINE_SLICE);
        // A write the run waits for stops waiting when its time is up
        // (`State::on_the_worker`, `Host::wait_write`); the hook then ends
        // the run.
        let deadline = tokio::time::Instant::now() + self.limits.time;
        let host = host.with_deadline(deadline);
        let (thread, env) =
            match state.prepare(script, source, host, request, self.limits, slice_end) {
                Ok(prepared) => prepared,
                Err(e) => {
                    state.end_run();
                    return (Some(state), Err(e), Some(share));
                }
            };
        let (finished, env) = if inline {
            (state.on_the_worker(&thread, env, deadline).await, None)
        } else {
            (Worker::Moved { long: false }, Some(env))
        };
        let mut share = Some(share);
        let (mut state, outcome) = match finished {
            Worker::Ended(outcome) => {
                if outcome.is_ok() {
                    state.spare_thread = Some(thread);
                }
                (state, outcome)
            }
            Worker::Moved { long } => {
                // Past its slice (or before code Lua calls from C): its
                // script is marked slow only if it held the worker long in
                // CPU time (see `SLOW_RUN_CPU`), twice within a second: one
                // such run of a short script was seen every few seconds
                // under load (Lua's collector, page faults).
                if inline && long {
                    if self.suspects.contains(&script.digest) {
                        self.slow.mark(script.digest);
                    } else {
                        self.suspects.mark(script.digest);
                    }
                }
                let share = share.take();
                let moved = tokio::task::spawn_blocking(move || {
                    let _share = share;
                    let outcome = state.run_to_end(&thread, env);
                    // Its garbage is collected here (see `give_back`).
                    state.collect_garbage();
                    (state, outcome)
                })
                .await;
                match moved {
                    Ok(moved) => moved,
                    Err(e) => {
                        return (
                            None,
                            Err(ScriptError::Internal(format!("script thread: {e}"))),
                            None,
                        );
                    }
                }
            }
        };
        // A run that waited for a write on its thread on the worker (where
        // it could not be suspended), or went on with a library call past
        // its slice (both in block_in_place), cost a thread hand-off there,
        // and one the hook found past its slice where it could not suspend
        // it held it: later runs start on a blocking thread.
        if inline && (state.meter.left_worker() || state.meter.held_worker()) {
            self.slow.mark(script.digest);
        }
        let result = state.finish(outcome, self.limits);
        (Some(state), result, share)
    }
}

impl State {
    fn new() -> mlua::Result<Self> {
        let lua = sandbox::new_lua()?;
        let base = sandbox::Base::new(&lua)?;
        // The main state runs script code too: a run's error object is
        // turned into text there (its `__tostring` is the script's).
        meter::install_on_main(&lua)?;
        lua.gc_collect()?;
        let kept = lua.used_memory();
        Ok(Self {
            lua,
            base,
            chunks: HashMap::new(),
            cached: VecDeque::new(),
            cached_source_bytes: 0,
            spare_thread: None,
            meter: Arc::new(meter::Meter::new()),
            kept,
        })
    }

    fn chunk(
        &mut self,
        script: &StoredScript,
        source: SourceLoader<'_>,
    ) -> Result<Function, ScriptError> {
        let key = (script.digest, script.name.clone());
        if let Some((f, used)) = self.chunks.get_mut(&key) {
            *used = true;
            return Ok(f.clone());
        }
        let source = source()?;
        let before = self.lua.used_memory();
        let f = sandbox::compile(&self.lua, script.name.as_str(), &source)
            .map_err(|e| ScriptError::Failed(lua_error(&e)))?;
        let took = self.lua.used_memory().saturating_sub(before);
        if source.len() > MAX_CACHED_SOURCE_BYTES {
            return Ok(f);
        }
        let mut evicted = 0;
        while self.chunks.len() >= MAX_CACHED_CHUNKS
            || self.cached_source_bytes + source.len() > MAX_CACHED_SOURCE_BYTES
        {
            let Some((oldest, size, kept)) = self.cached.pop_front() else {
                break;
            };
            // Each chunk is spared once a pass at most: the loop ends.
            if let Some((_, used @ true)) = self.chunks.get_mut(&oldest) {
                *used = false;
                self.cached.push_back((oldest, size, kept));
                continue;
            }
            self.chunks.remove(&oldest);
            self.cached_source_bytes -= size;
            self.kept = self.kept.saturating_sub(kept);
            evicted += size;
        }
        if evicted >= MAX_CACHED_SOURCE_BYTES / 4 {
            // Large chunks go now, not when later runs' garbage makes Lua
            // collect (in an idle state, never).
            self.lua
                .gc_collect()
                .map_err(|e| ScriptError::Internal(e.to_string()))?;
        }
        self.cached_source_bytes += source.len();
        self.cached.push_back((key.clone(), source.len(), took));
        self.kept = self.kept.saturating_add(took);
        self.chunks.insert(key, (f.clone(), false));
        Ok(f)
    }

    /// Sets up a run: the chunk, a fresh environment, the run's record in
    /// the app data, the memory limit, and a Lua thread to run it in.
    fn prepare(
        &mut self,
        script: &StoredScript,
        source: SourceLoader<'_>,
        host: Host,
        request: Request,
        limits: Limits,
        slice_end: Option<Instant>,
    ) -> Result<(Thread, Start), ScriptError> {
        let internal = |e: mlua::Error| ScriptError::Internal(e.to_string());
        let f = self.chunk(script, source)?;
        let env = self.base.environment().map_err(internal)?;
        let lua = &self.lua;
        // The thread runs the chunk under the sandbox's runner (see
        // `sandbox::RUNNER`), given the chunk and its environment.
        let runner = self.base.runner();
        let thread = match self.spare_thread.take() {
            Some(thread) => {
                thread.reset(runner).map_err(internal)?;
                thread
            }
            None => lua.create_thread(runner).map_err(internal)?,
        };
        meter::install_on_thread(&thread);
        self.meter.start(&limits, slice_end);
        lua.set_app_data::<RunCell>(RefCell::new(Run {
            host,
            limits,
            meter: self.meter.clone(),
            exceeded: None,
            exited: false,
            status: 200,
            headers: Vec::new(),
            body: Vec::new(),
            label: Label::of(script),
            request,
            log: crate::script::LogBudget::default(),
            var: None,
            headers_table: None,
            scope_table: None,
            write: None,
            written: None,
        }));
        lua.set_memory_limit(self.kept.saturating_add(limits.memory_bytes))
            .map_err(internal)?;
        Ok((thread, (f, env)))
    }

    /// Resumes the run; `None` if it was suspended (past its slice, before
    /// code Lua calls from C, or for a write that waits).
    fn step(&self, thread: &Thread, args: Option<Start>) -> Option<mlua::Result<()>> {
        let _metering = meter::Metering::new(&self.meter);
        let outcome = match args {
            Some(start) => thread.resume::<()>(start),
            None => thread.resume::<()>(()),
        };
        match outcome {
            Ok(()) if thread.status() == ThreadStatus::Resumable => None,
            other => Some(other),
        }
    }

    /// Runs the run on this async worker until it ends or moves (its slice
    /// over, it is suspended to go on on a blocking thread). A run
    /// suspended for a write of its own that waits for its commit (see
    /// `meter::await_write_function`) is resumed once the write
    /// is done, the worker serving other requests meanwhile: a Lua counter
    /// at 64 connections, its runs on blocking threads, answered a third of
    /// `PATCH +1`'s requests. The wait ends at `deadline` (the write's
    /// error then says so, and the run ends with its time limit) and does
    /// not count against the slice.
    async fn on_the_worker(
        &mut self,
        thread: &Thread,
        start: Start,
        deadline: tokio::time::Instant,
    ) -> Worker {
        let mut start = Some(start);
        // The CPU time of its steps (not what the worker did while a write
        // waited), not their wall time nor its instructions: one
        // instruction or library call can take milliseconds (`s:sub(2)` of
        // a long string), and a preempted run takes wall time but no CPU.
        let mut used = Duration::ZERO;
        loop {
            self.meter.start_step(used);
            if let Some(outcome) = self.step(thread, start.take()) {
                return Worker::Ended(outcome);
            }
            used = self.meter.cpu_on_worker();
            let write = self
                .lua
                .app_data_ref::<RunCell>()
                .and_then(|cell| cell.borrow_mut().write.take());
            let Some(write) = write else {
                return Worker::Moved {
                    long: used >= SLOW_RUN_CPU,
                };
            };
            let waiting = Instant::now();
            let done = tokio::time::timeout_at(deadline, write).await;
            self.meter.extend_slice(waiting.elapsed());
            if let Some(cell) = self.lua.app_data_ref::<RunCell>() {
                let mut run = cell.borrow_mut();
                let done = done.unwrap_or_else(|_| Err(run.host.write_timed_out()));
                run.written(done);
            }
        }
    }

    /// Whether the state's last run left more than [`IDLE_GARBAGE_BYTES`]
    /// of garbage: an idle state allocates nothing, so Lua would never
    /// collect it, and each of the idle states could hold up to a memory
    /// limit of it.
    fn has_garbage(&self) -> bool {
        self.lua.used_memory() > self.kept.saturating_add(IDLE_GARBAGE_BYTES)
    }

    /// Collects the garbage of the state's last run if it has much (see
    /// [`State::has_garbage`]), and measures what the state keeps again;
    /// `false` if Lua failed to.
    fn collect_garbage(&mut self) -> bool {
        if !self.has_garbage() {
            return true;
        }
        if self.lua.gc_collect().is_err() {
            return false;
        }
        self.kept = self.lua.used_memory();
        true
    }

    /// Runs a run to its end with no more suspensions: a suspended one, or
    /// one not started yet (`env` given).
    fn run_to_end(&self, thread: &Thread, mut env: Option<Start>) -> mlua::Result<()> {
        self.meter.end_slice();
        loop {
            if let Some(outcome) = self.step(thread, env.take()) {
                return outcome;
            }
        }
    }

    /// Clears what [`State::prepare`] set, returning the run's record.
    fn end_run(&mut self) -> Option<Run> {
        let limit_reset = self.lua.set_memory_limit(0);
        let run = self
            .lua
            .remove_app_data::<RunCell>()
            .map(RefCell::into_inner);
        if let Err(e) = limit_reset {
            tracing::error!(error = %e, "resetting a Lua state's memory limit failed");
            return None;
        }
        run
    }

    /// Turns a finished run into its response or error.
    fn finish(
        &mut self,
        outcome: mlua::Result<()>,
        limits: Limits,
    ) -> Result<Response, ScriptError> {
        let run = self
            .end_run()
            .ok_or_else(|| ScriptError::Internal("the run's state vanished".into()))?;
        if run.host.timed_out() {
            // A write stopped waiting at the deadline, which may have come
            // a little before the hook's (it is set before the compile).
            return Err(ScriptError::Limit {
                limit: Limit::Time,
                detail: limits.time_detail(),
            });
        }
        if let Some((limit, detail)) = run.meter.limit_hit(&limits).or(run.exceeded) {
            return Err(ScriptError::Limit { limit, detail });
        }
        match outcome {
            Ok(()) => {}
            Err(_) if run.exited => {}
            Err(e) if is_memory_error(&e) => {
                return Err(ScriptError::Limit {
                    limit: Limit::Memory,
                    detail: format!(
                        "the script allocated more than {} bytes: {}",
                        limits.memory_bytes,
                        crate::script::MEMORY_HINT
                    ),
                });
            }
            Err(e) => {
                let message = run_error(&e);
                if message.contains("stack overflow") {
                    return Err(ScriptError::Limit {
                        limit: Limit::Stack,
                        detail: message,
                    });
                }
                return Err(ScriptError::Failed(message));
            }
        }
        let mut headers = run.headers;
        crate::script::default_content_type(&mut headers);
        Ok(Response {
            status: run.status,
            headers,
            body: run.body,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{LuaRuntime, ScriptError};
    use crate::bucket::{Buckets, PolicyChange, Scope, ScriptKind, ScriptName, StoredScript};
    use crate::script::api::Host;
    use crate::script::{Limits, Request};
    use crate::storage::{Durability, Store, memory::MemoryBackend};

    /// A script run often stays compiled while more than the cache holds
    /// come and go (it was first in, first out: evicted in its turn).
    #[test]
    fn a_chunk_in_use_stays_cached_while_others_come_and_go() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut state = super::State::new().expect("state");
        let script = |n: usize| {
            let source = format!("return {n}").into_bytes();
            StoredScript {
                bucket: crate::bucket::BucketId::random(),
                name: ScriptName::new(&format!("s{n}")).expect("name"),
                kind: ScriptKind::Lua,
                size: source.len() as u64,
                version: 1,
                digest: <sha2::Sha256 as sha2::Digest>::digest(&source).into(),
                updated_at: 0,
            }
        };
        let compiles = AtomicUsize::new(0);
        let load = |n: usize| {
            let compiles = &compiles;
            move || -> Result<Vec<u8>, ScriptError> {
                compiles.fetch_add(1, Ordering::Relaxed);
                Ok(format!("return {n}").into_bytes())
            }
        };
        let hot = script(0);
        state.chunk(&hot, &load(0)).expect("chunk");
        for n in 1..3 * super::MAX_CACHED_CHUNKS {
            state.chunk(&script(n), &load(n)).expect("chunk");
            state.chunk(&hot, &load(0)).expect("chunk");
        }
        assert_eq!(
            compiles.load(Ordering::Relaxed),
            3 * super::MAX_CACHED_CHUNKS,
            "the hot chunk was compiled again"
        );
        assert!(state.chunks.len() <= super::MAX_CACHED_CHUNKS);
        // The others were evicted in turn: the first is compiled again.
        state.chunk(&script(1), &load(1)).expect("chunk");
        assert_eq!(
            compiles.load(Ordering::Relaxed),
            3 * super::MAX_CACHED_CHUNKS + 1
        );
    }

    /// A bucket of a new store (`durability`, values up to 32 MiB), a
    /// script of `source` in it, a loader of its source, and the host of an
    /// admin run of it (a function, for one host a run).
    async fn bucket_with_script(
        durability: Durability,
        source: &str,
    ) -> (
        StoredScript,
        impl Fn() -> Result<Vec<u8>, ScriptError> + use<>,
        impl Fn() -> Host + use<>,
    ) {
        let store = Store::open(Arc::new(MemoryBackend::new()), durability).expect("store");
        let buckets = Buckets::new(
            store,
            crate::bucket::Limits {
                max_value_bytes: 32 << 20,
            },
        );
        let (id, _) = buckets
            .create(PolicyChange::default())
            .await
            .expect("bucket");
        let bucket = buckets.open(id).expect("open");
        let source = source.as_bytes().to_vec();
        let script = StoredScript {
            bucket: id,
            name: ScriptName::new("s").expect("name"),
            kind: ScriptKind::Lua,
            size: source.len() as u64,
            version: 1,
            digest: <sha2::Sha256 as sha2::Digest>::digest(&source).into(),
            updated_at: 0,
        };
        let load = move || -> Result<Vec<u8>, ScriptError> { Ok(source.clone()) };
        let host = move || {
            Host::new(
                bucket.clone().scoped(Scope::admin()),
                tokio::runtime::Handle::current(),
            )
        };
        (script, load, host)
    }

    /// The body of a run of `script` that ends well.
    async fn answer(
        runtime: &LuaRuntime,
        script: &StoredScript,
        load: crate::script::SourceLoader<'_>,
        host: Host,
    ) -> String {
        let r = runtime
            .run(script, load, host, Request::default())
            .await
            .expect("run");
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// A run whose caller stopped waiting (its future dropped once the run
    /// was on a blocking thread) keeps its bucket's place until it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_keeps_its_place_after_its_caller_has_gone() {
        let time = Duration::from_millis(800);
        let runtime = LuaRuntime::new(Limits {
            time,
            instructions: u64::MAX,
            runs: 4,
            ..Limits::default()
        });
        let (script, load, host) =
            bucket_with_script(Durability::Relaxed, "while true do end").await;
        let run = runtime.run(&script, &load, host(), Request::default());
        // Long past the inline slice: the run is on a blocking thread.
        let gone = tokio::time::timeout(Duration::from_millis(200), run).await;
        assert!(gone.is_err(), "the endless run ended");
        assert!(
            matches!(
                runtime.shares.take(script.bucket),
                Err(ScriptError::Busy(_))
            ),
            "the run's place was given back while it still ran"
        );
        tokio::time::sleep(time + Duration::from_millis(500)).await;
        runtime
            .shares
            .take(script.bucket)
            .expect("the place came back when the run ended");
    }

    /// A run whose writes wait for their commit (strict durability: each
    /// goes to the writer thread) is suspended on its worker meanwhile, not
    /// waited for on the worker's thread (in `block_in_place`, which marked
    /// its script slow: its runs went to blocking threads, a Lua counter at
    /// a third of `PATCH +1`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_waiting_for_its_writes_stays_on_its_worker() {
        let runtime = LuaRuntime::new(Limits::default());
        let (script, load, host) = bucket_with_script(
            Durability::Strict,
            r#"local err = kvdb.incr("n", 1)
kvdb.set("t", "text")
kvdb.say(err or kvdb.get("n"), " ", kvdb.incr("t", 1))"#,
        )
        .await;
        for n in 1..=3 {
            assert_eq!(
                answer(&runtime, &script, &load, host()).await,
                format!("{n} type mismatch: the current value is raw bytes, not a number\n")
            );
            let idle = runtime.idle.lock().expect("pool");
            let state = idle.last().expect("the state went back to the pool");
            assert!(
                !state.meter.left_worker(),
                "a write waited on the worker's thread"
            );
        }
    }

    /// Sets a 16 MiB value under `big` if it is missing, and reads it into
    /// `v`: milliseconds, past a run's slice.
    const READ_BIG: &str = r#"if not kvdb.exists("big") then kvdb.set("big", string.rep("x", 16 << 20)) end
local v = kvdb.get("big")
"#;

    /// Limits with room for [`READ_BIG`] and long loops.
    fn roomy_limits() -> Limits {
        Limits {
            time: Duration::from_secs(20),
            instructions: u64::MAX,
            memory_bytes: 256 << 20,
            ..Limits::default()
        }
    }

    /// A run past its slice leaves its worker at its next data call: a
    /// data call is one VM instruction to the hook, and a loop of slow ones
    /// held the worker some 200 calls past the slice in every run. The run
    /// is past its slice after reading a 16 MiB value, and its next call
    /// moves it to a blocking thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_past_its_slice_leaves_the_worker_at_its_next_data_call() {
        let runtime = LuaRuntime::new(roomy_limits());
        let (script, load, host) = bucket_with_script(
            Durability::Relaxed,
            &format!(r#"{READ_BIG}kvdb.say(#v, " ", tostring(kvdb.exists("big")))"#),
        )
        .await;
        assert_eq!(
            answer(&runtime, &script, &load, host()).await,
            "16777216 true\n"
        );
        assert!(
            !runtime.slow.contains(&script.digest),
            "the next run would not start on the worker"
        );
        assert_eq!(
            answer(&runtime, &script, &load, host()).await,
            "16777216 true\n"
        );
        // A run that moved goes on with no slice (its state's meter keeps
        // that until the next run starts); one that stayed keeps its slice.
        let idle = runtime.idle.lock().expect("pool");
        let state = idle.last().expect("the state went back to the pool");
        assert!(
            !state.meter.on_worker(),
            "the run went on on its worker past its slice"
        );
    }

    /// A state goes back to the pool without its last run's garbage (an
    /// idle state allocates nothing, so Lua would never collect it: each of
    /// the idle states could hold up to a memory limit of it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_state_keeps_no_garbage_of_its_last_run() {
        let runtime = LuaRuntime::new(Limits::default());
        let (script, load, host) = bucket_with_script(
            Durability::Relaxed,
            r#"local t = {}
for i = 1, 2000 do t[i] = string.rep("x", 4096) .. i end
kvdb.say(#t)"#,
        )
        .await;
        assert_eq!(answer(&runtime, &script, &load, host()).await, "2000\n");
        // Collected on a blocking thread, then pooled.
        let mut waited = Duration::ZERO;
        while runtime.idle.lock().expect("pool").is_empty() {
            assert!(
                waited < Duration::from_secs(10),
                "the state never went back to the pool"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        }
        let idle = runtime.idle.lock().expect("pool");
        let state = idle.last().expect("the state went back to the pool");
        // The run made ~8.8 MB; a state's libraries and chunk take well
        // under a MiB.
        let used = state.lua.used_memory();
        assert!(
            used < 2 << 20,
            "an idle state holds {used} bytes, its last run's garbage"
        );
    }

    /// Two runs within a second that held their worker 1 ms of CPU time
    /// (`SLOW_RUN_CPU`) before they left it mark their script slow (its
    /// runs start on a blocking thread for a second); one does not. Here
    /// in long single calls between two looks at the slice (a copy of
    /// 8 MiB each: counted in instructions, such a run held its worker some
    /// 200 copies past its slice in every run; found by a review). A run
    /// preempted for most of its slice may not count (on a loaded machine,
    /// as while the tests run, a few runs in a row can be): up to ten runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_runs_that_held_their_worker_mark_their_script_slow() {
        let runtime = LuaRuntime::new(roomy_limits());
        for source in [
            r#"local s = string.rep("x", 64 << 20)
for i = 1, 3000 do end"#,
            r#"local s = string.rep("x", 8 << 20)
for i = 1, 300 do local t = s:sub(2) end"#,
        ] {
            let (script, load, host) = bucket_with_script(Durability::Relaxed, source).await;
            for run in 0..10 {
                answer(&runtime, &script, &load, host()).await;
                let slow = runtime.slow.contains(&script.digest);
                assert!(!(run == 0 && slow), "one long run marked: {source}");
                if slow {
                    break;
                }
            }
            assert!(
                runtime.slow.contains(&script.digest),
                "a long run was not marked slow: {source}"
            );
        }
    }
}

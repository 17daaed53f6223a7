//! The limits of a Lua run as its instruction hook sees them: instructions,
//! wall time, the end of its slice on an async worker, and whether it was
//! stopped; and the hook itself, installed on every thread that runs
//! scripts.
//!
//! The hook is a plain Lua hook (`lua_sethook`), not mlua's: mlua's raises a
//! hook's error after clearing the running function's stack from inside the
//! hook, with Lua's hooks off, which runs that function's pending `__close`
//! metamethods (of a generic `for`'s fourth value, say) with nothing to stop
//! them: one that looped held its thread for ever (found by two reviews).
//! This one raises with `lua_error` and leaves the stack to Lua: a pending
//! `__close` runs only where a `pcall` catches the error, with hooks back
//! on, and the hook stops it too.
//!
//! This module decides when a run must stop; it must not touch the run's
//! data (the hook can't reach it: it finds the meter of the run on its
//! thread through [`Metering`]). It is the one module of the crate with
//! `unsafe` code (the workspace denies it elsewhere): the hook's calls into
//! Lua's C API.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{CStr, c_int};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mlua::ffi;

use crate::script::{Limit, Limits};

/// How often (in VM instructions) the hook looks at the limits: rare enough
/// to cost little, often enough to stop a run within microseconds of one.
pub(super) const HOOK_EVERY: u32 = 1000;

/// The message a stopped run's next library call raises (the hook's own is
/// the same, as a C string).
pub(super) const STOPPED: &str = "the script was stopped by a limit";

/// No time set (`slice_end`).
const NEVER: u64 = u64::MAX;

/// The CPU time on its worker after which a run is taken to have run long
/// rather than to have been preempted: well above a short script's whole
/// run (10–30 µs), and below what a long one gets of its 200 µs slice on a
/// loaded server (about half of it, with four busy threads on two cores).
pub(super) const LONG_ON_WORKER: Duration = Duration::from_micros(60);

/// How far past its slice by the wall clock a run that used less than
/// [`LONG_ON_WORKER`] of CPU time stays on its worker: under load a short
/// run is often past its slice for being preempted (moving it then costs a
/// thread hand-off and frees nothing: its worker's thread is what waited);
/// one blocked off the CPU (a read from disk) leaves after this.
const PREEMPTED_ROOM: Duration = Duration::from_micros(800);

/// What stopped a run: nothing, or which limit.
const HIT_NONE: u8 = 0;
const HIT_INSTRUCTIONS: u8 = 1;
const HIT_TIME: u8 = 2;

/// One state's run limits. Atomics only so that a run's record (which
/// holds it) can move between threads with the state; one thread uses it
/// at a time.
pub(super) struct Meter {
    started: Instant,
    instructions: AtomicU64,
    max_instructions: AtomicU64,
    /// Nanoseconds after `started`.
    deadline: AtomicU64,
    /// Nanoseconds after `started` at which the hook suspends the run (its
    /// slice on an async worker is over), or [`NEVER`].
    slice_end: AtomicU64,
    hit: AtomicU8,
    /// Stopped for good: a limit, the response limit, or `kvdb.exit`.
    stopped: AtomicBool,
    /// A library call went on past the slice, or a write waited, in
    /// `block_in_place` on the worker (see [`Meter::left_worker`]).
    left_worker: AtomicBool,
    /// See [`Meter::held_worker`].
    held: AtomicBool,
    /// The thread CPU time (nanoseconds) at which the run's CPU time on its
    /// worker would have been zero: set as each step starts (see
    /// [`Meter::start_step`]).
    cpu_base: AtomicU64,
    /// A write the run started waits for its commit (see
    /// [`await_write_function`]).
    write_waiting: AtomicBool,
}

/// What the hook does next.
enum Next {
    Continue,
    Suspend,
    Stop(&'static CStr),
}

impl Meter {
    pub(super) fn new() -> Self {
        Self {
            started: Instant::now(),
            instructions: AtomicU64::new(0),
            max_instructions: AtomicU64::new(0),
            deadline: AtomicU64::new(0),
            slice_end: AtomicU64::new(NEVER),
            hit: AtomicU8::new(HIT_NONE),
            stopped: AtomicBool::new(false),
            left_worker: AtomicBool::new(false),
            held: AtomicBool::new(false),
            cpu_base: AtomicU64::new(0),
            write_waiting: AtomicBool::new(false),
        }
    }

    fn elapsed(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    fn at(&self, when: Instant) -> u64 {
        u64::try_from(when.saturating_duration_since(self.started).as_nanos()).unwrap_or(NEVER - 1)
    }

    /// Starts a run: its limits from now, suspended at `slice_end`.
    pub(super) fn start(&self, limits: &Limits, slice_end: Option<Instant>) {
        self.instructions.store(0, Ordering::Relaxed);
        self.max_instructions
            .store(limits.instructions, Ordering::Relaxed);
        self.deadline
            .store(self.at(Instant::now() + limits.time), Ordering::Relaxed);
        self.slice_end
            .store(slice_end.map_or(NEVER, |t| self.at(t)), Ordering::Relaxed);
        self.hit.store(HIT_NONE, Ordering::Relaxed);
        self.stopped.store(false, Ordering::Relaxed);
        self.left_worker.store(false, Ordering::Relaxed);
        self.held.store(false, Ordering::Relaxed);
        self.write_waiting.store(false, Ordering::Relaxed);
    }

    /// Whether the run's slice on its async worker is over (never on a
    /// blocking thread): a library call that can't be suspended, as the
    /// hook suspends Lua code, goes on in `block_in_place`. Past its slice
    /// by the wall clock, a run that used less than [`LONG_ON_WORKER`] of
    /// CPU time there was preempted rather than long, and has
    /// [`PREEMPTED_ROOM`] more (a Lua counter at 64 connections had two
    /// runs in three moved to blocking threads for that, at every data
    /// call's check; the CPU clock is read only past the slice).
    pub(super) fn slice_over(&self) -> bool {
        let now = self.elapsed();
        let end = self.slice_end.load(Ordering::Relaxed);
        if now < end {
            return false;
        }
        let room = u64::try_from(PREEMPTED_ROOM.as_nanos()).unwrap_or(0);
        now >= end.saturating_add(room) || self.cpu_on_worker() >= LONG_ON_WORKER
    }

    /// A step of the run on its worker starts, after `used` of CPU time
    /// there in its earlier steps.
    pub(super) fn start_step(&self, used: Duration) {
        let base = thread_cpu_time().saturating_sub(used);
        self.cpu_base.store(
            u64::try_from(base.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The CPU time the run used on its worker so far (its steps there).
    pub(super) fn cpu_on_worker(&self) -> Duration {
        let base = Duration::from_nanos(self.cpu_base.load(Ordering::Relaxed));
        thread_cpu_time().saturating_sub(base)
    }

    /// A library call of this run went on past its slice in
    /// `block_in_place`, or a write of it waited there on the worker: a
    /// cost its script's later runs avoid by starting on a blocking thread.
    pub(super) fn mark_left_worker(&self) {
        self.left_worker.store(true, Ordering::Relaxed);
    }

    /// See [`Meter::mark_left_worker`].
    pub(super) fn left_worker(&self) -> bool {
        self.left_worker.load(Ordering::Relaxed)
    }

    /// Whether the run is on an async worker (a slice is set): it started
    /// there and has not been moved to a blocking thread.
    pub(super) fn on_worker(&self) -> bool {
        self.slice_end.load(Ordering::Relaxed) != NEVER
    }

    /// Whether the hook found the run past its slice where Lua can't
    /// suspend it (code called from C that no wrapper saw coming): it held
    /// its worker. Not the wall clock alone: under load a short run is
    /// often past its slice for being preempted, and marking its script
    /// slow for that sent the benchmark's Lua scripts to blocking threads
    /// (a third of their throughput at 64 connections).
    pub(super) fn held_worker(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether a write the run started waits for its commit (see
    /// [`await_write_function`]).
    pub(super) fn set_write_waiting(&self, waiting: bool) {
        self.write_waiting.store(waiting, Ordering::Relaxed);
    }

    /// The run waited `waited` for a write, suspended, on its worker: time
    /// that does not count against its slice there.
    pub(super) fn extend_slice(&self, waited: Duration) {
        let waited = u64::try_from(waited.as_nanos()).unwrap_or(NEVER);
        let _ = self
            .slice_end
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |end| {
                (end != NEVER).then(|| end.saturating_add(waited).min(NEVER - 1))
            });
    }

    /// The run goes on where no slice ends (a blocking thread).
    pub(super) fn end_slice(&self) {
        self.slice_end.store(NEVER, Ordering::Relaxed);
    }

    /// Stops the run for good with its time limit (a write of it stopped
    /// waiting at the run's deadline).
    pub(super) fn time_up(&self) {
        self.hit.store(HIT_TIME, Ordering::Relaxed);
        self.stop();
    }

    /// Stops the run for good (the response limit, `kvdb.exit`).
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub(super) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Looks at the instruction and time limits now (after `spent` more
    /// instructions); whether the run is stopped.
    pub(super) fn check(&self, spent: u64) -> bool {
        let n = self
            .instructions
            .fetch_add(spent, Ordering::Relaxed)
            .saturating_add(spent);
        if self.stopped() {
            return true;
        }
        let hit = if n > self.max_instructions.load(Ordering::Relaxed) {
            HIT_INSTRUCTIONS
        } else if self.elapsed() >= self.deadline.load(Ordering::Relaxed) {
            HIT_TIME
        } else {
            return false;
        };
        self.hit.store(hit, Ordering::Relaxed);
        self.stop();
        true
    }

    /// The limit the hook or [`Meter::check`] found hit, with its message.
    pub(super) fn limit_hit(&self, limits: &Limits) -> Option<(Limit, String)> {
        match self.hit.load(Ordering::Relaxed) {
            HIT_INSTRUCTIONS => Some((
                Limit::Instructions,
                format!(
                    "the script ran more than {} Lua instructions: {}",
                    limits.instructions,
                    crate::script::INSTRUCTIONS_HINT
                ),
            )),
            HIT_TIME => Some((Limit::Time, limits.time_detail())),
            _ => None,
        }
    }

    fn tick(&self) -> Next {
        if self.check(u64::from(HOOK_EVERY)) {
            return Next::Stop(c"the script was stopped by a limit");
        }
        if self.slice_over() {
            return Next::Suspend;
        }
        Next::Continue
    }
}

/// This thread's CPU time so far (a system call: the vDSO does not serve
/// this clock).
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

thread_local! {
    /// The meter of the run this thread is running, while it runs it.
    static RUNNING: Cell<*const Meter> = const { Cell::new(std::ptr::null()) };
}

/// While alive, the hook on this thread counts against `meter`.
pub(super) struct Metering {
    before: *const Meter,
}

impl Metering {
    pub(super) fn new(meter: &Meter) -> Self {
        let before = RUNNING.with(|r| r.replace(std::ptr::from_ref(meter)));
        Self { before }
    }
}

impl Drop for Metering {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.before));
    }
}

/// Installs the hook on `thread`.
pub(super) fn install_on_thread(thread: &mlua::Thread) {
    // SAFETY: the pointer is the thread's `lua_State`, alive while the
    // caller holds the thread.
    unsafe { install(thread.to_pointer().cast_mut().cast()) }
}

/// Installs the hook on the main state of `lua`.
///
/// # Errors
/// Lua could not run the installation (out of memory).
pub(super) fn install_on_main(lua: &mlua::Lua) -> mlua::Result<()> {
    // SAFETY: `exec_raw` hands over the main state of `lua`, alive.
    unsafe { lua.exec_raw::<()>((), |state| install(state)) }
}

/// # Safety
/// `state` is a live Lua state.
unsafe fn install(state: *mut ffi::lua_State) {
    // SAFETY: the caller's promise; `limits_hook` has the hook signature.
    unsafe {
        ffi::lua_sethook(
            state,
            Some(limits_hook),
            ffi::LUA_MASKCOUNT,
            c_int::try_from(HOOK_EVERY).unwrap_or(c_int::MAX),
        );
    }
}

/// `leave_worker()`, a Lua function for the sandbox's wrappers: a run on an
/// async worker is suspended, as the hook suspends one past its slice, so
/// that it goes on on a blocking thread; elsewhere it does nothing. Called
/// before the library calls that may run the script's own code where Lua
/// can't suspend it (a metamethod or comparator called from C): there the
/// hook can stop a run at its limits but not move it, and two such runs
/// held both workers of a two-core server for their whole time limit, every
/// bucket's requests waiting behind them (found by a review).
///
/// # Errors
/// Lua could not create the function (out of memory).
pub(super) fn leave_worker_function(lua: &mlua::Lua) -> mlua::Result<mlua::Function> {
    // SAFETY: `leave_worker` has the signature of a Lua C function and
    // follows its protocol.
    unsafe { lua.create_c_function(leave_worker) }
}

unsafe extern "C-unwind" fn leave_worker(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: the caller's state, live.
    unsafe { suspend_on_worker(state, true) }
}

/// Suspends the run of `state` (a yield that returns no values when it
/// is resumed) if it is on an async worker, its slice over unless
/// `anyway`, where Lua can yield; else returns 0, the C function's results.
///
/// # Safety
/// `state` is a live Lua state running a C function.
unsafe fn suspend_on_worker(state: *mut ffi::lua_State, anyway: bool) -> c_int {
    let meter = RUNNING.with(Cell::get);
    if meter.is_null() {
        return 0;
    }
    // SAFETY: as in `limits_hook`: the meter is alive while it is set.
    let meter = unsafe { &*meter };
    // SAFETY: a C function of a live state may yield where the thread is
    // yieldable (checked).
    unsafe {
        if meter.on_worker() && (anyway || meter.slice_over()) && ffi::lua_isyieldable(state) != 0 {
            return ffi::lua_yield(state, 0);
        }
    }
    0
}

/// `await_write()`, a Lua function for the sandbox's wrappers of the
/// `kvdb` writes: a run on an async worker whose write waits for its commit
/// (one not done at its first poll) is suspended, so that the worker serves
/// other requests meanwhile; the runtime waits for the write and resumes the
/// run on an async worker (see `State::on_the_worker`). Elsewhere (a
/// blocking thread, or inside a function Lua called from C, where it can't
/// yield) it does nothing, and the wrapper's next call waits for the write
/// on its thread (`Host::wait_write`).
///
/// # Errors
/// Lua could not create the function (out of memory).
pub(super) fn await_write_function(lua: &mlua::Lua) -> mlua::Result<mlua::Function> {
    // SAFETY: `await_write` has the signature of a Lua C function and
    // follows its protocol.
    unsafe { lua.create_c_function(await_write) }
}

unsafe extern "C-unwind" fn await_write(state: *mut ffi::lua_State) -> c_int {
    let meter = RUNNING.with(Cell::get);
    // SAFETY: as in `limits_hook`: the meter is alive while it is set.
    if meter.is_null() || !unsafe { (*meter).write_waiting.load(Ordering::Relaxed) } {
        return 0;
    }
    // SAFETY: the caller's state, live.
    unsafe { suspend_on_worker(state, true) }
}

/// `check()`, called by the sandbox's wrappers of the library functions
/// whose one call can take long, before each call: raises if the run is
/// over its time or was stopped (an ordinary error raised from a call, not
/// from the hook), and suspends a run on an async worker whose slice is
/// over, as the hook does. The hook looks only every [`HOOK_EVERY`]
/// instructions, and a loop of long calls makes few: 200 calls of 75 ms
/// each held a worker for the whole time limit (found by a review).
///
/// # Errors
/// Lua could not create the function (out of memory).
pub(super) fn check_function(lua: &mlua::Lua) -> mlua::Result<mlua::Function> {
    // SAFETY: `check_call` has the signature of a Lua C function and
    // follows its protocol.
    unsafe { lua.create_c_function(check_call) }
}

unsafe extern "C-unwind" fn check_call(state: *mut ffi::lua_State) -> c_int {
    let meter = RUNNING.with(Cell::get);
    // SAFETY: as in `limits_hook`: the meter is alive while it is set.
    if !meter.is_null() && unsafe { (*meter).check(0) } {
        // SAFETY: raising from a C function; nothing here needs dropping.
        unsafe {
            ffi::lua_pushstring(state, c"the script was stopped by a limit".as_ptr());
            ffi::lua_error(state);
        }
    }
    // SAFETY: the caller's state, live.
    unsafe { suspend_on_worker(state, false) }
}

/// The hook: counts, stops a run over a limit (with `lua_error`, leaving
/// the stack to Lua), suspends one past its slice where Lua can yield (where
/// it can't, inside a C function's callback, the next call tries again).
/// Holds nothing that needs dropping where it raises.
unsafe extern "C-unwind" fn limits_hook(state: *mut ffi::lua_State, _: *mut ffi::lua_Debug) {
    let meter = RUNNING.with(Cell::get);
    if meter.is_null() {
        return;
    }
    // SAFETY: `Metering` keeps the meter alive and the pointer set only
    // while its run executes on this thread.
    let next = unsafe { (*meter).tick() };
    match next {
        Next::Continue => {}
        // SAFETY: a count hook of a live state; yielding from a count hook
        // is allowed where the thread is yieldable (checked).
        Next::Suspend => unsafe {
            if ffi::lua_isyieldable(state) != 0 {
                ffi::lua_yield(state, 0);
            } else {
                (*meter).held.store(true, Ordering::Relaxed);
            }
        },
        // SAFETY: raising from a hook is allowed; nothing in this frame
        // needs dropping.
        Next::Stop(message) => unsafe {
            ffi::lua_pushstring(state, message.as_ptr());
            ffi::lua_error(state);
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{LONG_ON_WORKER, Meter, PREEMPTED_ROOM};
    use crate::script::Limits;

    /// A run past its slice by the wall clock but with little CPU time on
    /// its worker (preempted: here, asleep) keeps its worker, up to
    /// [`PREEMPTED_ROOM`] past the slice; one that used its CPU time there
    /// does not.
    #[test]
    fn a_preempted_run_keeps_its_slice_a_while() {
        let meter = Meter::new();
        let started = Instant::now();
        meter.start(&Limits::default(), Some(started));
        meter.start_step(Duration::ZERO);
        let over = meter.slice_over();
        // (Unless this thread itself was descheduled past the room.)
        if started.elapsed() < PREEMPTED_ROOM {
            assert!(!over, "a run that used no CPU time was moved");
        }
        std::thread::sleep(PREEMPTED_ROOM + Duration::from_millis(1));
        assert!(meter.slice_over(), "a run far past its slice stayed");

        // Its CPU time, not the wall clock: the slice starts after the spin.
        let meter = Meter::new();
        meter.start_step(Duration::ZERO);
        let spin = Instant::now();
        while meter.cpu_on_worker() < LONG_ON_WORKER {
            assert!(spin.elapsed() < Duration::from_secs(10), "no CPU time");
        }
        meter.start(&Limits::default(), Some(Instant::now()));
        assert!(meter.slice_over(), "a run that used its CPU time stayed");

        // CPU time of earlier steps counts.
        let meter = Meter::new();
        meter.start(&Limits::default(), Some(Instant::now()));
        meter.start_step(LONG_ON_WORKER);
        assert!(
            meter.slice_over(),
            "earlier steps' CPU time was not counted"
        );
    }
}

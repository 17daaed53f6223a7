//! The `bindgen!` output for `wit/kvdb.wit` (world `script`), and nothing else.
//!
//! The export is called as an `async` function (the guest runs on a fiber,
//! so a long run can be suspended and moved off an async worker). The
//! writes are `async` imports: a write waiting for its commit suspends the
//! guest's fiber, and the async worker serves other requests meanwhile
//! (waiting on the thread made every run of a script that writes go
//! through a blocking thread: ~3.6 thread switches and ~90 µs of CPU a run
//! of the visitors counter at 64 connections, against ~15 µs for a PATCH).
//! The reads, `scope` and `log` are async too: a call past the run's slice on
//! the async worker hands control back first (`give_way`; wasmtime has
//! copied its arguments by then, one call's worth).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "script",
    imports: {
        "kvdb:script/kv": async,
        "kvdb:script/scope": async,
        "kvdb:script/log": async,
    },
    exports: { default: async },
});

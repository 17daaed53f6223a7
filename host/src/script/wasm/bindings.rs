//! The `bindgen!` output for `wit/kvdb.wit` (world `script`), and nothing else.
//!
//! The export is called as an `async` function (the guest runs on a fiber,
//! so a long run can be suspended and moved off an async worker); the
//! imports are plain functions.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "script",
    exports: { default: async },
});

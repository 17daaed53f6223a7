//! The `bindgen!` output for `wit/kvdb.wit` (world `script`), and nothing else.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "script",
});

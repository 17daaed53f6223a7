//! End-to-end tests: the real `kvdb` binary over HTTP. One test binary, one
//! harness ([`harness::TestServer`]), suites by topic.

mod atomics;
mod auth;
mod backup;
mod buckets;
mod clients;
mod connections;
mod durability;
mod editor;
mod errors;
mod expiry;
mod harness;
mod listing;
mod lua_api;
mod lua_sandbox;
mod parity;
mod smoke;
mod values;
mod wasm;

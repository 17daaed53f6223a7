//! End-to-end tests: the real `kvdb` binary over HTTP. One test binary, one
//! harness ([`harness::TestServer`]), suites by topic.

mod atomics;
mod auth;
mod backup;
mod buckets;
mod durability;
mod errors;
mod expiry;
mod harness;
mod listing;
mod smoke;
mod values;

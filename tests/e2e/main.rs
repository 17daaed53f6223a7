//! End-to-end tests: the real `kvdb` binary over HTTP. One test binary, one
//! harness ([`harness::TestServer`]), suites by topic.

mod harness;
mod smoke;

//! An existing kvdb.io client library, unchanged, against the real server:
//! the JavaScript client from npm (`kvdb.io` 1.0.5, pinned in
//! `tests/clients/package-lock.json`) with only its `BASE_URL` pointed at us.
//! `tests/clients/kvdbio.cjs` drives it and asserts what it gets back; this
//! test then checks over plain HTTP what the client left in the buckets.
//!
//! Needs Node.js and `npm ci` in `tests/clients/`; `./test.sh` does the
//! latter. Without them it fails, it never skips.

use std::path::Path;
use std::time::Duration;

use crate::harness::{TestServer, run_node};

const CLIENT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients");
const CLIENT_TEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients/kvdbio.cjs");
/// Far beyond the second a run takes; only a hung client gets here.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn the_kvdb_io_javascript_client_works_unchanged() {
    assert!(
        Path::new(CLIENT_DIR)
            .join("node_modules/kvdb.io/package.json")
            .exists(),
        "the client test needs tests/clients/node_modules (npm ci): run ./test.sh from the repository root, which installs it"
    );
    let s = TestServer::start();
    let bucket = s.create_bucket("secret_key=s3cret&read_key=r3ad&write_key=wr1te");
    let open = s.create_bucket("");

    let output = run_node(
        CLIENT_DIR,
        CLIENT_TEST,
        &[s.base(), &bucket, "s3cret", "r3ad", "wr1te", &open],
        CLIENT_TIMEOUT,
    );
    assert!(
        output.contains("every check passed"),
        "the client script ended without its last line:\n{output}"
    );

    // What the client wrote is what the server holds, typed as it was sent.
    let read = |path: &str| s.get(&format!("/{bucket}/{path}?key=r3ad"));
    let r = read("visits");
    assert_eq!((r.status, r.text()), (200, "40".to_owned()));
    assert_eq!(read("concurrent").text(), "50");
    assert_eq!(read("ratio").text(), "-0.99");
    assert_eq!(read("greeting").text(), "hi");
    assert_eq!(read("users:1:flavor").text(), "oatmeal");
    assert_eq!(
        read("users:2:name").text(),
        "bob",
        "a token wrote outside its prefix"
    );
    let profile = read("profile");
    assert_eq!(profile.json(), serde_json::json!({"name": "Ada"}));
    assert_eq!(
        profile.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(read("doomed").status, 404);
    let listed = s.get(&format!("/{open}/?format=json"));
    assert_eq!(listed.json(), serde_json::json!(["kept"]));
}

//! The README's first steps work against a fresh server.

use crate::harness::TestServer;

#[test]
fn create_set_get_count_and_list() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=s3cret");
    assert_eq!(b.len(), 22);
    assert_eq!(s.put(&format!("/{b}/hello"), "world").status, 204);
    let r = s.get(&format!("/{b}/hello"));
    assert_eq!((r.status, r.text().as_str()), (200, "world"));
    for expected in 1..=3 {
        assert_eq!(
            s.patch(&format!("/{b}/n"), "+1").text(),
            expected.to_string()
        );
    }
    let listing = s.request(
        "GET",
        &format!("/{b}/?format=json"),
        &[("authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(listing.json(), serde_json::json!(["hello", "n"]));
}

#[test]
fn sigterm_stops_cleanly_with_exit_zero() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    s.put(&format!("/{b}/k"), "v");
    assert!(s.terminate().success());
}

/// A log that goes to a file or a pipe is plain text: no terminal colour
/// codes in it (they are for a terminal only).
#[test]
fn a_log_written_to_a_pipe_has_no_colour_codes() {
    // An empty admin token makes the server log a warning at once.
    let logged = TestServer::log_of(&["--admin-token", ""]);
    assert!(logged.contains("WARN"), "log: {logged}");
    assert!(!logged.contains('\u{1b}'), "log: {logged:?}");
}

//! Expiry: `?ttl=`, the bucket's `default_ttl`, `ttl=0`, and every write
//! setting the expiry afresh.
//!
//! Each test waits once, a little over two seconds, for its one-second keys
//! to expire; the keys meant to survive are checked after the same wait.

use std::thread::sleep;
use std::time::Duration;

use serde_json::json;

use crate::harness::TestServer;

/// Long enough for a `ttl=1` key to be gone (expiry is exact to the
/// millisecond; the margin covers a slow machine).
const PAST_ONE_SECOND: Duration = Duration::from_millis(2200);

fn status(s: &TestServer, path: &str) -> u16 {
    s.get(path).status
}

fn keys(s: &TestServer, b: &str) -> Vec<String> {
    let r = s.get(&format!("/{b}/?format=json"));
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_value(r.json()).expect("keys")
}

#[test]
fn ttl_key_is_gone_for_get_head_listing_and_patch() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    for k in ["get", "head", "patch", "append", "max"] {
        let r = s.put(&format!("/{b}/{k}?ttl=1"), "41");
        assert_eq!(r.status, 204, "{}", r.text());
    }
    s.put(&format!("/{b}/keep"), "v");
    // Alive before the deadline.
    assert_eq!(s.get(&format!("/{b}/get")).text(), "41");
    assert_eq!(
        keys(&s, &b),
        ["append", "get", "head", "keep", "max", "patch"]
    );

    sleep(PAST_ONE_SECOND);

    s.get(&format!("/{b}/get")).assert_problem(404);
    assert_eq!(
        s.request("HEAD", &format!("/{b}/head"), &[], None).status,
        404
    );
    assert_eq!(keys(&s, &b), ["keep"]);
    let r = s.get(&format!("/{b}/?values=true"));
    assert_eq!(r.text(), "keep=v\n");
    // An expired key is missing for atomic operations too.
    let r = s.patch(&format!("/{b}/patch"), "+1");
    assert_eq!((r.status, r.text().as_str()), (200, "1"), "counts from 0");
    let r = s.patch(&format!("/{b}/max?op=max"), "-5");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "-5"),
        "stores the operand"
    );
    let r = s.patch(&format!("/{b}/append?op=append"), "x");
    assert_eq!((r.status, r.text().as_str()), (200, "x"), "starts afresh");
}

#[test]
fn expired_key_counts_as_absent_for_deletes_and_conditions() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let etag = s
        .put(&format!("/{b}/del?ttl=1"), "v")
        .header("etag")
        .expect("etag");
    s.put(&format!("/{b}/lock?ttl=1"), "held");
    s.put(&format!("/{b}/cas?ttl=1"), "v");

    sleep(PAST_ONE_SECOND);

    s.delete(&format!("/{b}/del")).assert_problem(404);
    // Set-if-absent succeeds on an expired key.
    let r = s.request(
        "PUT",
        &format!("/{b}/lock"),
        &[("if-none-match", "*")],
        Some(b"mine"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(s.get(&format!("/{b}/lock")).text(), "mine");
    // If-Match of the expired version fails: the key is absent.
    s.request(
        "PUT",
        &format!("/{b}/cas"),
        &[("if-match", &etag)],
        Some(b"new"),
    )
    .assert_problem(412);
    assert_eq!(status(&s, &format!("/{b}/cas")), 404);
}

#[test]
fn default_ttl_applies_when_a_write_has_no_ttl() {
    let s = TestServer::start();
    let b = s.create_bucket("default_ttl=1");
    s.put(&format!("/{b}/put"), "v");
    s.post(&format!("/{b}/post"), "v");
    s.patch(&format!("/{b}/patched"), "+1");
    s.put(&format!("/{b}/longer?ttl=3600"), "v");
    assert_eq!(status(&s, &format!("/{b}/put")), 200);

    sleep(PAST_ONE_SECOND);

    assert_eq!(status(&s, &format!("/{b}/put")), 404);
    assert_eq!(status(&s, &format!("/{b}/post")), 404);
    assert_eq!(status(&s, &format!("/{b}/patched")), 404);
    assert_eq!(
        status(&s, &format!("/{b}/longer")),
        200,
        "an explicit ttl wins"
    );
    assert_eq!(keys(&s, &b), ["longer"]);
}

#[test]
fn default_ttl_given_as_json_on_creation_applies() {
    let s = TestServer::start();
    let r = s.request(
        "POST",
        "/",
        &[("content-type", "application/json")],
        Some(br#"{"default_ttl": 1}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.text();
    s.put(&format!("/{b}/k"), "v");
    assert_eq!(status(&s, &format!("/{b}/k")), 200);
    sleep(PAST_ONE_SECOND);
    assert_eq!(status(&s, &format!("/{b}/k")), 404);
}

#[test]
fn ttl_zero_means_never_even_with_a_default_ttl() {
    let s = TestServer::start();
    let b = s.create_bucket("default_ttl=1");
    s.put(&format!("/{b}/forever?ttl=0"), "v");
    s.patch(&format!("/{b}/count?ttl=0"), "+1");
    s.patch(&format!("/{b}/log?op=append&ttl=0"), "a");

    sleep(PAST_ONE_SECOND);

    assert_eq!(s.get(&format!("/{b}/forever")).text(), "v");
    assert_eq!(s.get(&format!("/{b}/count")).text(), "1");
    assert_eq!(s.get(&format!("/{b}/log")).text(), "a");
    assert_eq!(keys(&s, &b), ["count", "forever", "log"]);
}

#[test]
fn every_write_sets_the_expiry_afresh() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    // A later write without ttl (and no default_ttl): no expiry any more.
    s.put(&format!("/{b}/put-clears?ttl=1"), "a");
    s.put(&format!("/{b}/put-clears"), "b");
    // PATCH without ttl also clears it.
    s.put(&format!("/{b}/patch-clears?ttl=1"), "1");
    assert_eq!(s.patch(&format!("/{b}/patch-clears"), "+1").text(), "2");
    s.put(&format!("/{b}/append-clears?ttl=1"), "x");
    s.patch(&format!("/{b}/append-clears?op=append"), "y");
    // A later write with a short ttl makes a long-lived key expire.
    s.put(&format!("/{b}/put-shortens?ttl=3600"), "v");
    s.put(&format!("/{b}/put-shortens?ttl=1"), "v");
    s.put(&format!("/{b}/patch-shortens"), "5");
    s.patch(&format!("/{b}/patch-shortens?ttl=1"), "+1");
    s.put(&format!("/{b}/json-shortens"), r#"{"a":1}"#);
    let r = s.request(
        "PATCH",
        &format!("/{b}/json-shortens?ttl=1"),
        &[("content-type", "application/merge-patch+json")],
        Some(br#"{"b":2}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    sleep(PAST_ONE_SECOND);

    assert_eq!(s.get(&format!("/{b}/put-clears")).text(), "b");
    assert_eq!(s.get(&format!("/{b}/patch-clears")).text(), "2");
    assert_eq!(s.get(&format!("/{b}/append-clears")).text(), "xy");
    assert_eq!(status(&s, &format!("/{b}/put-shortens")), 404);
    assert_eq!(status(&s, &format!("/{b}/patch-shortens")), 404);
    assert_eq!(status(&s, &format!("/{b}/json-shortens")), 404);
    assert_eq!(
        keys(&s, &b),
        ["append-clears", "patch-clears", "put-clears"]
    );
}

#[test]
fn writes_with_default_ttl_restart_the_default_each_time() {
    let s = TestServer::start();
    let b = s.create_bucket("default_ttl=1");
    // ttl=0 first, then a write without ttl: the default applies again.
    s.put(&format!("/{b}/k?ttl=0"), "1");
    s.patch(&format!("/{b}/k"), "+1");
    s.put(&format!("/{b}/stays?ttl=0"), "v");

    sleep(PAST_ONE_SECOND);

    assert_eq!(status(&s, &format!("/{b}/k")), 404);
    assert_eq!(keys(&s, &b), ["stays"]);
    assert_eq!(
        s.get(&format!("/{b}/?format=json&values=true")).json(),
        json!([["stays", "v"]])
    );
}

#[test]
fn a_failed_write_does_not_change_the_expiry() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    s.put(&format!("/{b}/k?ttl=1"), "text");
    // Rejected: +1 on text is 409, and it must not clear the ttl.
    s.patch(&format!("/{b}/k"), "+1").assert_problem(409);
    s.put(&format!("/{b}/j?ttl=1"), "{}");
    s.request(
        "PUT",
        &format!("/{b}/j"),
        &[("if-match", "\"stale\"")],
        Some(b"x"),
    )
    .assert_problem(412);

    sleep(PAST_ONE_SECOND);

    assert_eq!(status(&s, &format!("/{b}/k")), 404);
    assert_eq!(status(&s, &format!("/{b}/j")), 404);
}

//! Atomic operations (`PATCH /:bucket/:key`) and conditional writes.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;

use crate::harness::{Resp, TestServer};

const TEXT: &str = "text/plain; charset=utf-8";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

fn patch_typed(s: &TestServer, path: &str, content_type: &str, body: &str) -> Resp {
    s.request(
        "PATCH",
        path,
        &[("content-type", content_type)],
        Some(body.as_bytes()),
    )
}

fn with_header(s: &TestServer, method: &str, path: &str, header: (&str, &str), body: &str) -> Resp {
    let body = (method != "DELETE").then_some(body.as_bytes());
    s.request(method, path, &[header], body)
}

#[track_caller]
fn assert_text(r: &Resp, expected: &str) {
    assert_eq!((r.status, r.text().as_str()), (200, expected));
}

/// The value now stored, or `None` when the key is absent.
fn current(s: &TestServer, path: &str) -> Option<String> {
    let r = s.get(path);
    match r.status {
        200 => Some(r.text()),
        404 => None,
        other => panic!("GET {path}: {other} {}", r.text()),
    }
}

// ----- +N / -N ---------------------------------------------------------------

#[test]
fn add_on_a_missing_key_counts_from_zero() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let r = s.patch(&format!("/{b}/hits"), "+5");
    assert_text(&r, "5");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
    assert_eq!(current(&s, &format!("/{b}/hits")).as_deref(), Some("5"));
}

#[test]
fn subtract_on_a_missing_key_goes_negative() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    assert_text(&s.patch(&format!("/{b}/n"), "-3"), "-3");
}

#[test]
fn add_and_subtract_integers_answer_the_new_value_as_text_plain() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "10");
    assert_text(&s.patch(&path, "+5"), "15");
    assert_text(&s.patch(&path, "-20"), "-5");
    let r = s.patch(&path, "+0");
    assert_text(&r, "-5");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
    assert_eq!(current(&s, &path).as_deref(), Some("-5"));
}

/// The kvdb.io client sends `incr(key, 0)` as a bare `0`; any other bare
/// number is a 400 that says to sign it (or to PUT it), and changes nothing.
#[test]
fn a_bare_zero_adds_nothing_and_other_bare_numbers_are_400() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "7");
    assert_text(&s.patch(&path, "0"), "7");
    assert_text(&s.patch(&format!("/{b}/fresh"), "0"), "0");
    for body in ["5", "0.5", "1e3"] {
        let detail = s.patch(&path, body).assert_problem(400);
        assert!(
            detail.contains("sign it") && detail.contains("PUT"),
            "{body}: {detail}"
        );
    }
    assert_eq!(current(&s, &path).as_deref(), Some("7"));
}

#[test]
fn add_accepts_a_form_encoded_body_as_sent_by_curl_d() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let r = s.request(
        "PATCH",
        &format!("/{b}/n"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(b"+1"),
    );
    assert_text(&r, "1");
}

#[test]
fn add_floats() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/f");
    s.put(&path, "1.5");
    assert_text(&s.patch(&path, "+2.25"), "3.75");
    let r = s.patch(&path, "-0.75");
    assert_eq!(r.status, 200);
    assert_eq!(r.text().parse::<f64>().expect("a number"), 3.0);
    assert_eq!(s.get(&path).text().parse::<f64>().expect("a number"), 3.0);
}

#[test]
fn adding_a_float_to_an_integer_gives_a_float() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "1");
    assert_text(&s.patch(&path, "+0.5"), "1.5");
    assert_eq!(current(&s, &path).as_deref(), Some("1.5"));
}

#[test]
fn integer_overflow_is_409_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "9223372036854775807");
    s.patch(&path, "+1").assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("9223372036854775807"));
    // Still an integer that can go down.
    assert_text(&s.patch(&path, "-7"), "9223372036854775800");
}

/// A whole-number step outside the 64-bit range read as a float would turn
/// an integer counter into a float (found by a review): it is refused, and
/// the same step with an exponent adds as a float.
#[test]
fn an_integer_step_outside_64_bits_is_400_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "5");
    for step in ["+99999999999999999999", "-9223372036854775809"] {
        let detail = s.patch(&path, step).assert_problem(400);
        assert!(
            detail.contains("64-bit integer range") && detail.contains("1e20"),
            "{step}: {detail}"
        );
        // The fix keeps the step's sign.
        let fix = format!("{}1e20", &step[..1]);
        assert!(detail.contains(&fix), "{step}: {detail}");
    }
    assert_eq!(current(&s, &path).as_deref(), Some("5"));
    // The ends of the range are steps.
    assert_text(
        &s.patch(&path, "-9223372036854775808"),
        "-9223372036854775803",
    );
    assert_text(&s.patch(&path, "+9223372036854775807"), "4");
    assert_text(&s.patch(&path, "+1e20"), "100000000000000000000");
}

#[test]
fn integer_underflow_is_409_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "-9223372036854775808");
    s.patch(&path, "-1").assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("-9223372036854775808"));
}

#[test]
fn add_to_raw_text_is_409_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/t");
    s.put(&path, "hello");
    s.patch(&path, "+1").assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("hello"));
}

#[test]
fn add_to_a_json_value_is_409_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/j");
    s.put(&path, r#"{"n":1}"#);
    s.patch(&path, "+1").assert_problem(409);
    assert_eq!(s.get(&path).json(), json!({"n": 1}));
}

// ----- merge patch (RFC 7396) -------------------------------------------------

#[test]
fn merge_patch_merges_into_a_json_object() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    s.put(&path, r#"{"a":1,"b":{"c":2,"keep":true},"list":[1,2]}"#);
    let r = patch_typed(
        &s,
        &path,
        MERGE,
        r#"{"b":{"c":null,"d":3},"e":"x","list":[9]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let expected = json!({"a": 1, "b": {"keep": true, "d": 3}, "e": "x", "list": [9]});
    assert_eq!(r.json(), expected);
    assert_eq!(s.get(&path).json(), expected);
}

#[test]
fn merge_patch_onto_raw_text_is_409_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/t");
    s.put(&path, "plain text");
    patch_typed(&s, &path, MERGE, r#"{"a":1}"#).assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("plain text"));
}

#[test]
fn malformed_merge_patch_is_400_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    s.put(&path, r#"{"a":1}"#);
    patch_typed(&s, &path, MERGE, r#"{"a":"#).assert_problem(400);
    assert_eq!(s.get(&path).json(), json!({"a": 1}));
}

// ----- JSON patch (RFC 6902) --------------------------------------------------

#[test]
fn json_patch_applies_add_replace_remove() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    s.put(&path, r#"{"name":"a","tags":["x"],"old":1}"#);
    let r = patch_typed(
        &s,
        &path,
        JSON_PATCH,
        r#"[{"op":"replace","path":"/name","value":"b"},
            {"op":"add","path":"/tags/-","value":"y"},
            {"op":"remove","path":"/old"}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let expected = json!({"name": "b", "tags": ["x", "y"]});
    assert_eq!(r.json(), expected);
    assert_eq!(s.get(&path).json(), expected);
}

#[test]
fn json_patch_test_op_makes_compare_and_set_succeed_when_it_matches() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/acct");
    s.put(&path, r#"{"owner":{"id":7},"balance":100}"#);
    let r = patch_typed(
        &s,
        &path,
        JSON_PATCH,
        r#"[{"op":"test","path":"/owner/id","value":7},
            {"op":"replace","path":"/balance","value":50}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get(&path).json()["balance"], 50);
}

#[test]
fn json_patch_test_op_mismatch_is_409_and_changes_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/acct");
    s.put(&path, r#"{"owner":{"id":7},"balance":100}"#);
    let etag = s.get(&path).header("etag");
    patch_typed(
        &s,
        &path,
        JSON_PATCH,
        r#"[{"op":"replace","path":"/balance","value":0},
            {"op":"test","path":"/owner/id","value":8}]"#,
    )
    .assert_problem(409);
    let g = s.get(&path);
    assert_eq!(g.json(), json!({"owner": {"id": 7}, "balance": 100}));
    assert_eq!(
        g.header("etag"),
        etag,
        "a rejected patch does not bump the ETag"
    );
}

#[test]
fn json_patch_on_a_missing_path_is_409_and_changes_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    s.put(&path, r#"{"a":1}"#);
    patch_typed(
        &s,
        &path,
        JSON_PATCH,
        r#"[{"op":"remove","path":"/nope/deeper"}]"#,
    )
    .assert_problem(409);
    assert_eq!(s.get(&path).json(), json!({"a": 1}));
}

/// Found by a review: JSON pointers are flat strings, so a patch of small
/// operations could build a document 12,000 levels deep, and serializing
/// it overflowed the writer thread's stack and took the server down.
#[test]
fn json_patch_that_would_nest_too_deep_is_409_and_the_server_stays_up() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    let chain = |levels: usize| "{\"x\":".repeat(levels) + "1" + &"}".repeat(levels);
    let ops: Vec<String> = (0..100)
        .map(|k| {
            format!(
                r#"{{"op":"add","path":"{}/x","value":{}}}"#,
                "/x".repeat(120 * k),
                chain(120)
            )
        })
        .collect();
    s.put(&path, "{}");
    let r = patch_typed(&s, &path, JSON_PATCH, &format!("[{}]", ops.join(",")));
    r.assert_problem(409);
    assert!(r.text().contains("deeper than 127 levels"), "{}", r.text());
    assert_eq!(s.get(&path).json(), json!({}), "nothing applied");
    // A copy of the document into itself, over and over: each one doubles it.
    s.put(&path, &format!(r#"{{"a":"{}"}}"#, "x".repeat(64 * 1024)));
    let ops: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"op":"copy","from":"","path":"/c{i}"}}"#))
        .collect();
    let r = patch_typed(&s, &path, JSON_PATCH, &format!("[{}]", ops.join(",")));
    r.assert_problem(413);
    assert!(
        r.text().contains("the limit is") && r.text().contains("split it over several keys"),
        "{}",
        r.text()
    );
    assert_eq!(
        s.get(&path).json()["a"].as_str().map(str::len),
        Some(64 * 1024)
    );
    assert!(s.get("/").status == 200, "the server still answers");
}

#[test]
fn json_patch_onto_raw_text_is_409() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/t");
    s.put(&path, "text");
    patch_typed(
        &s,
        &path,
        JSON_PATCH,
        r#"[{"op":"add","path":"/a","value":1}]"#,
    )
    .assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("text"));
}

#[test]
fn malformed_json_patch_document_is_400() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    s.put(&path, r#"{"a":1}"#);
    for bad in [
        r#"[{"op":"add","path":"/b""#,           // not JSON
        r#"{"op":"add","path":"/b","value":1}"#, // not an array
        r#"[{"op":"frobnicate","path":"/a"}]"#,  // unknown op
        r#"[{"op":"add","value":1}]"#,           // no path
    ] {
        patch_typed(&s, &path, JSON_PATCH, bad).assert_problem(400);
    }
    assert_eq!(s.get(&path).json(), json!({"a": 1}));
}

// ----- ?op=append / max / min -------------------------------------------------

#[test]
fn append_extends_a_raw_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/log");
    s.put(&path, "abc");
    let r = s.patch(&format!("{path}?op=append"), "def");
    assert_text(&r, "abcdef");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
    s.patch(&format!("{path}?op=append"), "\nghi");
    assert_eq!(current(&s, &path).as_deref(), Some("abcdef\nghi"));
}

#[test]
fn append_to_a_missing_key_creates_it() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/log");
    assert_text(&s.patch(&format!("{path}?op=append"), "first"), "first");
    assert_eq!(current(&s, &path).as_deref(), Some("first"));
    // A value the append creates keeps the request's media type, as a PUT
    // of the same bytes would; later appends keep it too.
    let png = format!("/{b}/img");
    for part in [&b"\x89PNG"[..], b"\r\n"] {
        let r = s.request(
            "PATCH",
            &format!("{png}?op=append"),
            &[("content-type", "image/png")],
            Some(part),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    }
    let g = s.get(&png);
    assert_eq!(g.body, b"\x89PNG\r\n");
    assert_eq!(g.header("content-type").as_deref(), Some("image/png"));
}

#[test]
fn append_keeps_the_raw_values_media_type() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/bin");
    s.request(
        "PUT",
        &path,
        &[("content-type", "application/octet-stream")],
        Some(&[0xff, 0x01]),
    );
    let r = s.request(
        "PATCH",
        &format!("{path}?op=append"),
        &[],
        Some(&[0x02, 0xfe]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let g = s.get(&path);
    assert_eq!(g.body, vec![0xff, 0x01, 0x02, 0xfe]);
    assert_eq!(
        g.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
}

#[test]
fn append_to_a_number_is_409_and_keeps_it() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "12");
    s.patch(&format!("{path}?op=append"), "3")
        .assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("12"));
    assert_text(&s.patch(&path, "+1"), "13");
}

#[test]
fn append_to_a_json_value_is_409() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/j");
    s.put(&path, "[1]");
    s.patch(&format!("{path}?op=append"), ",2")
        .assert_problem(409);
    assert_eq!(s.get(&path).json(), json!([1]));
}

#[test]
fn max_keeps_the_larger_number() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/best");
    s.put(&path, "5");
    assert_text(&s.patch(&format!("{path}?op=max"), "3"), "5");
    let r = s.patch(&format!("{path}?op=max"), "10");
    assert_text(&r, "10");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
    assert_eq!(current(&s, &path).as_deref(), Some("10"));
}

#[test]
fn max_and_min_tell_apart_integers_a_float_cannot() {
    // Nanosecond timestamps: 2^53 and above, where f64 steps by 2 or more.
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/latest");
    s.put(&path, "1700000000000000000");
    assert_text(
        &s.patch(&format!("{path}?op=max"), "1700000000000000001"),
        "1700000000000000001",
    );
    assert_text(
        &s.patch(&format!("{path}?op=min"), "1700000000000000000"),
        "1700000000000000000",
    );
    assert_eq!(current(&s, &path).as_deref(), Some("1700000000000000000"));
}

/// A stored number a double does not hold exactly stays as it was sent when
/// a `max`, a `min` or a `+0` keeps it (it was written again from a double:
/// `18446744073709551615` became `18446744073709552000`).
#[test]
fn a_number_that_stays_is_kept_as_sent() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    for text in ["18446744073709551615", "0.1000000000000000000000001"] {
        let path = format!("/{b}/n");
        s.put(&path, text);
        assert_text(&s.patch(&format!("{path}?op=max"), "0"), text);
        assert_text(&s.patch(&format!("{path}?op=min"), "1e30"), text);
        assert_text(&s.patch(&path, "+0"), text);
        assert_eq!(current(&s, &path).as_deref(), Some(text));
    }
}

#[test]
fn min_keeps_the_smaller_number() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/low");
    s.put(&path, "5");
    assert_text(&s.patch(&format!("{path}?op=min"), "7"), "5");
    assert_text(&s.patch(&format!("{path}?op=min"), "-2"), "-2");
    assert_eq!(current(&s, &path).as_deref(), Some("-2"));
}

/// An operand read as a float would compare an integer value through a
/// float (and store a float where the value was an integer): a whole
/// number outside 64 bits is refused, as a step is.
#[test]
fn a_max_or_min_operand_outside_64_bits_is_400_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "5");
    for (op, operand) in [
        ("max", "99999999999999999999"),
        ("min", "-9223372036854775809"),
    ] {
        let detail = s
            .patch(&format!("{path}?op={op}"), operand)
            .assert_problem(400);
        assert!(
            detail.contains("64-bit integer range") && detail.contains("1e20"),
            "{op} {operand}: {detail}"
        );
    }
    s.patch(&format!("/{b}/fresh?op=max"), "99999999999999999999")
        .assert_problem(400);
    assert_eq!(current(&s, &path).as_deref(), Some("5"));
    s.get(&format!("/{b}/fresh")).assert_problem(404);
    // With an exponent it is a float, compared by value.
    assert_text(
        &s.patch(&format!("{path}?op=max"), "1e20"),
        "100000000000000000000",
    );
}

#[test]
fn max_and_min_work_with_floats() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/t");
    s.put(&path, "1.5");
    assert_text(&s.patch(&format!("{path}?op=max"), "2.5"), "2.5");
    assert_text(&s.patch(&format!("{path}?op=min"), "0.25"), "0.25");
}

#[test]
fn max_and_min_on_a_missing_key_store_the_operand() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    assert_text(&s.patch(&format!("/{b}/hi?op=max"), "-4"), "-4");
    assert_text(&s.patch(&format!("/{b}/lo?op=min"), "9"), "9");
    assert_eq!(current(&s, &format!("/{b}/hi")).as_deref(), Some("-4"));
    assert_eq!(current(&s, &format!("/{b}/lo")).as_deref(), Some("9"));
}

#[test]
fn max_on_raw_text_is_409() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/t");
    s.put(&path, "abc");
    s.patch(&format!("{path}?op=max"), "1").assert_problem(409);
    assert_eq!(current(&s, &path).as_deref(), Some("abc"));
}

#[test]
fn max_with_a_non_numeric_operand_is_400() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "1");
    s.patch(&format!("{path}?op=max"), "abc")
        .assert_problem(400);
    s.patch(&format!("{path}?op=min"), "").assert_problem(400);
    assert_eq!(current(&s, &path).as_deref(), Some("1"));
}

// ----- conditional writes -----------------------------------------------------

/// Versions count the writes of the whole server: an ETag that showed one
/// would tell a bucket's users how many writes other buckets made between
/// two of theirs. ETags are hashes under the store's own secret (not the
/// signing key, which the bucket's creator sets and could try versions
/// with); they stay valid across a restart.
#[test]
fn etags_say_nothing_of_other_buckets_writes() {
    let s = TestServer::start();
    let mine = s.create_bucket("secret_key=sk&signing_key=known-0123456789abcdef");
    let other = s.create_bucket("");
    let path = format!("/{mine}/k");
    let auth = [("authorization", "Bearer sk")];
    let put = |s: &TestServer| {
        let r = s.request("PUT", &path, &auth, Some(b"v"));
        assert_eq!(r.status, 204, "{}", r.text());
        r.header("etag").expect("etag")
    };
    let first = put(&s);
    for i in 0..5 {
        assert_eq!(s.put(&format!("/{other}/k{i}"), "x").status, 204);
    }
    let second = put(&s);
    let number = |tag: &str| u64::from_str_radix(tag.trim_matches('"'), 16).expect("hex");
    let gap = number(&second).abs_diff(number(&first));
    assert!(
        gap > 1_000_000,
        "{first} then {second}: the gap counts writes"
    );
    // The same ETag after a restart: If-Match still holds.
    let s = s.restart_after_kill();
    let r = s.request("GET", &path, &auth, None);
    assert_eq!(r.header("etag").as_deref(), Some(second.as_str()));
    let r = s.request(
        "PUT",
        &path,
        &[
            ("authorization", "Bearer sk"),
            ("if-match", second.as_str()),
        ],
        Some(b"w"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
}

#[test]
fn put_with_if_match_of_the_current_etag_succeeds() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let etag = s.put(&path, "v1").header("etag").expect("etag");
    let r = with_header(&s, "PUT", &path, ("if-match", &etag), "v2");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(current(&s, &path).as_deref(), Some("v2"));
}

#[test]
fn put_with_if_match_of_a_stale_etag_is_412_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let stale = s.put(&path, "v1").header("etag").expect("etag");
    s.put(&path, "v2");
    with_header(&s, "PUT", &path, ("if-match", &stale), "v3").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("v2"));
}

#[test]
fn put_with_if_match_on_an_absent_key_is_412_and_creates_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    with_header(&s, "PUT", &path, ("if-match", "\"whatever\""), "v").assert_problem(412);
    assert_eq!(current(&s, &path), None);
    with_header(&s, "PUT", &path, ("if-match", "*"), "v").assert_problem(412);
    assert_eq!(current(&s, &path), None);
}

#[test]
fn if_match_star_or_a_list_holding_the_current_etag_lets_the_write_through() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    s.put(&path, "v1");
    let r = with_header(&s, "PUT", &path, ("if-match", "*"), "v2");
    assert_eq!(r.status, 204, "{}", r.text());
    let etag = r.header("etag").expect("etag");
    let list = format!("\"nope\", {etag}");
    let r = with_header(&s, "PUT", &path, ("if-match", &list), "v3");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(current(&s, &path).as_deref(), Some("v3"));
}

#[test]
fn if_match_compares_strongly_so_a_weak_etag_is_412() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let etag = s.put(&path, "v1").header("etag").expect("etag");
    with_header(&s, "PUT", &path, ("if-match", &format!("W/{etag}")), "v2").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("v1"));
}

#[test]
fn put_with_if_none_match_star_creates_only_when_absent() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/lock");
    let r = with_header(&s, "PUT", &path, ("if-none-match", "*"), "first");
    assert_eq!(r.status, 204, "{}", r.text());
    with_header(&s, "PUT", &path, ("if-none-match", "*"), "second").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("first"));
}

/// Found by a review: with both headers, `If-None-Match: *` alone was
/// checked, so a PUT with an `If-Match` created an absent key. RFC 9110
/// checks `If-Match` first, and no value can meet both.
#[test]
fn if_match_with_if_none_match_star_never_writes() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let both = |etag: &str, method: &str, body: &[u8]| {
        s.request(
            method,
            &path,
            &[("if-match", etag), ("if-none-match", "*")],
            Some(body),
        )
    };
    both("\"0000000000000000\"", "PUT", b"created").assert_problem(412);
    both("*", "PUT", b"created").assert_problem(412);
    assert_eq!(current(&s, &path), None);
    let etag = s.put(&path, "v1").header("etag").expect("etag");
    both(&etag, "PUT", b"v2").assert_problem(412);
    both(&etag, "PATCH", b"+1").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("v1"));
}

/// Found by a review: the size bound of a JSON patch never took away what
/// a `remove` frees, so a patch that removed a large member and added a
/// smaller one was refused (409) with the result far under the limit; a
/// result over the limit is a 413, as for every other write. And `test`
/// compares numbers by value (RFC 6902): `3.0` equals `3`.
#[test]
fn a_json_patch_is_judged_by_the_size_it_makes_and_tests_numbers_by_value() {
    let s = TestServer::start_with(&["--max-value-bytes", "1000"]);
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    s.put(&path, &format!(r#"{{"a":"{}","qty":3}}"#, "x".repeat(880)));
    let swap = format!(
        r#"[{{"op":"remove","path":"/a"}},{{"op":"add","path":"/b","value":"{}"}},{{"op":"test","path":"/qty","value":3.0}}]"#,
        "y".repeat(200)
    );
    let r = patch_typed(&s, &path, JSON_PATCH, &swap);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["b"].as_str().map(str::len), Some(200));
    let etag = s.get(&path).header("etag").expect("etag");
    let grow = format!(
        r#"[{{"op":"add","path":"/c","value":"{}"}}]"#,
        "z".repeat(900)
    );
    let r = patch_typed(&s, &path, JSON_PATCH, &grow);
    r.assert_problem(413);
    assert_eq!(s.get(&path).header("etag"), Some(etag), "nothing changed");
}

#[test]
fn put_with_if_none_match_star_after_delete_succeeds() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/lock");
    s.put(&path, "a");
    s.delete(&path);
    let r = with_header(&s, "PUT", &path, ("if-none-match", "*"), "b");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(current(&s, &path).as_deref(), Some("b"));
}

#[test]
fn patch_with_if_match_of_the_current_etag_succeeds() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    let etag = s.put(&path, "1").header("etag").expect("etag");
    let r = with_header(&s, "PATCH", &path, ("if-match", &etag), "+1");
    assert_text(&r, "2");
    // The ETag the PATCH answered is the one to use next.
    let next = r.header("etag").expect("PATCH answers an ETag");
    assert_text(
        &with_header(&s, "PATCH", &path, ("if-match", &next), "+1"),
        "3",
    );
}

#[test]
fn patch_with_if_match_of_a_stale_etag_is_412_and_keeps_the_value() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    let stale = s.put(&path, "1").header("etag").expect("etag");
    s.patch(&path, "+1");
    with_header(&s, "PATCH", &path, ("if-match", &stale), "+100").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("2"));
}

#[test]
fn patch_with_if_match_on_an_absent_key_is_412_and_creates_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    with_header(&s, "PATCH", &path, ("if-match", "\"x\""), "+1").assert_problem(412);
    assert_eq!(current(&s, &path), None);
}

#[test]
fn patch_with_if_none_match_star_on_an_existing_key_is_412() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/n");
    s.put(&path, "1");
    with_header(&s, "PATCH", &path, ("if-none-match", "*"), "+1").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("1"));
    // On an absent key it applies.
    let fresh = format!("/{b}/fresh");
    assert_text(
        &with_header(&s, "PATCH", &fresh, ("if-none-match", "*"), "+1"),
        "1",
    );
}

#[test]
fn merge_patch_with_a_stale_if_match_is_412() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/doc");
    let stale = s.put(&path, r#"{"v":1}"#).header("etag").expect("etag");
    s.put(&path, r#"{"v":2}"#);
    let r = s.request(
        "PATCH",
        &path,
        &[("content-type", MERGE), ("if-match", &stale)],
        Some(br#"{"v":3}"#),
    );
    r.assert_problem(412);
    assert_eq!(s.get(&path).json(), json!({"v": 2}));
}

#[test]
fn delete_with_if_match_of_a_stale_etag_is_412_and_keeps_the_key() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let stale = s.put(&path, "v1").header("etag").expect("etag");
    let now = s.put(&path, "v2").header("etag").expect("etag");
    with_header(&s, "DELETE", &path, ("if-match", &stale), "").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("v2"));
    let r = with_header(&s, "DELETE", &path, ("if-match", &now), "");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(current(&s, &path), None);
}

#[test]
fn delete_with_if_match_on_an_absent_key_is_412() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    with_header(&s, "DELETE", &format!("/{b}/k"), ("if-match", "\"x\""), "").assert_problem(412);
}

#[test]
fn delete_with_if_none_match_star_on_an_existing_key_is_412() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    s.put(&path, "v");
    with_header(&s, "DELETE", &path, ("if-none-match", "*"), "").assert_problem(412);
    assert_eq!(current(&s, &path).as_deref(), Some("v"));
}

#[test]
fn compare_and_set_with_if_match_lets_exactly_one_of_two_writers_win() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let etag = s.put(&path, "base").header("etag").expect("etag");
    let a = with_header(&s, "PUT", &path, ("if-match", &etag), "from-a");
    let c = with_header(&s, "PUT", &path, ("if-match", &etag), "from-c");
    assert_eq!((a.status, c.status), (204, 412));
    assert_eq!(current(&s, &path).as_deref(), Some("from-a"));
}

// ----- concurrency -----------------------------------------------------------

#[test]
fn concurrent_increments_never_lose_an_update() {
    const THREADS: usize = 50;
    const EACH: usize = 40;
    let s = Arc::new(TestServer::start());
    let b = s.create_bucket("");
    let path = Arc::new(format!("/{b}/counter"));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let s = Arc::clone(&s);
            let path = Arc::clone(&path);
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|_| {
                        let r = s.patch(&path, "+1");
                        assert_eq!(r.status, 200, "{}", r.text());
                        r.text().parse::<i64>().expect("an integer")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for h in handles {
        for v in h.join().expect("client thread") {
            assert!(seen.insert(v), "two increments answered the same value {v}");
        }
    }
    let total = i64::try_from(THREADS * EACH).expect("small");
    assert_eq!(
        current(&s, &path).as_deref(),
        Some(total.to_string().as_str())
    );
    // Every increment saw its own new value: exactly 1..=2000.
    assert_eq!(seen, (1..=total).collect::<BTreeSet<_>>());
}

/// JSON operations on a large document are made outside the store's
/// writer and stored only if the key has not moved on meanwhile: under
/// concurrent merges and compare-and-sets of one document, none is lost,
/// and the conditions and failures still hold.
#[test]
fn concurrent_json_operations_on_a_large_document_lose_nothing() {
    const THREADS: usize = 6;
    const EACH: usize = 8;
    let s = Arc::new(TestServer::start());
    let b = s.create_bucket("");
    let path = Arc::new(format!("/{b}/doc"));
    // Well over 64 KiB of JSON.
    let padding: serde_json::Map<String, serde_json::Value> = (0..2000)
        .map(|i| (format!("pad{i}"), json!("x".repeat(60))))
        .collect();
    let doc = json!({"n": 0, "pad": padding});
    let r = s.request(
        "PUT",
        &path,
        &[("content-type", "application/json")],
        Some(doc.to_string().as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = Arc::clone(&s);
            let path = Arc::clone(&path);
            std::thread::spawn(move || {
                for i in 0..EACH {
                    // A merge of a field of its own...
                    let r = patch_typed(&s, &path, MERGE, &format!(r#"{{"t{t}_{i}": {i}}}"#));
                    assert_eq!(r.status, 200, "{}", r.text());
                    // ... and one more on the shared counter, by compare-and-set.
                    loop {
                        let n = serde_json::from_str::<serde_json::Value>(
                            &current(&s, &path).expect("the document"),
                        )
                        .expect("JSON")["n"]
                            .as_i64()
                            .expect("n");
                        let cas = format!(
                            r#"[{{"op":"test","path":"/n","value":{n}}},{{"op":"replace","path":"/n","value":{}}}]"#,
                            n + 1
                        );
                        let r = patch_typed(&s, &path, JSON_PATCH, &cas);
                        match r.status {
                            200 => break,
                            409 => continue,
                            other => panic!("{other}: {}", r.text()),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let end: serde_json::Value =
        serde_json::from_str(&current(&s, &path).expect("the document")).expect("JSON");
    assert_eq!(
        end["n"],
        json!(THREADS * EACH),
        "compare-and-set lost a count"
    );
    for t in 0..THREADS {
        for i in 0..EACH {
            assert_eq!(end[format!("t{t}_{i}")], json!(i), "lost merge t{t}_{i}");
        }
    }
    assert_eq!(end["pad"]["pad1999"], json!("x".repeat(60)));
    // A condition and a failing test still hold, and change nothing.
    let stale = s.request(
        "PATCH",
        &path,
        &[("content-type", MERGE), ("if-match", "\"0\"")],
        Some(br#"{"n": -5}"#),
    );
    stale.assert_problem(412);
    let r = patch_typed(
        &s,
        &path,
        JSON_PATCH,
        r#"[{"op":"test","path":"/n","value":-1}]"#,
    );
    r.assert_problem(409);
    let after: serde_json::Value =
        serde_json::from_str(&current(&s, &path).expect("the document")).expect("JSON");
    assert_eq!(after, end);
}

#[test]
fn malformed_conditional_headers_are_400_and_change_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let etag = s.put(&path, "v1").header("etag").expect("etag");
    for (name, value, says) in [
        // On a write it takes only `*`, and says so.
        ("if-none-match", "", "If-None-Match supports only `*`"),
        ("if-match", "", "If-Match is empty"),
        ("if-match", "garbage", "takes ETags in quotes"),
        ("if-match", etag.trim_matches('"'), "takes ETags in quotes"),
    ] {
        let r = with_header(&s, "PUT", &path, (name, value), "v2");
        let detail = r.assert_problem(400);
        assert!(
            detail
                .to_ascii_lowercase()
                .contains(&says.to_ascii_lowercase()),
            "{name}: {value:?}: {detail}"
        );
        assert_eq!(current(&s, &path).as_deref(), Some("v1"));
    }
    // The tags of every If-Match line count, as of one line listing them.
    let r = s.request(
        "PUT",
        &path,
        &[("if-match", "\"nope\""), ("if-match", etag.as_str())],
        Some(b"v3"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(current(&s, &path).as_deref(), Some("v3"));
    // On a read, a malformed If-None-Match is ignored: the value is answered.
    let r = s.request("GET", &path, &[("if-none-match", "garbage")], None);
    assert_eq!((r.status, r.text().as_str()), (200, "v3"));
    // A malformed If-Match is a 400 on a read as on a write.
    let detail = s
        .request("GET", &path, &[("if-match", "garbage")], None)
        .assert_problem(400);
    assert!(detail.contains("takes ETags in quotes"), "{detail}");
}

/// RFC 9110: a read whose If-Match fails is a 412, not the value (found by
/// a review: the value was answered); If-Match is judged before
/// If-None-Match; a missing key stays a 404.
#[test]
fn a_read_whose_if_match_fails_is_412() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let path = format!("/{b}/k");
    let old = s.put(&path, "v1").header("etag").expect("etag");
    let etag = s.put(&path, "v2").header("etag").expect("etag");
    for method in ["GET", "HEAD"] {
        let r = s.request(method, &path, &[("if-match", old.as_str())], None);
        assert_eq!(r.status, 412, "{method}: {}", r.text());
        let weak = format!("W/{etag}");
        let r = s.request(method, &path, &[("if-match", weak.as_str())], None);
        assert_eq!(r.status, 412, "{method}: {}", r.text());
        for tag in [etag.as_str(), "*"] {
            let r = s.request(method, &path, &[("if-match", tag)], None);
            assert_eq!(r.status, 200, "{method} {tag}: {}", r.text());
        }
    }
    let detail = s
        .request("GET", &path, &[("if-match", old.as_str())], None)
        .assert_problem(412);
    assert!(
        detail.contains("the value has changed since that ETag"),
        "{detail}"
    );
    let r = s.request("GET", &path, &[("if-match", etag.as_str())], None);
    assert_eq!((r.status, r.text().as_str()), (200, "v2"));
    // Both: If-Match decides first; a matching one leaves If-None-Match's 304.
    let both = |m: &str| {
        s.request(
            "GET",
            &path,
            &[("if-match", m), ("if-none-match", etag.as_str())],
            None,
        )
        .status
    };
    assert_eq!((both(old.as_str()), both(etag.as_str())), (412, 304));
    let r = s.request("GET", &format!("/{b}/none"), &[("if-match", "*")], None);
    assert_eq!(r.status, 404);
}

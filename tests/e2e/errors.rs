//! Malformed input: every rejection is a 4xx problem document, and a
//! rejected request changes nothing (each test reads the data afterwards).

use serde_json::json;

use crate::harness::{Resp, TestServer};

const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

/// A server with an open bucket holding `k = original`.
fn setup() -> (TestServer, String) {
    setup_with(&[])
}

fn setup_with(args: &[&str]) -> (TestServer, String) {
    let s = TestServer::start_with(args);
    let b = s.create_bucket("");
    assert_eq!(s.put(&format!("/{b}/k"), "original").status, 204);
    (s, b)
}

#[track_caller]
fn assert_unchanged(s: &TestServer, b: &str) {
    let r = s.get(&format!("/{b}/k"));
    assert_eq!((r.status, r.text().as_str()), (200, "original"));
    assert_eq!(keys(s, b), ["k"], "no key was added");
}

fn keys(s: &TestServer, b: &str) -> Vec<String> {
    let r = s.get(&format!("/{b}/?format=json"));
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_value(r.json()).expect("keys")
}

fn send(s: &TestServer, method: &str, path: &str, ct: &str, body: &[u8]) -> Resp {
    s.request(method, path, &[("content-type", ct)], Some(body))
}

// ----- bodies ------------------------------------------------------------------

#[test]
fn invalid_json_with_application_json_is_400_and_changes_nothing() {
    let (s, b) = setup();
    for bad in [&b"{\"a\":"[..], b"not json", b"", b"{'a':1}", b"[1,]"] {
        send(&s, "PUT", &format!("/{b}/k"), "application/json", bad).assert_problem(400);
        send(&s, "POST", &format!("/{b}/k"), "application/json", bad).assert_problem(400);
        send(&s, "PUT", &format!("/{b}/new"), "application/json", bad).assert_problem(400);
    }
    assert_unchanged(&s, &b);
}

#[test]
fn invalid_utf8_with_application_json_is_400() {
    let (s, b) = setup();
    send(
        &s,
        "PUT",
        &format!("/{b}/k"),
        "application/json",
        &[b'"', 0xff, b'"'],
    )
    .assert_problem(400);
    assert_unchanged(&s, &b);
}

// ----- ttl -------------------------------------------------------------------

#[test]
fn bad_ttl_is_400_on_put_post_and_patch_and_changes_nothing() {
    let (s, b) = setup();
    s.put(&format!("/{b}/n"), "1");
    // A sign or a space is not a whole number either (API.md: digits).
    for ttl in [
        "-1",
        "abc",
        "1.5",
        "",
        "1e3",
        "99999999999999999999999",
        "%2B5",
        "%205",
        "5%20",
    ] {
        s.put(&format!("/{b}/k?ttl={ttl}"), "changed")
            .assert_problem(400);
        s.post(&format!("/{b}/k?ttl={ttl}"), "changed")
            .assert_problem(400);
        s.put(&format!("/{b}/new?ttl={ttl}"), "v")
            .assert_problem(400);
        s.patch(&format!("/{b}/n?ttl={ttl}"), "+1")
            .assert_problem(400);
    }
    // `+5` is read as " 5" (form decoding): the answer says why.
    let detail = s
        .put(&format!("/{b}/k?ttl=+5"), "changed")
        .assert_problem(400);
    assert!(
        detail.contains("a `+` in a URL's query is a space"),
        "{detail}"
    );
    assert_eq!(s.get(&format!("/{b}/k")).text(), "original");
    assert_eq!(s.get(&format!("/{b}/n")).text(), "1");
    assert_eq!(keys(&s, &b), ["k", "n"]);
}

// ----- keys --------------------------------------------------------------------

/// `.` and `..` are no keys: clients take them as path steps (the kvdb.io
/// client's `delete('.')` sends `DELETE /B/`, which deletes the bucket), so
/// only a percent-encoded one reaches the server, and it is refused.
#[test]
fn writing_a_dot_key_is_400_and_changes_nothing() {
    let (s, b) = setup();
    for dots in ["%2e", "%2E", "%2e%2e", ".%2e"] {
        for method in ["PUT", "POST", "PATCH"] {
            let detail = s
                .request(method, &format!("/{b}/{dots}"), &[], Some(b"+1"))
                .assert_problem(400);
            assert!(
                detail.contains("can't be `.` or `..`"),
                "{method} {dots}: {detail}"
            );
        }
        // Reading and deleting one are not refused (there is none here; one
        // written before the refusal can still be read and deleted).
        s.get(&format!("/{b}/{dots}")).assert_problem(404);
        s.delete(&format!("/{b}/{dots}")).assert_problem(404);
    }
    assert_unchanged(&s, &b);
}

#[test]
fn key_of_exactly_1024_bytes_is_accepted() {
    let (s, b) = setup();
    let key = "k".repeat(1024);
    assert_eq!(s.put(&format!("/{b}/{key}"), "long").status, 204);
    assert_eq!(s.get(&format!("/{b}/{key}")).text(), "long");
    assert!(keys(&s, &b).contains(&key));
}

#[test]
fn key_over_1024_bytes_is_400_and_not_stored() {
    let (s, b) = setup();
    let key = "k".repeat(1025);
    s.put(&format!("/{b}/{key}"), "v").assert_problem(400);
    s.patch(&format!("/{b}/{key}"), "+1").assert_problem(400);
    s.get(&format!("/{b}/{key}")).assert_problem(400);
    assert_unchanged(&s, &b);
}

#[test]
fn key_length_is_counted_in_utf8_bytes() {
    let (s, b) = setup();
    // "é" is two bytes: 512 of them are 1024 bytes, 513 are 1026.
    let ok = "%C3%A9".repeat(512);
    let too_long = "%C3%A9".repeat(513);
    assert_eq!(s.put(&format!("/{b}/{ok}"), "v").status, 204);
    s.put(&format!("/{b}/{too_long}"), "v").assert_problem(400);
    let listed = keys(&s, &b);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&"é".repeat(512)));
}

#[test]
fn control_characters_in_a_key_are_400_and_not_stored() {
    let (s, b) = setup();
    // C0 (NUL, TAB, LF, CR, ESC), DEL, and C1 (U+0085, U+009F).
    for cc in ["%00", "%09", "%0A", "%0D", "%1B", "%7F", "%C2%85", "%C2%9F"] {
        let path = format!("/{b}/bad{cc}key");
        s.put(&path, "v").assert_problem(400);
        s.patch(&path, "+1").assert_problem(400);
        s.get(&path).assert_problem(400);
    }
    assert_unchanged(&s, &b);
}

#[test]
fn invalid_utf8_in_a_key_is_400() {
    let (s, b) = setup();
    s.put(&format!("/{b}/bad%FFkey"), "v").assert_problem(400);
    s.put(&format!("/{b}/%C3"), "v").assert_problem(400);
    assert_unchanged(&s, &b);
}

#[test]
fn a_percent_without_two_hex_digits_is_400_and_a_literal_one_is_25() {
    let (s, b) = setup();
    for bad in ["a%", "a%zz", "%2", "%%", "x%g1"] {
        let detail = s.put(&format!("/{b}/{bad}"), "v").assert_problem(400);
        assert!(
            detail.contains("write a literal % as %25"),
            "{bad}: {detail}"
        );
        s.get(&format!("/{b}/{bad}")).assert_problem(400);
    }
    assert_unchanged(&s, &b);
    assert_eq!(s.put(&format!("/{b}/100%25"), "v").status, 204);
    assert_eq!(keys(&s, &b), ["100%", "k"]);
}

#[test]
fn a_bucket_segment_that_is_not_utf8_is_an_unknown_bucket() {
    let (s, b) = setup();
    let r = s.get("/%FF/k");
    assert_eq!(r.status, 404, "{}", r.text());
    let detail = s.get(&format!("/{b}/%FF")).assert_problem(400);
    assert!(detail.contains("must be UTF-8"), "{detail}");
}

#[test]
fn printable_non_ascii_keys_are_accepted() {
    let (s, b) = setup();
    // U+00A0 (no-break space) and U+2028 are not category Cc.
    for key in ["%C2%A0", "%E2%80%A8", "%F0%9F%98%80"] {
        assert_eq!(s.put(&format!("/{b}/{key}"), "v").status, 204, "{key}");
    }
    assert_eq!(keys(&s, &b).len(), 4);
}

/// Found by a review: a query parameter given twice took the last one
/// (`?ttl=abc&ttl=1` was a 204, `?ttl=1&ttl=abc` a 400), and a `%` without
/// two hex digits in a query was taken literally (`?prefix=a%` listed what
/// `?prefix=a%25` does) where the path refuses it.
#[test]
fn a_query_parameter_given_twice_or_a_bare_percent_in_a_query_is_400() {
    let (s, b) = setup();
    for path in [
        format!("/{b}/t?ttl=abc&ttl=1"),
        format!("/{b}/t?ttl=1&ttl=1"),
        format!("/{b}/k?ttl=1&ttl=2"),
    ] {
        let detail = s.put(&path, "v").assert_problem(400);
        assert!(
            detail.contains("the query parameter \"ttl\" is given twice: give it once"),
            "{path}: {detail}"
        );
    }
    let detail = s
        .patch(&format!("/{b}/k?op=append&op=max"), "!")
        .assert_problem(400);
    assert!(detail.contains("\"op\" is given twice"), "{detail}");
    assert_unchanged(&s, &b);
    for query in [
        "limit=1&limit=2",
        "prefix=a&prefix=b",
        "format=json&format=text",
        "key=x&key=y",
    ] {
        let detail = s.get(&format!("/{b}/?{query}")).assert_problem(400);
        assert!(detail.contains("is given twice"), "{query}: {detail}");
    }
    for (method, path) in [
        ("GET", format!("/{b}/?prefix=a%")),
        ("PUT", format!("/{b}/k?x=%zz")),
        ("PUT", format!("/{b}/n?ttl=5%")),
    ] {
        let detail = s
            .request(method, &path, &[], Some(b"v"))
            .assert_problem(400);
        assert!(
            detail.contains("the query has a `%` that is not followed by two hex digits")
                && detail.contains("write a literal % as %25"),
            "{path}: {detail}"
        );
    }
    assert_unchanged(&s, &b);
    // A query that can't be read is a 400 on every route (a read, a
    // delete), before credentials are looked at, as a path that can't be;
    // a parameter given twice is the handler's, after them.
    for (method, path) in [("GET", "k"), ("DELETE", "k"), ("HEAD", "k"), ("GET", "")] {
        let r = s.request(method, &format!("/{b}/{path}?x=%zz"), &[], None);
        assert_eq!(r.status, 400, "{method} /{path}: {}", r.text());
    }
    let locked = s.create_bucket("write_key=wk");
    assert_eq!(s.put(&format!("/{locked}/k?ttl=5%"), "v").status, 400);
    let r = s.put(&format!("/{locked}/k?ttl=1&ttl=2"), "v");
    assert_eq!(r.status, 401, "{}", r.text());
    // Once each, and a literal % written %25: fine.
    assert_eq!(s.put(&format!("/{b}/t?ttl=60"), "v").status, 204);
    let r = s.get(&format!("/{b}/?prefix=t%25&limit=5"));
    assert_eq!((r.status, r.text().as_str()), (200, ""));
}

#[test]
fn keys_named_scripts_and_tokens_are_ordinary_keys() {
    let (s, b) = setup();
    for key in ["scripts", "tokens"] {
        assert_eq!(s.put(&format!("/{b}/{key}"), key).status, 204, "PUT {key}");
        let r = s.get(&format!("/{b}/{key}"));
        assert_eq!((r.status, r.text().as_str()), (200, key));
        assert_eq!(
            s.patch(&format!("/{b}/{key}?op=append"), "!").text(),
            format!("{key}!")
        );
    }
    assert_eq!(keys(&s, &b), ["k", "scripts", "tokens"]);
    assert_eq!(s.delete(&format!("/{b}/scripts")).status, 204);
    assert_eq!(s.delete(&format!("/{b}/tokens")).status, 204);
    assert_unchanged(&s, &b);
    // Missing, their 404 says where the route with the slash is.
    let detail = s.get(&format!("/{b}/scripts")).assert_problem(404);
    assert!(
        detail.contains("there is no key \"scripts\" in this bucket (scripts are listed at /BUCKET/scripts/, with the slash)"),
        "{detail}"
    );
    let detail = s.get(&format!("/{b}/tokens")).assert_problem(404);
    assert!(
        detail.contains("(tokens are issued by POST /BUCKET/tokens/, with the slash)"),
        "{detail}"
    );
    let detail = s.get(&format!("/{b}/other")).assert_problem(404);
    assert!(
        detail.ends_with("there is no key \"other\" in this bucket"),
        "{detail}"
    );
}

#[test]
fn percent_encoded_slash_is_part_of_the_key() {
    let (s, b) = setup();
    assert_eq!(s.put(&format!("/{b}/a%2Fb"), "slashed").status, 204);
    assert_eq!(s.get(&format!("/{b}/a%2Fb")).text(), "slashed");
    assert_eq!(s.get(&format!("/{b}/a%2fb")).text(), "slashed", "hex case");
    assert_eq!(keys(&s, &b), ["a/b", "k"]);
    // A literal slash is another path, not this key.
    assert_ne!(s.get(&format!("/{b}/a/b")).status, 200);
    assert_eq!(s.delete(&format!("/{b}/a%2Fb")).status, 204);
    assert_unchanged(&s, &b);
}

#[test]
fn key_that_is_only_a_percent_encoded_slash_works() {
    let (s, b) = setup();
    assert_eq!(s.put(&format!("/{b}/%2F"), "root").status, 204);
    assert_eq!(s.get(&format!("/{b}/%2F")).text(), "root");
    assert_eq!(keys(&s, &b), ["/", "k"]);
}

// ----- sizes -----------------------------------------------------------------

#[test]
fn value_at_the_limit_is_accepted() {
    let (s, b) = setup_with(&["--max-value-bytes", "100"]);
    let exact = "x".repeat(100);
    assert_eq!(s.put(&format!("/{b}/big"), &exact).status, 204);
    assert_eq!(s.get(&format!("/{b}/big")).text(), exact);
}

#[test]
fn value_over_the_limit_is_413_and_changes_nothing() {
    let (s, b) = setup_with(&["--max-value-bytes", "100"]);
    let over = "x".repeat(101);
    s.put(&format!("/{b}/k"), &over).assert_problem(413);
    s.post(&format!("/{b}/k"), &over).assert_problem(413);
    s.put(&format!("/{b}/new"), &over).assert_problem(413);
    send(
        &s,
        "PUT",
        &format!("/{b}/new"),
        "application/octet-stream",
        &[0u8; 5000],
    )
    .assert_problem(413);
    // The answer says which limit, and where it is set.
    let detail = s.put(&format!("/{b}/k"), &over).assert_problem(413);
    assert!(detail.contains("limit of 100 bytes"), "{detail}");
    assert!(detail.contains("--max-value-bytes"), "{detail}");
    assert_unchanged(&s, &b);
}

#[test]
fn value_over_the_limit_is_413_even_without_content_length() {
    let (s, b) = setup_with(&["--max-value-bytes", "100"]);
    // Chunked: the server must count what it reads.
    let r = s.request(
        "PUT",
        &format!("/{b}/k"),
        &[("transfer-encoding", "chunked")],
        Some(&[b'y'; 300]),
    );
    r.assert_problem(413);
    assert_unchanged(&s, &b);
}

#[test]
fn append_that_would_exceed_the_limit_is_413_and_changes_nothing() {
    let (s, b) = setup_with(&["--max-value-bytes", "100"]);
    let ninety = "a".repeat(90);
    s.put(&format!("/{b}/log"), &ninety);
    s.patch(&format!("/{b}/log?op=append"), &"b".repeat(11))
        .assert_problem(413);
    assert_eq!(s.get(&format!("/{b}/log")).text(), ninety);
    // Up to exactly the limit is fine.
    let r = s.patch(&format!("/{b}/log?op=append"), &"b".repeat(10));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get(&format!("/{b}/log")).body.len(), 100);
}

#[test]
fn merge_patch_that_would_exceed_the_limit_is_413() {
    let (s, b) = setup_with(&["--max-value-bytes", "100"]);
    s.put(&format!("/{b}/doc"), r#"{"a":1}"#);
    let body = format!(r#"{{"b":"{}"}}"#, "z".repeat(90));
    send(&s, "PATCH", &format!("/{b}/doc"), MERGE, body.as_bytes()).assert_problem(413);
    assert_eq!(s.get(&format!("/{b}/doc")).json(), json!({"a": 1}));
}

// ----- routes and methods -------------------------------------------------------

#[test]
fn unknown_route_is_a_404_problem() {
    let (s, b) = setup();
    s.get(&format!("/{b}/k/extra/segments")).assert_problem(404);
    s.put(&format!("/{b}/a/b/c/d"), "v").assert_problem(404);
    s.get("/favicon.ico/x/y").assert_problem(404);
    // A key with a `/` (or one followed by a slash) is not a route: the
    // answer says how to write one.
    for path in [format!("/{b}/k/"), format!("/{b}/users/1")] {
        for method in ["GET", "PUT"] {
            let detail = s
                .request(method, &path, &[], Some(b"v"))
                .assert_problem(404);
            assert!(detail.contains("%2F"), "{method} {path}: {detail}");
        }
    }
    assert_unchanged(&s, &b);
}

/// A media type to keep with a raw value must be one: it is served back.
#[test]
fn a_content_type_that_is_no_media_type_is_400_and_changes_nothing() {
    let (s, b) = setup();
    for ct in [
        "garbage",
        "image/",
        "garbage; charset=utf-8",
        // Parameters RFC 9110 does not allow, and a pattern (found by a
        // review: kept and served back).
        "a/b; charset=\"",
        "a/b; =x",
        "*/*",
    ] {
        for (method, path) in [("PUT", "k"), ("POST", "new"), ("PATCH", "k?op=append")] {
            let detail = send(&s, method, &format!("/{b}/{path}"), ct, b"x").assert_problem(400);
            assert!(
                detail.contains("is not a media type") && detail.contains("type/subtype"),
                "{method} {ct}: {detail}"
            );
        }
    }
    // Not visible ASCII (no HTTP client library sends it): it was taken
    // as no type at all.
    let mut stream =
        std::net::TcpStream::connect(s.base().trim_start_matches("http://")).expect("connect");
    let head = format!(
        "PUT /{b}/k HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 1\r\ncontent-type: image/p"
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(b"\xe9ng\r\n\r\nx");
    std::io::Write::write_all(&mut stream, &request).expect("send");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("not visible ASCII"), "{answer}");
    assert_unchanged(&s, &b);
    // Still kept, served back: parameters, and a trailing `;`.
    for ct in ["text/csv; charset=utf-8", "image/png;"] {
        assert_eq!(send(&s, "PUT", &format!("/{b}/t"), ct, b"x").status, 204);
        assert_eq!(
            s.get(&format!("/{b}/t")).header("content-type").as_deref(),
            Some(ct)
        );
    }
}

#[test]
fn wrong_method_is_a_405_problem_with_allow() {
    let (s, b) = setup();
    for (method, path) in [
        ("PUT", format!("/{b}/")),
        ("PATCH", format!("/{b}/")),
        ("POST", format!("/{b}/")),
        ("PUT", format!("/{b}")),
        ("PUT", "/".to_owned()),
        ("DELETE", "/".to_owned()),
    ] {
        let r = s.request(method, &path, &[], Some(b"v"));
        r.assert_problem(405);
        assert!(
            r.header("allow").is_some(),
            "{method} {path}: a 405 names the allowed methods"
        );
    }
    // A method in lower case (as a browser sends `patch`; no client
    // library here sends one): case matters.
    let mut stream =
        std::net::TcpStream::connect(s.base().trim_start_matches("http://")).expect("connect");
    let request = format!(
        "patch /{b}/k HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n+1"
    );
    std::io::Write::write_all(&mut stream, request.as_bytes()).expect("send");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.contains("methods are case-sensitive: send PATCH"),
        "{answer}"
    );
    assert_unchanged(&s, &b);
}

#[test]
fn bad_patch_body_is_400_and_changes_nothing() {
    let (s, b) = setup();
    s.put(&format!("/{b}/n"), "5");
    for bad in [
        "", "1", "5", "hello", "+", "-", "+abc", "++1", "+1 +1", "+0x10",
    ] {
        s.patch(&format!("/{b}/n"), bad).assert_problem(400);
        s.patch(&format!("/{b}/fresh"), bad).assert_problem(400);
    }
    assert_eq!(s.get(&format!("/{b}/n")).text(), "5");
    s.get(&format!("/{b}/fresh")).assert_problem(404);
    assert_eq!(keys(&s, &b), ["k", "n"]);
}

#[test]
fn unknown_patch_op_is_400_and_changes_nothing() {
    let (s, b) = setup();
    s.patch(&format!("/{b}/k?op=prepend"), "x")
        .assert_problem(400);
    s.patch(&format!("/{b}/k?op=APPEND"), "x")
        .assert_problem(400);
    s.patch(&format!("/{b}/new?op=increment"), "+1")
        .assert_problem(400);
    assert_unchanged(&s, &b);
}

#[test]
fn malformed_patch_documents_are_400_and_change_nothing() {
    let (s, b) = setup();
    s.put(&format!("/{b}/doc"), r#"{"a":1}"#);
    send(&s, "PATCH", &format!("/{b}/doc"), MERGE, b"{nope").assert_problem(400);
    send(
        &s,
        "PATCH",
        &format!("/{b}/doc"),
        JSON_PATCH,
        b"{\"op\":\"add\"}",
    )
    .assert_problem(400);
    send(
        &s,
        "PATCH",
        &format!("/{b}/doc"),
        JSON_PATCH,
        b"[{\"op\":\"move\"}]",
    )
    .assert_problem(400);
    send(&s, "PATCH", &format!("/{b}/new"), JSON_PATCH, b"[").assert_problem(400);
    assert_eq!(s.get(&format!("/{b}/doc")).json(), json!({"a": 1}));
    s.get(&format!("/{b}/new")).assert_problem(404);
}

#[test]
fn if_none_match_other_than_star_on_a_write_is_rejected_without_writing() {
    let (s, b) = setup();
    let r = s.request(
        "PUT",
        &format!("/{b}/k"),
        &[("if-none-match", "\"abc\"")],
        Some(b"changed"),
    );
    assert!(
        r.status == 400 || r.status == 412,
        "{}: {}",
        r.status,
        r.text()
    );
    r.assert_problem(r.status);
    // Empty or unquoted, the answer names the one thing a write takes
    // there (it offered ETags, which the next try refused).
    for value in ["", "abc", "\"abc\""] {
        let r = s.request(
            "PUT",
            &format!("/{b}/k"),
            &[("if-none-match", value)],
            Some(b"changed"),
        );
        let detail = r.assert_problem(400);
        assert!(detail.contains("supports only `*`"), "{value:?}: {detail}");
    }
    assert_unchanged(&s, &b);
}

// ----- listing parameters ----------------------------------------------------------

#[test]
fn bad_listing_parameters_are_400() {
    let (s, b) = setup();
    for query in [
        "format=xml",
        "format=JSON-ish",
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "skip=abc",
        "skip=-2",
        "limit=%2B1",
        "limit=%201",
        "skip=%2B0",
        "reverse=maybe",
        "values=perhaps",
    ] {
        s.get(&format!("/{b}/?{query}")).assert_problem(400);
    }
    assert_unchanged(&s, &b);
    // Flags take any case.
    for query in ["values=TRUE", "reverse=Yes", "values=False"] {
        let r = s.get(&format!("/{b}/?{query}"));
        assert_eq!(r.status, 200, "{query}: {}", r.text());
    }
}

#[test]
fn non_utf8_listing_parameter_is_400() {
    let (s, b) = setup();
    for query in ["prefix=%FF", "start=a%FF", "end=%C3"] {
        s.get(&format!("/{b}/?{query}")).assert_problem(400);
    }
}

// ----- buckets -------------------------------------------------------------------

#[test]
fn invalid_bucket_id_is_404_for_every_route() {
    let (s, b) = setup();
    for bad in [
        "not-a-bucket",
        "x",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "%C3%A9",
    ] {
        s.get(&format!("/{bad}/k")).assert_problem(404);
        s.put(&format!("/{bad}/k"), "v").assert_problem(404);
        s.patch(&format!("/{bad}/k"), "+1").assert_problem(404);
        s.delete(&format!("/{bad}/k")).assert_problem(404);
        s.get(&format!("/{bad}/")).assert_problem(404);
        s.get(&format!("/{bad}")).assert_problem(404);
    }
    assert_unchanged(&s, &b);
}

#[test]
fn unknown_but_well_formed_bucket_is_404_even_with_credentials() {
    let s = TestServer::start();
    let real = s.create_bucket("secret_key=s");
    let other = s.create_bucket("secret_key=s");
    // Delete `other` so that its well-formed id is unknown.
    let r = s.request(
        "DELETE",
        &format!("/{other}"),
        &[("authorization", "Bearer s")],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    for (method, path) in [
        ("GET", format!("/{other}/k")),
        ("PUT", format!("/{other}/k")),
        ("GET", format!("/{other}/")),
    ] {
        s.request(
            method,
            &path,
            &[("authorization", "Bearer s")],
            (method == "PUT").then_some(&b"v"[..]),
        )
        .assert_problem(404);
    }
    s.request(
        "PUT",
        &format!("/{real}/k"),
        &[("authorization", "Bearer s")],
        Some(b"v"),
    );
    assert_eq!(
        s.request(
            "GET",
            &format!("/{real}/k"),
            &[("authorization", "Bearer s")],
            None
        )
        .text(),
        "v"
    );
}

#[test]
fn malformed_bucket_creation_is_400() {
    let s = TestServer::start();
    s.request(
        "POST",
        "/",
        &[("content-type", "application/json")],
        Some(b"{not json"),
    )
    .assert_problem(400);
    s.post("/", "default_ttl=-5").assert_problem(400);
    s.post("/", "default_ttl=soon").assert_problem(400);
    s.post("/", "no_such_field=1").assert_problem(400);
}

// ----- what the errors say ------------------------------------------------------

/// Refusals that a user hits by a near miss say what to send instead.
#[test]
fn near_misses_are_answered_with_what_to_do_instead() {
    let (s, b) = setup();
    let path = format!("/{b}/k");
    let etag = s.get(&path).header("etag").expect("an ETag");
    // A weakened ETag (a proxy may do that) of the unchanged value.
    let weak = format!("W/{etag}");
    let r = s.request("PUT", &path, &[("if-match", weak.as_str())], Some(b"x"));
    assert!(r.assert_problem(412).contains("without W/"), "{}", r.text());
    // If-Match on a key that is not there.
    let r = s.request(
        "PUT",
        &format!("/{b}/absent"),
        &[("if-match", etag.as_str())],
        Some(b"x"),
    );
    assert!(
        r.assert_problem(412).contains("If-None-Match: *"),
        "{}",
        r.text()
    );
    // A JSON patch of a key that is not there.
    let r = send(
        &s,
        "PATCH",
        &format!("/{b}/absent"),
        JSON_PATCH,
        br#"[{"op":"add","path":"/x","value":1}]"#,
    );
    assert!(
        r.assert_problem(409).contains("PUT the document first"),
        "{}",
        r.text()
    );
    // Tokens are issued, not listed.
    let r = s.get(&format!("/{b}/tokens/"));
    assert!(
        r.assert_problem(405).contains("issued with POST"),
        "{}",
        r.text()
    );
    // An id that is no bucket.
    let r = s.get("/AAAAAAAAAAAAAAAAAAAAAA/k");
    assert!(r.assert_problem(404).contains("POST /"), "{}", r.text());
    // A key given as `?access_token=` that is no token.
    let locked = s.create_bucket("secret_key=sk");
    let r = s.get(&format!("/{locked}/k?access_token=abc"));
    assert!(
        r.assert_problem(401).contains("nor an access token"),
        "{}",
        r.text()
    );
    assert_unchanged(&s, &b);
}

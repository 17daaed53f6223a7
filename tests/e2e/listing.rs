//! Listing (`GET /:bucket/`): formats, values, ranges, paging.

use std::collections::BTreeSet;

use base64::Engine;
use serde_json::{Value, json};

use crate::harness::{Resp, TestServer};

/// A server with an open bucket (no secret key: listing is open).
fn open_bucket() -> (TestServer, String) {
    let s = TestServer::start();
    let b = s.create_bucket("");
    (s, b)
}

fn fill(s: &TestServer, b: &str, keys: &[&str]) {
    for k in keys {
        let r = s.put(&format!("/{b}/{k}"), &format!("v-{k}"));
        assert_eq!(r.status, 204, "PUT {k}: {}", r.text());
    }
}

#[track_caller]
fn list(s: &TestServer, b: &str, query: &str) -> Resp {
    let r = s.get(&format!("/{b}/?{query}"));
    assert_eq!(r.status, 200, "GET /{b}/?{query}: {}", r.text());
    r
}

/// The keys of a `format=json` listing.
#[track_caller]
fn json_keys(s: &TestServer, b: &str, query: &str) -> Vec<String> {
    let sep = if query.is_empty() { "" } else { "&" };
    let r = list(s, b, &format!("format=json{sep}{query}"));
    serde_json::from_value(r.json()).expect("an array of keys")
}

fn lines(r: &Resp) -> Vec<String> {
    r.text().lines().map(str::to_owned).collect()
}

/// `rel="next"` target of a `Link` header, if any.
fn next_link(r: &Resp) -> Option<String> {
    let link = r.header("link")?;
    link.split(',').find_map(|part| {
        let part = part.trim();
        if !part.contains("rel=\"next\"") && !part.contains("rel=next") {
            return None;
        }
        let start = part.find('<')? + 1;
        let end = part.find('>')?;
        Some(part[start..end].to_owned())
    })
}

/// Turns a `Link` target (relative or absolute) into a path for the harness.
fn as_path(s: &TestServer, target: &str) -> String {
    target.strip_prefix(s.base()).unwrap_or(target).to_owned()
}

/// A page of values ends early, with its `Link`, once it holds 32 MiB of
/// them: 10,000 values of 16 MiB would otherwise be built in memory whole.
#[test]
fn a_page_of_values_stops_at_32_mib_and_links_the_rest() {
    let (s, b) = open_bucket();
    let big = "v".repeat(12 << 20);
    for k in ["a", "b", "c", "d"] {
        assert_eq!(s.put(&format!("/{b}/{k}"), &big).status, 204);
    }
    let first = list(&s, &b, "format=json&values=true&limit=10");
    assert_eq!(
        first.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    let page: Vec<Value> = serde_json::from_value(first.json()).expect("array");
    let keys: Vec<&str> = page.iter().map(|e| e[0].as_str().unwrap_or("")).collect();
    assert_eq!(keys, ["a", "b"], "24 MiB, and a third would make 36");
    let next = next_link(&first).expect("a Link to the rest");
    let second = s.get(&as_path(&s, &next));
    let page: Vec<Value> = serde_json::from_value(second.json()).expect("array");
    let keys: Vec<&str> = page.iter().map(|e| e[0].as_str().unwrap_or("")).collect();
    assert_eq!(keys, ["c", "d"]);
    assert!(next_link(&second).is_none(), "the end");
    // Without values the page is not cut.
    assert_eq!(json_keys(&s, &b, "limit=10"), ["a", "b", "c", "d"]);
}

#[test]
fn empty_bucket_lists_nothing_in_every_format() {
    let (s, b) = open_bucket();
    assert_eq!(list(&s, &b, "format=text").text(), "");
    assert_eq!(list(&s, &b, "format=json").json(), json!([]));
    assert_eq!(list(&s, &b, "format=jsonl").text(), "");
    assert!(list(&s, &b, "format=json").header("link").is_none());
}

#[test]
fn text_listing_is_one_key_per_line_in_byte_order() {
    let (s, b) = open_bucket();
    // Percent-encoded: "é" (0xC3 0xA9) sorts after ASCII; "B" before "a".
    fill(&s, &b, &["b", "a", "B", "%C3%A9", "a1", "_"]);
    let r = s.get(&format!("/{b}/"));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{:?}",
        r.header("content-type")
    );
    assert_eq!(lines(&r), ["B", "_", "a", "a1", "b", "é"]);
}

#[test]
fn text_listing_with_values_is_key_equals_value_with_escaped_newlines() {
    let (s, b) = open_bucket();
    s.put(&format!("/{b}/multi"), "line1\nline2\n");
    s.put(&format!("/{b}/n"), "42");
    s.put(&format!("/{b}/j"), r#"{"a":1}"#);
    s.put(&format!("/{b}/eq"), "x=y");
    let r = list(&s, &b, "values=true");
    assert_eq!(
        lines(&r),
        [r#"eq=x=y"#, r#"j={"a":1}"#, r"multi=line1\nline2\n", "n=42"]
    );
}

#[test]
fn json_listing_is_an_array_of_keys_with_json_content_type() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["c", "a", "b"]);
    let r = list(&s, &b, "format=json");
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    assert_eq!(r.json(), json!(["a", "b", "c"]));
}

#[test]
fn accept_application_json_selects_json_without_format() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["x", "y"]);
    let r = s.request(
        "GET",
        &format!("/{b}/"),
        &[("accept", "application/json")],
        None,
    );
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    assert_eq!(r.json(), json!(["x", "y"]));
}

/// Only `application/json` itself selects JSON: `application/jsonl` (or
/// any other type that starts the same) is text, as any other Accept.
#[test]
fn accept_selects_json_only_for_application_json_itself() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["x", "y"]);
    let get = |accept: &str| s.request("GET", &format!("/{b}/"), &[("accept", accept)], None);
    for accept in ["application/jsonl", "application/json-seq", "text/plain"] {
        let r = get(accept);
        assert_eq!(r.status, 200);
        assert_eq!(r.text().lines().collect::<Vec<_>>(), ["x", "y"], "{accept}");
    }
    for accept in [
        "text/html, application/json;q=0.9",
        "Application/JSON; charset=utf-8",
    ] {
        assert_eq!(get(accept).json(), json!(["x", "y"]), "{accept}");
    }
}

#[test]
fn explicit_format_wins_over_accept() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["x", "y"]);
    let r = s.request(
        "GET",
        &format!("/{b}/?format=text"),
        &[("accept", "application/json")],
        None,
    );
    assert_eq!(r.text().lines().collect::<Vec<_>>(), ["x", "y"]);
}

#[test]
fn json_listing_with_values_types_each_value() {
    let (s, b) = open_bucket();
    s.put(&format!("/{b}/int"), "42");
    s.put(&format!("/{b}/float"), "2.5");
    s.put(&format!("/{b}/obj"), r#"{"a":[1,2]}"#);
    s.put(&format!("/{b}/text"), "hello\nworld");
    s.request(
        "PUT",
        &format!("/{b}/jstr"),
        &[("content-type", "application/json")],
        Some(br#""quoted""#),
    );
    let r = list(&s, &b, "format=json&values=true");
    assert_eq!(
        r.json(),
        json!([
            ["float", 2.5],
            ["int", 42],
            ["jstr", "quoted"],
            ["obj", {"a": [1, 2]}],
            ["text", "hello\nworld"],
        ])
    );
}

/// Found by a review: the JSON listing read each document into
/// `serde_json::Value`, so integers past 64 bits and long decimals came out
/// rounded to a double, though the README says json and jsonl keep every
/// value exactly. A document is now embedded as stored, without the
/// whitespace between its tokens (jsonl stays one line an entry).
#[test]
fn json_listings_keep_documents_and_numbers_as_stored() {
    let (s, b) = open_bucket();
    let doc = "{\n  \"id\": 12345678901234567890123,\n  \"amount\": 0.1000000000000000000001,\n  \"s\": \"a \\\" b\\n\"\n}";
    s.put(&format!("/{b}/doc"), doc);
    s.put(&format!("/{b}/n"), "12345678901234567890123");
    let compact =
        r#"{"id":12345678901234567890123,"amount":0.1000000000000000000001,"s":"a \" b\n"}"#;
    let r = list(&s, &b, "format=json&values=true");
    assert_eq!(
        r.text(),
        format!(r#"[["doc",{compact}],["n",12345678901234567890123]]"#)
    );
    let r = list(&s, &b, "format=jsonl&values=true");
    assert_eq!(
        r.text(),
        format!("[\"doc\",{compact}]\n[\"n\",12345678901234567890123]\n")
    );
}

/// Found by a review: an empty `end` (or `start` with `reverse`) listed
/// nothing, while an empty `prefix` is no prefix; and a `limit` past 64
/// bits was a 400 though a larger `limit` lists a full page.
#[test]
fn empty_bounds_are_no_bounds_and_huge_counts_are_the_most() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b"]);
    for query in ["start=&end=", "end=", "reverse=true&start=&end="] {
        let mut keys = json_keys(&s, &b, &format!("prefix=&{query}"));
        keys.sort();
        assert_eq!(keys, ["a", "b"], "{query}");
    }
    assert_eq!(
        json_keys(&s, &b, "limit=99999999999999999999999"),
        ["a", "b"]
    );
    assert!(json_keys(&s, &b, "skip=99999999999999999999999").is_empty());
    s.get(&format!("/{b}/?limit=-1")).assert_problem(400);
}

#[test]
fn json_listing_gives_non_utf8_raw_values_as_base64() {
    let (s, b) = open_bucket();
    let bytes: &[u8] = &[0xff, 0xfe, 0x00, 0x41];
    s.request("PUT", &format!("/{b}/bin"), &[], Some(bytes));
    s.request(
        "PUT",
        &format!("/{b}/typed"),
        &[("content-type", "image/png")],
        Some(&[0x89, 0x50, 0xc3]),
    );
    let r = list(&s, &b, "format=json&values=true");
    let items = r.json();
    let items = items.as_array().expect("array");
    assert_eq!(items.len(), 2);
    for (item, key, raw) in [
        (&items[0], "bin", bytes),
        (&items[1], "typed", &[0x89u8, 0x50, 0xc3][..]),
    ] {
        assert_eq!(item[0], key);
        let encoded = item[1].as_str().expect("base64 text");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("valid base64"),
            raw
        );
        assert_eq!(item[2], "base64", "{item}");
    }
}

#[test]
fn jsonl_listing_is_one_json_item_per_line() {
    let (s, b) = open_bucket();
    s.put(&format!("/{b}/a"), "1");
    s.put(&format!("/{b}/b"), "multi\nline");
    s.put(&format!("/{b}/c"), "[true]");
    let keys = list(&s, &b, "format=jsonl");
    let parsed: Vec<Value> = keys
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(parsed, [json!("a"), json!("b"), json!("c")]);

    let values = list(&s, &b, "format=jsonl&values=true");
    let parsed: Vec<Value> = values
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        parsed,
        [
            json!(["a", 1]),
            json!(["b", "multi\nline"]),
            json!(["c", [true]])
        ]
    );
}

#[test]
fn prefix_selects_only_keys_that_start_with_it() {
    let (s, b) = open_bucket();
    fill(
        &s,
        &b,
        &["user:1", "user:2", "user", "users:9", "usr:1", "a"],
    );
    assert_eq!(json_keys(&s, &b, "prefix=user:"), ["user:1", "user:2"]);
    assert_eq!(
        json_keys(&s, &b, "prefix=user"),
        ["user", "user:1", "user:2", "users:9"]
    );
    assert!(json_keys(&s, &b, "prefix=zzz").is_empty());
}

#[test]
fn start_is_an_exclusive_lower_bound() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c", "d"]);
    assert_eq!(json_keys(&s, &b, "start=b"), ["c", "d"]);
    // A start between keys.
    assert_eq!(json_keys(&s, &b, "start=bb"), ["c", "d"]);
}

#[test]
fn end_is_an_exclusive_upper_bound() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c", "d"]);
    assert_eq!(json_keys(&s, &b, "end=c"), ["a", "b"]);
    assert_eq!(json_keys(&s, &b, "start=a&end=d"), ["b", "c"]);
    assert!(json_keys(&s, &b, "start=b&end=c").is_empty());
}

#[test]
fn start_and_end_combine_with_prefix() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["p:1", "p:2", "p:3", "p:4", "q:1"]);
    assert_eq!(
        json_keys(&s, &b, "prefix=p:&start=p:1&end=p:4"),
        ["p:2", "p:3"]
    );
}

#[test]
fn reverse_lists_in_descending_byte_order() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "c", "b", "B"]);
    assert_eq!(json_keys(&s, &b, "reverse=true"), ["c", "b", "a", "B"]);
}

#[test]
fn reverse_with_start_and_end_bounds_in_the_direction_of_travel() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c", "d", "e"]);
    // start: exclusive upper bound when reversed.
    assert_eq!(json_keys(&s, &b, "reverse=true&start=d"), ["c", "b", "a"]);
    // end: exclusive lower bound when reversed.
    assert_eq!(json_keys(&s, &b, "reverse=true&end=b"), ["e", "d", "c"]);
    assert_eq!(
        json_keys(&s, &b, "reverse=true&start=e&end=a"),
        ["d", "c", "b"]
    );
}

#[test]
fn limit_and_skip_select_a_window() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c", "d", "e", "f"]);
    assert_eq!(json_keys(&s, &b, "limit=2"), ["a", "b"]);
    assert_eq!(json_keys(&s, &b, "skip=2&limit=3"), ["c", "d", "e"]);
    assert_eq!(json_keys(&s, &b, "skip=4"), ["e", "f"]);
    assert!(json_keys(&s, &b, "skip=10").is_empty());
    assert_eq!(json_keys(&s, &b, "reverse=true&skip=1&limit=2"), ["e", "d"]);
}

/// `limit=0` is an empty page without a `Link`: its next page would be the
/// same request.
#[test]
fn limit_zero_lists_nothing() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b"]);
    assert!(json_keys(&s, &b, "limit=0").is_empty());
    assert_eq!(list(&s, &b, "limit=0").header("link"), None);
}

#[test]
fn no_link_header_when_the_listing_is_complete() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c"]);
    assert!(list(&s, &b, "").header("link").is_none());
    assert!(list(&s, &b, "limit=5").header("link").is_none());
    // Exactly `limit` keys: nothing was cut.
    assert!(list(&s, &b, "limit=3").header("link").is_none());
}

#[test]
fn link_header_points_to_the_next_page() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c", "d", "e"]);
    let first = list(&s, &b, "format=json&limit=2");
    assert_eq!(first.json(), json!(["a", "b"]));
    let next = next_link(&first).expect("a rel=next Link when limit cut the list");
    assert!(
        next.starts_with(&format!("/{b}/?")) || next.starts_with(&s.url(&format!("/{b}/?"))),
        "next page URL: {next}"
    );
    let second = s.get(&as_path(&s, &next));
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(
        second.json(),
        json!(["c", "d"]),
        "format and limit carry over"
    );
}

/// Follows `rel="next"` from `first_query` and returns the pages' keys.
fn follow_pages(s: &TestServer, b: &str, first_query: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut path = format!("/{b}/?{first_query}");
    loop {
        let r = s.get(&path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        let keys: Vec<String> = serde_json::from_value(r.json()).expect("keys");
        pages.push(keys);
        assert!(pages.len() < 100, "the Link chain does not end");
        match next_link(&r) {
            Some(next) => path = as_path(s, &next),
            None => return pages,
        }
    }
}

#[test]
fn following_link_headers_covers_every_key_exactly_once_in_order() {
    let (s, b) = open_bucket();
    let keys: Vec<String> = (0..47).map(|i| format!("k{i:03}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    fill(&s, &b, &refs);
    let pages = follow_pages(&s, &b, "format=json&limit=10");
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [10, 10, 10, 10, 7]
    );
    let all: Vec<String> = pages.into_iter().flatten().collect();
    assert_eq!(all, keys);
}

#[test]
fn last_full_page_has_no_link_when_no_keys_remain() {
    let (s, b) = open_bucket();
    let keys: Vec<String> = (0..20).map(|i| format!("k{i:02}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    fill(&s, &b, &refs);
    let pages = follow_pages(&s, &b, "format=json&limit=10");
    assert_eq!(pages.len(), 2, "pages: {pages:?}");
    assert_eq!(pages.concat(), keys);
}

#[test]
fn link_paging_keeps_prefix_and_reverse() {
    let (s, b) = open_bucket();
    let keys: Vec<String> = (0..23).map(|i| format!("p:{i:02}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    fill(&s, &b, &refs);
    fill(&s, &b, &["a", "q", "p", "p;"]);
    let pages = follow_pages(&s, &b, "format=json&limit=5&prefix=p:&reverse=true");
    let all: Vec<String> = pages.concat();
    let mut expected = keys.clone();
    expected.reverse();
    assert_eq!(all, expected);
}

#[test]
fn link_paging_with_skip_skips_only_on_the_first_page() {
    let (s, b) = open_bucket();
    let keys: Vec<String> = (0..12).map(|i| format!("k{i:02}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    fill(&s, &b, &refs);
    let all = follow_pages(&s, &b, "format=json&limit=4&skip=2").concat();
    assert_eq!(all, keys[2..]);
}

#[test]
fn link_paging_handles_keys_that_need_escaping() {
    let (s, b) = open_bucket();
    // Keys with &, =, +, space, %, # and non-ASCII.
    let raw = ["a&b", "a=b", "a+b", "a b", "a%b", "a#b", "é?", "z/z"];
    for k in raw {
        let encoded: String = k
            .bytes()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    (c as char).to_string()
                } else {
                    format!("%{c:02X}")
                }
            })
            .collect();
        assert_eq!(s.put(&format!("/{b}/{encoded}"), "v").status, 204, "{k}");
    }
    let pages = follow_pages(&s, &b, "format=json&limit=3");
    let all: Vec<String> = pages.concat();
    let expected: BTreeSet<String> = raw.iter().map(|k| (*k).to_owned()).collect();
    assert_eq!(all.len(), raw.len(), "{all:?}");
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), expected);
}

#[test]
fn link_paging_works_in_text_format() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c"]);
    let first = list(&s, &b, "limit=2");
    assert_eq!(lines(&first), ["a", "b"]);
    let next = next_link(&first).expect("next");
    let second = s.get(&as_path(&s, &next));
    assert_eq!(lines(&second), ["c"]);
    assert!(second.header("link").is_none());
}

#[test]
fn listing_a_bucket_with_a_secret_key_needs_it() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=adm1n");
    s.put(&format!("/{b}/k"), "v");
    s.get(&format!("/{b}/")).assert_problem(401);
    let r = s.request(
        "GET",
        &format!("/{b}/?format=json"),
        &[("authorization", "Bearer adm1n")],
        None,
    );
    assert_eq!(r.json(), json!(["k"]));
    let r = s.get(&format!("/{b}/?format=json&key=adm1n"));
    assert_eq!(r.json(), json!(["k"]));
}

#[test]
fn deleted_keys_are_not_listed() {
    let (s, b) = open_bucket();
    fill(&s, &b, &["a", "b", "c"]);
    s.delete(&format!("/{b}/b"));
    assert_eq!(json_keys(&s, &b, ""), ["a", "c"]);
}

#[test]
fn listings_of_two_buckets_are_separate() {
    let s = TestServer::start();
    let b1 = s.create_bucket("");
    let b2 = s.create_bucket("");
    fill(&s, &b1, &["one"]);
    fill(&s, &b2, &["two"]);
    assert_eq!(json_keys(&s, &b1, ""), ["one"]);
    assert_eq!(json_keys(&s, &b2, ""), ["two"]);
}

#[test]
fn a_limit_above_the_maximum_lists_the_maximum_and_links_the_rest() {
    // Relaxed durability: 10,002 writes without an fsync each.
    let s = std::sync::Arc::new(TestServer::start_with(&["--durability", "relaxed"]));
    let b = s.create_bucket("");
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (s, b) = (s.clone(), b.clone());
            std::thread::spawn(move || {
                for i in (t..10_002).step_by(4) {
                    let r = s.put(&format!("/{b}/k{i:05}"), "v");
                    assert_eq!(r.status, 204, "PUT k{i:05}: {}", r.text());
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let r = list(&s, &b, "format=json&limit=20000&unknown_parameter=1");
    let keys: Vec<String> = serde_json::from_value(r.json()).expect("keys");
    assert_eq!(keys.len(), 10_000, "capped at the maximum");
    assert_eq!(keys.last().map(String::as_str), Some("k09999"));
    let link = r.header("link").expect("a next link");
    assert!(link.contains("start=k09999"), "{link}");
    assert_eq!(json_keys(&s, &b, "start=k09999"), ["k10000", "k10001"]);
}

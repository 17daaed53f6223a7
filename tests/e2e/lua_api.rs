//! Lua scripts over HTTP: uploading, listing, deleting, the `kvdb` API a run
//! sees (data, request, response, tokens), and the authorization context a
//! run gets (the caller's scope, narrowed or widened by `kvdb.scope`).
//!
//! The sandbox and the limits are in `lua_sandbox.rs`; the helpers here are
//! shared with it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::harness::{Resp, TestServer};

/// The secret key of every bucket these suites create for scripts.
pub const SK: &str = "sk";

const TEXT: &str = "text/plain; charset=utf-8";

/// Uploads `source` as script `name` with the secret key.
pub fn upload(s: &TestServer, b: &str, name: &str, source: &[u8]) -> Resp {
    s.request(
        "PUT",
        &format!("/{b}/scripts/{name}"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "text/plain"),
        ],
        Some(source),
    )
}

/// Uploads `source` as script `name`, asserting success.
#[track_caller]
pub fn install(s: &TestServer, b: &str, name: &str, source: &str) {
    let r = upload(s, b, name, source.as_bytes());
    assert_eq!(r.status, 200, "upload {name}: {}", r.text());
}

/// Runs script `name` (with an optional query) anonymously with `GET`.
pub fn run(s: &TestServer, b: &str, name_and_query: &str) -> Resp {
    s.get(&format!("/{b}/scripts/{name_and_query}"))
}

/// Runs script `name` with `GET` and `Authorization: Bearer <credential>`.
pub fn run_as(s: &TestServer, b: &str, name: &str, credential: &str) -> Resp {
    let auth = format!("Bearer {credential}");
    s.request(
        "GET",
        &format!("/{b}/scripts/{name}"),
        &[("authorization", auth.as_str())],
        None,
    )
}

/// A fresh script name, so no test depends on replacing a script.
pub fn fresh_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Uploads `source` under a fresh name and runs it anonymously.
pub fn eval(s: &TestServer, b: &str, source: &str) -> Resp {
    let name = fresh_name();
    install(s, b, &name, source);
    run(s, b, &name)
}

/// Uploads `source` under a fresh name and runs it with `credential`.
pub fn eval_as(s: &TestServer, b: &str, source: &str, credential: &str) -> Resp {
    let name = fresh_name();
    install(s, b, &name, source);
    run_as(s, b, &name, credential)
}

/// A bucket with the secret key [`SK`] and these extra policy fields.
pub fn script_bucket(s: &TestServer, extra: &str) -> String {
    if extra.is_empty() {
        s.create_bucket("secret_key=sk")
    } else {
        s.create_bucket(&format!("secret_key=sk&{extra}"))
    }
}

/// Asserts a 200 answer with this body.
#[track_caller]
pub fn assert_body(r: &Resp, body: &str) {
    assert_eq!(r.status, 200, "body: {}", r.text());
    assert_eq!(r.text(), body);
}

/// Asserts a problem of this status and type (`urn:kvdb:problem:<kind>`);
/// returns its detail.
#[track_caller]
pub fn assert_problem_type(r: &Resp, status: u16, kind: &str) -> String {
    let detail = r.assert_problem(status);
    assert_eq!(
        r.json()["type"],
        format!("urn:kvdb:problem:{kind}"),
        "{}",
        r.text()
    );
    detail
}

/// An answer received within a bound, with how long it took.
pub struct Timed {
    pub status: u16,
    pub body: String,
    pub elapsed: Duration,
}

impl Timed {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `GET path`, failing the test if no answer arrives within `bound` (a run
/// that never ends must not hang the suite).
#[track_caller]
pub fn get_within(s: &TestServer, path: &str, bound: Duration) -> Timed {
    try_get_within(s, path, bound)
        .unwrap_or_else(|| panic!("GET {path}: no answer within {bound:?}"))
}

/// `GET path`, or `None` if no answer arrives within `bound`.
pub fn try_get_within(s: &TestServer, path: &str, bound: Duration) -> Option<Timed> {
    let url = s.url(path);
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let result = agent.get(&url).call().map(|mut r| {
            let status = r.status().as_u16();
            let body = r.body_mut().read_to_string().unwrap_or_default();
            (status, body)
        });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(bound) {
        Ok(Ok((status, body))) => Some(Timed {
            status,
            body,
            elapsed: started.elapsed(),
        }),
        Ok(Err(e)) => panic!("GET {path}: {e}"),
        Err(_) => None,
    }
}

/// `GET url` on a thread of its own: the answer's status, when it comes
/// (for runs that take long while the test checks something else).
pub fn get_in_background(url: String) -> std::thread::JoinHandle<Result<u16, ureq::Error>> {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent.get(&url).call().map(|r| r.status().as_u16())
    })
}

/// A raw HTTP/1.1 exchange (no redirect following): status, lower-cased
/// header lines, body.
pub fn raw(s: &TestServer, method: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    let host = s.base().trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn put_as(s: &TestServer, path: &str, body: &str, content_type: Option<&str>) -> Resp {
    let mut headers = vec![("authorization", "Bearer sk")];
    if let Some(ct) = content_type {
        headers.push(("content-type", ct));
    }
    s.request("PUT", path, &headers, Some(body.as_bytes()))
}

/// A server with a script bucket whose key `j` holds the JSON document `doc`.
fn with_json_doc(doc: &str) -> (TestServer, String) {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let put = put_as(&s, &format!("/{b}/j"), doc, Some("application/json"));
    assert_eq!(put.status, 204, "{}", put.text());
    (s, b)
}

fn get_as(s: &TestServer, path: &str, credential: &str) -> Resp {
    let auth = format!("Bearer {credential}");
    s.request("GET", path, &[("authorization", auth.as_str())], None)
}

// ---------------------------------------------------------------------------
// The two scripts of API.md

const COUNTER: &str = r#"local key = os.date("visitors:%Y-%m-%d")
local err = kvdb.incr(key, 1)
if err then
  kvdb.say("error incrementing: " .. err)
  kvdb.exit(500)
end
local value = kvdb.get(key)
kvdb.say(value)
"#;

#[test]
fn api_md_counter_script_counts_across_calls() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "counter", COUNTER);
    assert_body(&run(&s, &b, "counter"), "1\n");
    assert_body(&run(&s, &b, "counter"), "2\n");
    assert_body(&run(&s, &b, "counter"), "3\n");
    // The count is an ordinary integer key of the bucket.
    let keys = get_as(&s, &format!("/{b}/?prefix=visitors:&format=json"), SK).json();
    let keys = keys.as_array().expect("key list").clone();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = keys[0].as_str().expect("key").to_owned();
    let r = s.get(&format!("/{b}/{key}"));
    assert_eq!((r.status, r.text().as_str()), (200, "3"));
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
}

/// `runs` runs of script `name` from 16 threads at once; the bodies.
fn run_concurrently(s: &TestServer, b: &str, name: &str, runs: usize) -> Vec<(u16, String)> {
    let url = s.url(&format!("/{b}/scripts/{name}"));
    let next = AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..16 {
            scope.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                while next.fetch_add(1, Ordering::SeqCst) < runs {
                    let mut r = agent.get(&url).call().expect("script run");
                    let status = r.status().as_u16();
                    let body = r.body_mut().read_to_string().unwrap_or_default();
                    out.lock().expect("results").push((status, body));
                }
            });
        }
    });
    out.into_inner().expect("results")
}

#[test]
fn concurrent_counter_runs_lose_no_increment_in_either_durability() {
    for args in [&[][..], &["--durability", "relaxed"][..]] {
        let s = TestServer::start_with(args);
        let b = script_bucket(&s, "");
        install(
            &s,
            &b,
            "counter",
            "kvdb.say(kvdb.incr('n', 1) or kvdb.get('n'))",
        );
        let results = run_concurrently(&s, &b, "counter", 400);
        assert_eq!(results.len(), 400);
        for (status, body) in &results {
            assert_eq!(*status, 200, "{args:?}: {body}");
            let seen: u64 = body.trim().parse().expect("a count");
            assert!((1..=400).contains(&seen), "{args:?}: {seen}");
        }
        assert_eq!(s.get(&format!("/{b}/n")).text(), "400", "{args:?}");
    }
}

#[test]
fn writes_from_inside_library_callbacks_work() {
    // Writes inside a gsub replacement function, a pcall, an xpcall
    // handler, a sort comparator and an __index metamethod (the last three
    // called from C, where Lua can't suspend a run: the run leaves its
    // worker before it gets there): each waits for its commit (strict
    // durability) and gives its status, failed ones too.
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.set("text", "abc")
local out = string.gsub("abc", ".", function(c) kvdb.incr("g", 1); return c:upper() end)
local t = {3, 1, 2}
table.sort(t, function(x, y) kvdb.set("sorted", "yes"); return x < y end)
local failed = string.gsub("x", "x", function() return kvdb.incr("text", 1) end)
local ok, status = pcall(kvdb.incr, "text", 1)
local handled = select(2, xpcall(error, function() return kvdb.append("g", "!") end, "boom"))
local seen = setmetatable({}, { __index = function(_, k) kvdb.set("seen", k); return k end })
kvdb.say(out, " ", kvdb.get("g"), " ", kvdb.get("sorted"), " ", table.concat(t, ","))
kvdb.say(failed, " | ", tostring(ok), " ", status, " | ", tostring(handled))
kvdb.say(seen.key, " ", kvdb.get("seen"), " ", kvdb.delete("seen"), " ", kvdb.exists("seen"))"#,
    );
    let raw_bytes = "type mismatch: the current value is raw bytes, not a number";
    assert_body(
        &r,
        &format!(
            "ABC 3 yes 1,2,3\n{raw_bytes} | true {raw_bytes} | type mismatch: the current value is an integer; only raw values can be appended to\nkey key nil false\n"
        ),
    );
}

#[test]
fn a_long_run_finishes_with_the_right_answer_every_time() {
    // Long enough to leave the worker that took the request (the first run)
    // and to start on a blocking thread (later runs, the script now known).
    // A generous time limit: the loop takes a few hundred ms in a debug
    // build, over the default 1 s on a loaded CI machine.
    let s = TestServer::start_with(&["--script-time-ms", "20000"]);
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "sum",
        r#"local n = 0
for i = 1, 3000000 do n = n + i % 7 end
kvdb.incr("runs", 1)
kvdb.say(n, " ", kvdb.get("runs"))"#,
    );
    for round in 1..=3 {
        assert_body(&run(&s, &b, "sum"), &format!("8999997 {round}\n"));
    }
}

#[test]
fn api_md_counter_script_reports_a_denied_increment_with_500() {
    let s = TestServer::start();
    // Writing needs the write key: the anonymous run's incr is refused.
    let b = script_bucket(&s, "write_key=wk");
    install(&s, &b, "counter", COUNTER);
    let r = run(&s, &b, "counter");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text()
            .starts_with("error incrementing: permission denied"),
        "{}",
        r.text()
    );
    // With the write key the same script counts.
    assert_body(&run_as(&s, &b, "counter", "wk"), "1\n");
}

#[test]
fn api_md_hello_script_escapes_the_name() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "hello",
        r#"kvdb.say("Hello " .. kvdb.escape_html(kvdb.var.name))"#,
    );
    let r = run(&s, &b, "hello?name=%3Cb%3E%26amp%3B%22x%22");
    assert_body(&r, "Hello &lt;b&gt;&amp;amp;&quot;x&quot;\n");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
    assert_body(&run(&s, &b, "hello?name=World"), "Hello World\n");
}

// ---------------------------------------------------------------------------
// Uploading, listing, deleting

#[test]
fn upload_answers_a_json_summary() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let source = "kvdb.say('hi')\n";
    let r = upload(&s, &b, "hi", source.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    let doc = r.json();
    assert_eq!(doc["name"], "hi");
    assert_eq!(doc["kind"], "lua");
    assert_eq!(doc["size"], source.len());
    let updated = doc["updated_at"].as_u64().expect("updated_at in seconds");
    assert!(updated.abs_diff(now()) < 60, "updated_at {updated}");
    assert_body(&run(&s, &b, "hi"), "hi\n");
}

#[test]
fn upload_with_a_syntax_error_is_400_naming_the_line() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = upload(&s, &b, "broken", b"kvdb.say('ok')\nthis is not lua\n");
    let detail = assert_problem_type(&r, 400, "script-invalid");
    assert!(detail.contains("broken:2:"), "{detail}");
    // Nothing was stored.
    assert_problem_type(&run(&s, &b, "broken"), 404, "script-not-found");
    let r = upload(&s, &b, "unclosed", b"if true then\n  kvdb.say('x')\n");
    let detail = assert_problem_type(&r, 400, "script-invalid");
    assert!(detail.contains("unclosed:"), "{detail}");
}

/// `curl -d @file` sends a file as a form without its line breaks; a `--`
/// comment then runs to the end of the script, which uploaded without an
/// error and answered nothing (found by a reviewer following the README
/// with `-d`: the visitors example's first line ends in a comment).
#[test]
fn a_script_whose_line_breaks_curl_dropped_is_400_saying_how_to_upload_it() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let file = "kvdb.incr('visits') -- count\nkvdb.say(kvdb.get('visits'))\n";
    let dropped = file.replace('\n', "");
    let form = |source: &str| {
        s.request(
            "PUT",
            &format!("/{b}/scripts/visits"),
            &[
                ("authorization", "Bearer sk"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            Some(source.as_bytes()),
        )
    };
    let detail = assert_problem_type(&form(&dropped), 400, "script-invalid");
    assert!(
        detail.contains("without line breaks, and has a `--` comment")
            && detail.contains("`curl -T file.lua …` or `--data-binary @file.lua`"),
        "{detail}"
    );
    assert_problem_type(&run(&s, &b, "visits"), 404, "script-not-found");
    // The same bytes as text (not a form), the file with its line breaks
    // as a form, and a one-line script with no comment (`curl -d 'CODE'`)
    // upload.
    assert_eq!(upload(&s, &b, "visits", dropped.as_bytes()).status, 200);
    assert_eq!(form(file).status, 200);
    assert_body(&run(&s, &b, "visits"), "1\n");
    assert_eq!(form("kvdb.say('hi')").status, 200);
    assert_body(&run(&s, &b, "visits"), "hi\n");
    // A first line starting with `#` is skipped: without line breaks, all.
    let detail = assert_problem_type(
        &form("#!/usr/bin/env lua kvdb.say('x')"),
        400,
        "script-invalid",
    );
    assert!(
        detail.contains("a first line starting with `#`"),
        "{detail}"
    );
    // `--` in a string is no comment.
    assert_eq!(form("kvdb.say('<!-- -->')").status, 200);
}

#[test]
fn upload_of_an_empty_script_is_400() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for body in [&b""[..], b"  \n\t\n"] {
        upload(&s, &b, "empty", body).assert_problem(400);
    }
    assert_problem_type(&run(&s, &b, "empty"), 404, "script-not-found");
}

#[test]
fn upload_beyond_the_source_limit_is_413() {
    let s = TestServer::start_with(&["--script-source-bytes", "100"]);
    let b = script_bucket(&s, "");
    let at_limit = format!("kvdb.say('a')\n--{}", "x".repeat(100 - 16));
    assert_eq!(at_limit.len(), 100);
    let r = upload(&s, &b, "fits", at_limit.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let over = format!("{at_limit}x");
    let detail = upload(&s, &b, "big", over.as_bytes()).assert_problem(413);
    assert!(detail.contains("--script-source-bytes"), "{detail}");
    // The message also says how to send a component, which lands here when
    // sent as Lua (`curl -X PUT -d @file.wasm` without a type; found by a
    // Python guest's author).
    assert!(
        detail.contains("Content-Type: application/wasm") && detail.contains("`curl -T file.wasm`"),
        "{detail}"
    );
    assert_problem_type(&run(&s, &b, "big"), 404, "script-not-found");
    assert_body(&run(&s, &b, "fits"), "a\n");
}

#[test]
fn upload_with_a_bad_name_is_400() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let long = "a".repeat(65);
    for name in ["a%20b", long.as_str(), "a%2Fb", "caf%C3%A9", "a:b"] {
        upload(&s, &b, name, b"kvdb.say(1)").assert_problem(400);
    }
    // `.` and `..` are path steps to browsers and curl: a script of that
    // name could never be run by its URL.
    for name in ["%2E", "%2E%2E", ".%2E"] {
        let detail = upload(&s, &b, name, b"kvdb.say(1)").assert_problem(400);
        assert!(detail.contains("step in the path"), "{name}: {detail}");
    }
    let longest = "a".repeat(64);
    for name in ["A-z_0.9", longest.as_str()] {
        let r = upload(&s, &b, name, b"kvdb.say(1)");
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    let listed = get_as(&s, &format!("/{b}/scripts/"), SK).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
}

#[test]
fn upload_needs_the_secret_key_and_stores_nothing_without_it() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    let path = format!("/{b}/scripts/x");
    let body = Some(&b"kvdb.say('x')"[..]);
    assert_eq!(s.request("PUT", &path, &[], body).status, 401);
    for key in ["rk", "wk"] {
        let auth = format!("Bearer {key}");
        let r = s.request("PUT", &path, &[("authorization", auth.as_str())], body);
        r.assert_problem(403);
    }
    let t = s.token(&b, SK, "permissions=read,write,delete,enumerate");
    let auth = format!("Bearer {t}");
    let r = s.request("PUT", &path, &[("authorization", auth.as_str())], body);
    r.assert_problem(403);
    let r = s.request("PUT", &path, &[("authorization", "Bearer wrong")], body);
    r.assert_problem(401);
    assert_eq!(get_as(&s, &format!("/{b}/scripts/"), SK).json(), json!([]));
    assert_problem_type(&run(&s, &b, "x"), 404, "script-not-found");
}

#[test]
fn a_bucket_without_a_secret_key_cannot_have_scripts() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    let r = s.request(
        "PUT",
        &format!("/{b}/scripts/x"),
        &[],
        Some(b"kvdb.say('x')"),
    );
    assert!(r.status == 401 || r.status == 403, "{}", r.text());
    r.assert_problem(r.status);
    assert_eq!(s.get(&format!("/{b}/scripts/x")).status, 404);
}

#[test]
fn webassembly_upload_is_400_for_now() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let magic = b"\0asm\x01\0\0\0";
    upload(&s, &b, "w", magic).assert_problem(400);
    let r = s.request(
        "PUT",
        &format!("/{b}/scripts/w"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "application/wasm"),
        ],
        Some(b"kvdb.say('not wasm')"),
    );
    r.assert_problem(400);
    assert_eq!(get_as(&s, &format!("/{b}/scripts/"), SK).json(), json!([]));
}

#[test]
fn listing_scripts_answers_json_summaries() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "beta", "kvdb.say('b')");
    install(&s, &b, "alpha", "kvdb.say('alpha')");
    let r = get_as(&s, &format!("/{b}/scripts/"), SK);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    let list = r.json();
    let list = list.as_array().expect("array");
    let mut names: Vec<&str> = list.iter().filter_map(|e| e["name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["alpha", "beta"]);
    for entry in list {
        assert_eq!(entry["kind"], "lua", "{entry}");
        let expected = if entry["name"] == "alpha" {
            "kvdb.say('alpha')".len()
        } else {
            "kvdb.say('b')".len()
        };
        assert_eq!(entry["size"], expected, "{entry}");
        let updated = entry["updated_at"].as_u64().expect("updated_at");
        assert!(updated.abs_diff(now()) < 60, "{entry}");
    }
    // The listing is for the admin.
    assert_eq!(s.get(&format!("/{b}/scripts/")).status, 401);
}

#[test]
fn listing_scripts_for_a_browser_is_an_html_page_naming_them() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "first-script", "kvdb.say(1)");
    install(&s, &b, "second.script", "kvdb.say(2)");
    let r = s.request(
        "GET",
        &format!("/{b}/scripts/"),
        &[
            ("authorization", "Bearer sk"),
            ("accept", "text/html,application/xhtml+xml"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("text/html"),
        "{:?}",
        r.header("content-type")
    );
    let page = r.text();
    assert!(page.contains("first-script"), "{page}");
    assert!(page.contains("second.script"), "{page}");
    // Never framed by another page (found by a review).
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(
        r.header("content-security-policy").as_deref(),
        Some("frame-ancestors 'none'")
    );
}

#[test]
fn editor_page_carries_the_current_source_escaped() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "ed", "kvdb.say('<b>tag</b>')");
    let r = get_as(&s, &format!("/{b}/scripts/ed/edit"), SK);
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.text();
    assert!(page.contains("&lt;b&gt;tag"), "source not in the page");
    assert!(!page.contains("<b>tag</b>"), "source not escaped");
    assert_eq!(s.get(&format!("/{b}/scripts/ed/edit")).status, 401);
}

#[test]
fn deleting_a_script_answers_204_and_running_it_is_404() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "gone", "kvdb.say('here')");
    install(&s, &b, "kept", "kvdb.say('kept')");
    assert_body(&run(&s, &b, "gone"), "here\n");
    // Only the admin deletes.
    assert_eq!(s.delete(&format!("/{b}/scripts/gone")).status, 401);
    assert_body(&run(&s, &b, "gone"), "here\n");
    let r = s.request(
        "DELETE",
        &format!("/{b}/scripts/gone"),
        &[("authorization", "Bearer sk")],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let detail = assert_problem_type(&run(&s, &b, "gone"), 404, "script-not-found");
    // An admin who POSTs a source to a script's URL learns how to upload.
    assert!(detail.contains("uploaded with PUT"), "{detail}");
    let r = s.request(
        "DELETE",
        &format!("/{b}/scripts/gone"),
        &[("authorization", "Bearer sk")],
        None,
    );
    r.assert_problem(404);
    let listed = get_as(&s, &format!("/{b}/scripts/"), SK).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_body(&run(&s, &b, "kept"), "kept\n");
}

#[test]
fn deleting_the_bucket_removes_its_scripts() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let other = script_bucket(&s, "");
    install(&s, &b, "x", "kvdb.say('x')");
    install(&s, &other, "x", "kvdb.say('other')");
    let r = s.request(
        "DELETE",
        &format!("/{b}"),
        &[("authorization", "Bearer sk")],
        None,
    );
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    run(&s, &b, "x").assert_problem(404);
    get_as(&s, &format!("/{b}/scripts/"), SK).assert_problem(404);
    assert_body(&run(&s, &other, "x"), "other\n");
}

#[test]
fn reuploading_a_script_runs_the_new_code() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "v", "kvdb.say('one')");
    for _ in 0..3 {
        assert_body(&run(&s, &b, "v"), "one\n");
    }
    install(&s, &b, "v", "kvdb.say('two')");
    for _ in 0..3 {
        assert_body(&run(&s, &b, "v"), "two\n");
    }
    let listed = get_as(&s, &format!("/{b}/scripts/"), SK).json();
    assert_eq!(listed[0]["size"], "kvdb.say('two')".len(), "{listed}");
    // Deleted and uploaded again: still the newest code.
    let r = s.request(
        "DELETE",
        &format!("/{b}/scripts/v"),
        &[("authorization", "Bearer sk")],
        None,
    );
    assert_eq!(r.status, 204);
    install(&s, &b, "v", "kvdb.say('three')");
    assert_body(&run(&s, &b, "v"), "three\n");
    // A rejected upload leaves the old code in place.
    upload(&s, &b, "v", b"this is not lua").assert_problem(400);
    assert_body(&run(&s, &b, "v"), "three\n");
}

#[test]
fn running_a_missing_script_or_in_a_missing_bucket_is_404() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    assert_problem_type(&run(&s, &b, "nope"), 404, "script-not-found");
    s.get("/0bHPZl72FHvOYlSRPGr7iA/scripts/nope")
        .assert_problem(404);
    run(&s, &b, "bad%20name").assert_problem(400);
    // A wrong credential is refused before the script runs.
    install(&s, &b, "x", "kvdb.set('ran', 1)");
    run_as(&s, &b, "x", "wrong").assert_problem(401);
    s.get(&format!("/{b}/ran")).assert_problem(404);
}

#[test]
fn a_runtime_error_is_a_500_script_error_with_message_and_line() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "oops",
        "local t = nil\nkvdb.say('before')\nlocal x = t.field\n",
    );
    let detail = assert_problem_type(&run(&s, &b, "oops"), 500, "script-error");
    assert!(detail.contains("oops:3:"), "{detail}");
    assert!(detail.contains("attempt to index"), "{detail}");
    install(&s, &b, "boom", "\n\nerror('kaboom')\n");
    let detail = assert_problem_type(&run(&s, &b, "boom"), 500, "script-error");
    assert!(detail.contains("boom:3:"), "{detail}");
    assert!(detail.contains("kaboom"), "{detail}");
    // An error raised inside a library function (ipairs indexing nil in C)
    // has no position of its own: the script's line is taken from the
    // traceback (the usual case: `kvdb.list` answered nil, err).
    install(
        &s,
        &b,
        "iter",
        "local n = 0\nfor _ in ipairs(nil) do\n  n = n + 1\nend\n",
    );
    let detail = assert_problem_type(&run(&s, &b, "iter"), 500, "script-error");
    assert!(
        detail.contains("iter:2: attempt to index a nil value"),
        "{detail}"
    );
    // The server goes on.
    assert_body(&eval(&s, &b, "kvdb.say('fine')"), "fine\n");
}

// ---------------------------------------------------------------------------
// The response

#[test]
fn status_header_and_exit_shape_the_response() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.status(201)
kvdb.header("X-Thing", "yes")
kvdb.say("before")
kvdb.exit()
kvdb.say("after")"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.text(), "before\n");
    assert_eq!(r.header("x-thing").as_deref(), Some("yes"));
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));

    let r = eval(
        &s,
        &b,
        r#"kvdb.header("Content-Type", "application/json")
kvdb.print('{"a":1}')
kvdb.exit(418)
kvdb.status(200)"#,
    );
    assert_eq!(r.status, 418);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.json(), json!({"a": 1}));

    // A later header of the same name replaces the earlier one.
    let r = eval(
        &s,
        &b,
        r#"kvdb.header("x-n", "1") kvdb.header("X-N", "2") kvdb.say("ok")"#,
    );
    assert_eq!(r.header("x-n").as_deref(), Some("2"));

    // Bad statuses and headers are script errors, not broken answers.
    for bad in [
        "kvdb.status(1000)",
        "kvdb.exit(42)",
        // Informational statuses are not responses: 100 would be hyper's
        // empty 500, 101 a dropped connection.
        "kvdb.status(100)",
        "kvdb.status(101)",
        "kvdb.exit(199)",
        r#"kvdb.header("bad name", "v")"#,
        r#"kvdb.header("x", "line\nbreak")"#,
        r#"kvdb.header("Content-Length", "5")"#,
        // Headers that act on the whole origin, which every bucket's
        // scripts share (found by a review).
        r#"kvdb.header("Set-Cookie", "a=b")"#,
        r#"kvdb.header("NEL", '{"report_to":"g","max_age":1}')"#,
        r#"kvdb.header("Clear-Site-Data", '"cookies"')"#,
        r#"kvdb.header("WWW-Authenticate", 'Basic realm="kvdb"')"#,
        r#"kvdb.header("Strict-Transport-Security", "max-age=1")"#,
        r#"kvdb.header("X-Accel-Redirect", "/internal/secret")"#,
        r#"kvdb.header("X-Sendfile", "/etc/passwd")"#,
        r#"kvdb.header("Upgrade", "websocket")"#,
    ] {
        let r = eval(&s, &b, bad);
        assert_problem_type(&r, 500, "script-error");
    }
}

/// A refused argument of a response call names the call, what it takes
/// and the script's line (found by a review: `kvdb.status("abc")` said only
/// "bad argument #1: error converting Lua string to u16").
#[test]
fn a_bad_argument_to_a_response_call_names_the_call_and_the_line() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for (source, says) in [
        (
            "kvdb.say('x')\nkvdb.status('abc')",
            ":2: kvdb.status takes an HTTP status, a whole number from 200 to 599, not \"abc\"",
        ),
        (
            "kvdb.status(200.5)",
            ":1: kvdb.status takes an HTTP status, a whole number from 200 to 599, not 200.5",
        ),
        (
            "kvdb.status(99)",
            ":1: kvdb.status: invalid HTTP status 99: a script answers 200 to 599",
        ),
        (
            "local t = {}\n\nkvdb.exit(t)",
            ":3: kvdb.exit takes an HTTP status, a whole number from 200 to 599, not a table",
        ),
        (
            "kvdb.exit(-1)",
            "kvdb.exit takes an HTTP status, a whole number from 200 to 599, not -1",
        ),
        (
            "kvdb.redirect('/a', 'abc')",
            "kvdb.redirect takes a redirect status: 301, 302 (the default), 303, 307 or 308, not \"abc\"",
        ),
        (
            "kvdb.redirect('/a', 200)",
            "kvdb.redirect takes a redirect status: 301, 302 (the default), 303, 307 or 308, not 200",
        ),
        (
            "kvdb.redirect(nil)",
            "kvdb.redirect takes a URL, a string, not nil",
        ),
        (
            "local function f() kvdb.header(nil, 'x') end\nf()",
            ":1: kvdb.header takes a header's name and value, both strings, not nil",
        ),
        (
            "kvdb.header('x', {})",
            "kvdb.header takes a header's name and value, both strings, not a table",
        ),
        ("kvdb.header('bad name', 'v')", "kvdb.header: "),
    ] {
        let detail = assert_problem_type(&eval(&s, &b, source), 500, "script-error");
        assert!(detail.contains(says), "{source}: {detail}");
    }
    // What Lua would coerce still goes: a string of digits, a whole float,
    // a number as a header value.
    let r = eval(
        &s,
        &b,
        "kvdb.header('x-n', 5) kvdb.status('404') kvdb.say('gone')",
    );
    assert_eq!((r.status, r.header("x-n").as_deref()), (404, Some("5")));
    assert_eq!(eval(&s, &b, "kvdb.exit(201.0)").status, 201);
    // Lua's own coercion: `"404.0"` is 404, a float header value is written
    // as `tostring` writes it.
    assert_eq!(eval(&s, &b, "kvdb.status('404.0')").status, 404);
    let r = eval(
        &s,
        &b,
        "kvdb.header('x-a', 2.0) kvdb.header('x-b', 0.1 * 3)",
    );
    assert_eq!(
        (r.header("x-a").as_deref(), r.header("x-b").as_deref()),
        (Some("2.0"), Some("0.3"))
    );
    // What pcall catches has no position (as Lua's own errors there); a
    // run's error names the line of the call, also one a helper returns.
    assert_body(
        &eval(&s, &b, "local ok, e = pcall(kvdb.status, 'x')\nkvdb.say(e)"),
        "kvdb.status takes an HTTP status, a whole number from 200 to 599, not \"x\"\n",
    );
    let detail = assert_problem_type(
        &eval(
            &s,
            &b,
            "local function answer(c) return kvdb.status(c) end\n\nanswer('x')",
        ),
        500,
        "script-error",
    );
    assert!(
        detail.contains(
            ":1: kvdb.status takes an HTTP status, a whole number from 200 to 599, not \"x\""
        ),
        "{detail}"
    );
    // A 204 has no content, so no type either (it went out as text/plain).
    let r = eval(&s, &b, "kvdb.status(204)");
    assert_eq!((r.status, r.header("content-type")), (204, None));
    let r = eval(&s, &b, "kvdb.status(202)");
    assert_eq!(
        (r.status, r.header("content-type").as_deref()),
        (202, Some("text/plain; charset=utf-8"))
    );
    let name = fresh_name();
    install(&s, &b, &name, "kvdb.redirect('/x', '307')");
    let (status, _, _) = raw(&s, "GET", &format!("/{b}/scripts/{name}"));
    assert_eq!(status, 307);
}

#[test]
fn script_pages_are_sandboxed_in_a_unique_origin_which_the_script_cannot_lift() {
    // Anyone can own a bucket and upload scripts: a script's page must not
    // share this origin, where the browser may keep another bucket's secret
    // key as the editor's Basic login.
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.header("Content-Type", "text/html") kvdb.say("<p>hi</p>")"#,
    );
    assert_eq!(r.status, 200);
    let policies: Vec<String> = r
        .headers
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(policies.len(), 1, "{policies:?}");
    assert!(
        policies[0].starts_with("sandbox allow-scripts"),
        "{policies:?}"
    );
    assert!(!policies[0].contains("allow-same-origin"), "{policies:?}");
    // A policy of the script's own is added to it, never instead of it.
    let r = eval(
        &s,
        &b,
        r#"kvdb.header("Content-Security-Policy", "sandbox allow-same-origin allow-scripts")
kvdb.say("hi")"#,
    );
    let policies: Vec<String> = r
        .headers
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(policies.len(), 2, "{policies:?}");
    assert!(
        policies.iter().any(|p| !p.contains("allow-same-origin")),
        "{policies:?}"
    );
    // Errors are JSON, not pages; they need no sandbox of their own.
    let r = eval(&s, &b, "error('boom')");
    assert_problem_type(&r, 500, "script-error");
}

#[test]
fn exit_inside_pcall_still_ends_the_script() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say("before")
pcall(kvdb.exit, 201)
kvdb.say("after")
kvdb.set("after_exit", 1)"#,
    );
    assert_eq!(
        (r.status, r.text().as_str()),
        (201, "before\n"),
        "kvdb.exit must end the run even under pcall"
    );
    s.get(&format!("/{b}/after_exit")).assert_problem(404);
}

#[test]
fn redirect_answers_302_with_location_and_stops() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "go",
        r#"kvdb.redirect("https://example.com/next?a=1") kvdb.set("after_redirect", 1)"#,
    );
    let (status, headers, _) = raw(&s, "GET", &format!("/{b}/scripts/go"));
    assert_eq!(status, 302);
    let location = headers.iter().find(|(k, _)| k == "location");
    assert_eq!(
        location.map(|(_, v)| v.as_str()),
        Some("https://example.com/next?a=1")
    );
    s.get(&format!("/{b}/after_redirect")).assert_problem(404);

    install(&s, &b, "moved", r#"kvdb.redirect("/elsewhere", 301)"#);
    let (status, headers, _) = raw(&s, "GET", &format!("/{b}/scripts/moved"));
    assert_eq!(status, 301);
    assert!(headers.contains(&("location".into(), "/elsewhere".into())));

    install(&s, &b, "badcode", r#"kvdb.redirect("/x", 200)"#);
    let (status, _, _) = raw(&s, "GET", &format!("/{b}/scripts/badcode"));
    assert_eq!(status, 500);

    // A redirect's Location is held to the header limits like any header
    // (a 30 MB URL went out; found by a review).
    let r = eval(&s, &b, r#"kvdb.redirect("/" .. ("a"):rep(100000))"#);
    let detail = assert_problem_type(&r, 500, "script-response-limit");
    assert!(detail.contains("65536 bytes"), "{detail}");
    let r = eval(
        &s,
        &b,
        r#"for i = 1, 100 do kvdb.header("x-h" .. i, "1") end kvdb.redirect("/x")"#,
    );
    assert_problem_type(&r, 500, "script-response-limit");
}

#[test]
fn say_joins_with_a_newline_print_without_and_global_print_logs() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say("a", 1, " ", 2.5, true)
kvdb.print("x", "y")
print("to the log, not the response")
kvdb.print("z")
kvdb.say()"#,
    );
    assert_body(&r, "a1 2.5true\nxyz\n");
}

#[test]
fn escape_html_escapes_markup_and_quotes() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.print(kvdb.escape_html([[<script>alert("x" & 'y')</script>]]))"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.text();
    for raw in ['<', '>', '"', '\''] {
        assert!(!out.contains(raw), "{raw} survived: {out}");
    }
    assert!(
        out.starts_with("&lt;script&gt;alert(&quot;x&quot; &amp; "),
        "{out}"
    );
    assert_body(
        &eval(&s, &b, "kvdb.say(kvdb.escape_html('plain'))"),
        "plain\n",
    );
}

#[test]
fn os_date_time_and_clock_work() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(os.time())
kvdb.say(os.date("!%Y-%m-%d %H:%M:%S", 0))
kvdb.say(os.date("*t").year >= 2024)
kvdb.say(math.type(os.time{year=2000, month=1, day=1, hour=12}))
local c = os.clock()
kvdb.say(type(c), " ", c >= 0)"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    let t: u64 = lines[0].parse().expect("os.time() is an integer");
    assert!(t.abs_diff(now()) < 60, "os.time() {t}");
    assert_eq!(
        &lines[1..],
        ["1970-01-01 00:00:00", "true", "integer", "number true"]
    );
}

// ---------------------------------------------------------------------------
// The request

/// A link checker's `HEAD` must not run a script (and its writes) for an
/// answer without a body.
#[test]
fn head_does_not_run_a_script() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "count",
        r#"kvdb.incr("runs", 1) kvdb.say(kvdb.get("runs"))"#,
    );
    let r = s.request("HEAD", &format!("/{b}/scripts/count"), &[], None);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET,POST,PUT,DELETE"));
    // Another method the route lacks names the same methods: not HEAD,
    // which axum lists with every GET route.
    let r = s.request(
        "PATCH",
        &format!("/{b}/scripts/count"),
        &[("authorization", &crate::harness::basic_auth(SK, ""))],
        Some(b"x"),
    );
    r.assert_problem(405);
    assert_eq!(r.header("allow").as_deref(), Some("GET,POST,PUT,DELETE"));
    assert!(
        r.text().contains("a script runs on GET and POST"),
        "{}",
        r.text()
    );
    // A DELETE or PUT without the secret key (a client that meant to run
    // the script with it) is told what those do here.
    for method in ["DELETE", "PUT"] {
        let r = s.request(method, &format!("/{b}/scripts/count"), &[], Some(b"x"));
        r.assert_problem(401);
        assert!(
            r.text()
                .contains("PUT and DELETE on a script's URL upload and delete the script itself"),
            "{method}: {}",
            r.text()
        );
    }
    assert_body(&run(&s, &b, "count"), "1\n");
    assert_eq!(
        s.request("HEAD", &format!("/{b}/scripts/count"), &[], None)
            .status,
        405
    );
    assert_body(&run(&s, &b, "count"), "2\n");
}

#[test]
fn method_path_headers_and_body_reach_the_script() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "req",
        r#"kvdb.say(kvdb.method)
kvdb.say(kvdb.path)
kvdb.say(tostring(kvdb.headers["x-custom-thing"]))
kvdb.say(tostring(kvdb.headers["X-Custom-Thing"]))
kvdb.say(tostring(kvdb.headers["authorization"]))
kvdb.say(#kvdb.body, ":", kvdb.body)"#,
    );
    let r = s.request(
        "POST",
        &format!("/{b}/scripts/req?q=1"),
        &[
            ("X-Custom-Thing", "Yes"),
            ("authorization", "Bearer sk"),
            ("content-type", "application/octet-stream"),
        ],
        Some(b"raw \x01 body"),
    );
    assert_body(
        &r,
        &format!("POST\n/{b}/scripts/req\nYes\nnil\nnil\n10:raw \x01 body\n"),
    );
    let r = run(&s, &b, "req");
    assert_body(&r, &format!("GET\n/{b}/scripts/req\nnil\nnil\nnil\n0:\n"));
}

#[test]
fn credentials_in_the_query_do_not_reach_the_script_either() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk");
    let t = s.token(&b, SK, "permissions=read");
    install(
        &s,
        &b,
        "vars",
        r#"kvdb.say(tostring(kvdb.var.key), " ", tostring(kvdb.var.access_token), " ", tostring(kvdb.var.q))
kvdb.say(tostring(kvdb.get("k")))"#,
    );
    let r = s.request(
        "PUT",
        &format!("/{b}/k"),
        &[("authorization", "Bearer sk")],
        Some(b"v"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    // The credential still counts: the run can read with it.
    let r = run(&s, &b, "vars?key=rk&q=1");
    assert_body(&r, "nil nil 1\nv\n");
    let r = run(&s, &b, &format!("vars?access_token={t}&q=2"));
    assert_body(&r, "nil nil 2\nv\n");
    let r = run(&s, &b, "vars?q=3");
    assert_body(&r, "nil nil 3\nnil\n");
}

#[test]
fn request_tables_are_the_same_table_all_run_and_fresh_the_next_run() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "req",
        r#"kvdb.say(tostring(kvdb.var == kvdb.var), " ", tostring(kvdb.headers == kvdb.headers))
kvdb.say(tostring(kvdb.var.mine), " ", tostring(kvdb.headers["x-mine"]))
kvdb.var.mine = "set by the run"
kvdb.headers["x-mine"] = "also"
kvdb.say(kvdb.var.mine, " ", kvdb.headers["x-mine"], " ", kvdb.headers["x-twice"])
kvdb.method = "replaced"
kvdb.say(kvdb.method)"#,
    );
    // A repeated header arrives joined with ", ".
    let r = s.request(
        "GET",
        &format!("/{b}/scripts/req"),
        &[("x-twice", "one"), ("x-twice", "two")],
        None,
    );
    assert_body(
        &r,
        "true true
nil nil
set by the run also one, two
replaced
",
    );
    // Nothing of it is left for the next run.
    let r = run(&s, &b, "req");
    assert_body(
        &r,
        "true true
nil nil
set by the run also nil
replaced
",
    );
}

const VARS: &str = r#"for _, k in ipairs({"a", "b", "c", "n", "remote_addr"}) do
  kvdb.say(k, "=", tostring(kvdb.var[k]))
end"#;

#[test]
fn var_merges_query_and_form_body_with_the_body_winning() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "vars", VARS);
    let r = s.post(
        &format!("/{b}/scripts/vars?a=query&b=query"),
        "b=body&c=form+field%21",
    );
    assert_body(
        &r,
        "a=query\nb=body\nc=form field!\nn=nil\nremote_addr=127.0.0.1\n",
    );
    let r = run(&s, &b, "vars?a=x%20y&c=3");
    assert_body(&r, "a=x y\nb=nil\nc=3\nn=nil\nremote_addr=127.0.0.1\n");
}

#[test]
fn var_takes_fields_of_a_json_object_body() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(&s, &b, "vars", VARS);
    let r = s.request(
        "POST",
        &format!("/{b}/scripts/vars?a=query&b=query"),
        &[("content-type", "application/json")],
        Some(br#"{"b": "json", "c": "x", "n": 5}"#),
    );
    assert_body(&r, "a=query\nb=json\nc=x\nn=5\nremote_addr=127.0.0.1\n");
}

// ---------------------------------------------------------------------------
// Data

#[test]
fn get_returns_typed_values_and_nil_not_found_for_a_missing_key() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for (k, v, ct) in [
        ("int", "42", None),
        ("neg", "-7", None),
        ("float", "2.5", None),
        ("json", r#"{"a":[1,2],"s":"t"}"#, Some("application/json")),
        ("str", "hello world", None),
    ] {
        assert_eq!(put_as(&s, &format!("/{b}/{k}"), v, ct).status, 204);
    }
    let r = eval(
        &s,
        &b,
        r#"local i = kvdb.get("int") kvdb.say(math.type(i), " ", i + 1)
local n = kvdb.get("neg") kvdb.say(math.type(n), " ", n)
local f = kvdb.get("float") kvdb.say(math.type(f), " ", f * 2)
local j = kvdb.get("json") kvdb.say(type(j), " ", j.a[2], " ", j.s)
local s = kvdb.get("str") kvdb.say(type(s), " ", s)
local m, err = kvdb.get("missing") kvdb.say(tostring(m), " ", err)
local e, err2 = kvdb.get("") kvdb.say(tostring(e), " ", type(err2))"#,
    );
    assert_body(
        &r,
        "integer 43\ninteger -7\nfloat 5.0\ntable 2 t\nstring hello world\nnil not found\nnil string\n",
    );
}

#[test]
fn set_stores_typed_values_that_read_back_over_http() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    // The same text written over HTTP, for the raw value's content type.
    assert_eq!(s.put(&format!("/{b}/ref"), "plain text").status, 204);
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.set("i", 7)))
kvdb.say(tostring(kvdb.set("f", 1.5)))
kvdb.say(tostring(kvdb.set("t", {x = 1, list = {1, 2, 3}})))
kvdb.say(tostring(kvdb.set("s", "plain text")))
kvdb.say(type(kvdb.set("bad", nil)))
kvdb.say(type(kvdb.set("fn", print)))"#,
    );
    assert_body(&r, "nil\nnil\nnil\nnil\nstring\nstring\n");
    let i = s.get(&format!("/{b}/i"));
    assert_eq!((i.status, i.text().as_str()), (200, "7"));
    assert_eq!(i.header("content-type").as_deref(), Some(TEXT));
    // Stored as an integer: adding to it works.
    assert_eq!(s.patch(&format!("/{b}/i"), "+1").text(), "8");
    let f = s.get(&format!("/{b}/f"));
    assert_eq!((f.status, f.text().as_str()), (200, "1.5"));
    assert_eq!(f.header("content-type").as_deref(), Some(TEXT));
    let t = s.get(&format!("/{b}/t"));
    assert_eq!(t.status, 200);
    assert!(
        t.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    assert_eq!(t.json(), json!({"x": 1, "list": [1, 2, 3]}));
    let text = s.get(&format!("/{b}/s"));
    assert_eq!((text.status, text.text().as_str()), (200, "plain text"));
    assert_eq!(
        text.header("content-type"),
        s.get(&format!("/{b}/ref")).header("content-type")
    );
    s.get(&format!("/{b}/bad")).assert_problem(404);
    s.get(&format!("/{b}/fn")).assert_problem(404);
}

#[test]
fn set_with_a_ttl_expires_and_without_one_stays() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.set("short", "v", 1)))
kvdb.say(tostring(kvdb.set("long", "v")))
kvdb.say(tostring(kvdb.set("zero", "v", 0)))"#,
    );
    assert_body(&r, "nil\nnil\nnil\n");
    assert_eq!(s.get(&format!("/{b}/short")).status, 200);
    std::thread::sleep(Duration::from_millis(2200));
    s.get(&format!("/{b}/short")).assert_problem(404);
    assert_eq!(s.get(&format!("/{b}/long")).status, 200);
    assert_eq!(s.get(&format!("/{b}/zero")).status, 200);
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.exists("short")), " ", tostring(kvdb.exists("long")))"#,
    );
    assert_body(&r, "false true\n");
}

#[test]
fn delete_exists_and_incr_work_on_keys() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    assert_eq!(s.put(&format!("/{b}/gone"), "x").status, 204);
    assert_eq!(s.put(&format!("/{b}/fl"), "1.5").status, 204);
    assert_eq!(s.put(&format!("/{b}/word"), "hello").status, 204);
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.exists("gone")))
kvdb.say(tostring(kvdb.delete("gone")))
kvdb.say(tostring(kvdb.exists("gone")))
kvdb.say(tostring(kvdb.delete("never-was")))
kvdb.say(tostring(kvdb.incr("c", 5)))
kvdb.say(tostring(kvdb.incr("c")))
kvdb.say(tostring(kvdb.incr("c", -2)))
kvdb.say(math.type(kvdb.get("c")), " ", kvdb.get("c"))
kvdb.say(tostring(kvdb.incr("fl", 0.25)))
kvdb.say(kvdb.get("fl"))
local err = kvdb.incr("word", 1)
kvdb.say(type(err), " ", kvdb.get("word"))
kvdb.say(type(kvdb.incr("c", "lots")))
kvdb.say(kvdb.incr("c", "99999999999999999999"))
kvdb.say(tostring(kvdb.incr("c", " +2 ")))
kvdb.say("still running")"#,
    );
    assert_body(
        &r,
        "true\nnil\nfalse\nnil\nnil\nnil\nnil\ninteger 4\nnil\n1.75\nstring hello\nstring\ninvalid input: 99999999999999999999 is a whole number outside the 64-bit integer range (-9223372036854775808 to 9223372036854775807): to use it as a float, write it with an exponent (e.g. 1e20)\nnil\nstill running\n",
    );
    s.get(&format!("/{b}/gone")).assert_problem(404);
    assert_eq!(s.get(&format!("/{b}/c")).text(), "6");
    assert_eq!(s.get(&format!("/{b}/fl")).text(), "1.75");
}

/// A merge or patch given as text is refused unread over the value size
/// limit: the document it builds takes up to 16 times the text, outside
/// the script's memory limit (found by a review). The same check serves
/// WebAssembly's `merge` and `patch`.
#[test]
fn a_json_text_argument_over_the_value_size_limit_is_refused_unread() {
    let s = TestServer::start_with(&["--max-value-bytes", "1000"]);
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local big = '{"a":"' .. string.rep('x', 2000) .. '"}'
kvdb.say(kvdb.merge('k', big))
kvdb.say(kvdb.patch('k', big))
kvdb.say(tostring(kvdb.merge('k', '{"b":1}')))"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines[..2] {
        assert!(
            line.contains("the JSON text is 2008 bytes, over the value size limit (1000 bytes)"),
            "{text}"
        );
    }
    assert_eq!(lines[2], "nil");
    assert_eq!(s.get(&format!("/{b}/k?key=sk")).text(), r#"{"b":1}"#);
}

#[test]
fn list_honours_prefix_limit_start_end_reverse_and_values() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for (k, v) in [("a:1", "1"), ("a:2", "two"), ("a:3", "3.5"), ("b:1", "x")] {
        assert_eq!(s.put(&format!("/{b}/{k}"), v).status, 204);
    }
    let r = eval_as(
        &s,
        &b,
        r#"local function show(l, err)
  if not l then return kvdb.say("error ", err) end
  kvdb.say(table.concat(l, ","))
end
show(kvdb.list("a:"))
show(kvdb.list(""))
show(kvdb.list())
show(kvdb.list("a:", {limit = 2}))
show(kvdb.list("a:", {start = "a:1"}))
show(kvdb.list("a:", {["end"] = "a:3"}))
show(kvdb.list("a:", {reverse = true}))
show(kvdb.list("a:", {reverse = true, start = "a:3", limit = 1}))
show(kvdb.list("zzz"))
for _, e in ipairs(kvdb.list("a:", {values = true})) do
  kvdb.say(e.key, "=", tostring(e.value), " ", math.type(e.value) or type(e.value))
end"#,
        SK,
    );
    assert_body(
        &r,
        "a:1,a:2,a:3\na:1,a:2,a:3,b:1\na:1,a:2,a:3,b:1\na:1,a:2\na:2,a:3\na:1,a:2\na:3,a:2,a:1\na:2\n\n\
         a:1=1 integer\na:2=two string\na:3=3.5 float\n",
    );
}

/// The first 1,000 keys of a script's listing are read on its thread, the
/// rest in one more scan: the two parts join without a gap or a repeat,
/// both ways.
#[test]
fn a_long_listing_is_whole_and_in_order_both_ways() {
    let s = TestServer::start_with(&["--durability", "relaxed", "--script-time-ms", "60000"]);
    let b = script_bucket(&s, "");
    let fill = r#"for i = 1, 2500 do kvdb.set(string.format("k:%05d", i), i) end"#;
    assert_body(&eval_as(&s, &b, fill, SK), "");
    let r = eval_as(
        &s,
        &b,
        r#"local function check(l, first, step, n)
  if #l ~= n then return kvdb.say("count ", #l) end
  for i, k in ipairs(l) do
    local want = string.format("k:%05d", first + (i - 1) * step)
    if k ~= want then return kvdb.say(i, " is ", k, " not ", want) end
  end
  kvdb.say("ok")
end
check(kvdb.list("k:"), 1, 1, 2500)
check(kvdb.list("k:", {reverse = true}), 2500, -1, 2500)
check(kvdb.list("k:", {limit = 1500}), 1, 1, 1500)
check(kvdb.list("k:", {start = "k:00010", limit = 1001}), 11, 1, 1001)
check(kvdb.list("k:", {reverse = true, start = "k:02000"}), 1999, -1, 1999)
local l = kvdb.list("k:", {values = true})
kvdb.say(#l, " ", l[1001].key, "=", l[1001].value)"#,
        SK,
    );
    assert_body(&r, "ok\nok\nok\nok\nok\n2500 k:01001=1001\n");
}

#[test]
fn merge_patch_and_append_change_values_atomically() {
    let (s, b) = with_json_doc(r#"{"a":1,"b":{"c":2}}"#);
    assert_eq!(s.put(&format!("/{b}/r"), "ab").status, 204);
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.merge("j", {b = {d = 3}, z = "new"})))
kvdb.say(tostring(kvdb.patch("j", {{op = "replace", path = "/a", value = 10}})))
kvdb.say(type(kvdb.patch("j", {{op = "test", path = "/a", value = 11}})))
kvdb.say(type(kvdb.merge("r", {x = 1})))
kvdb.say(tostring(kvdb.append("r", "cd")))
kvdb.say(type(kvdb.append("j", "x")))
local j = kvdb.get("j")
kvdb.say(j.a, " ", j.b.c, " ", j.b.d, " ", j.z)"#,
    );
    assert_body(&r, "nil\nnil\nstring\nstring\nnil\nstring\n10 2 3 new\n");
    assert_eq!(
        s.get(&format!("/{b}/j")).json(),
        json!({"a": 10, "b": {"c": 2, "d": 3}, "z": "new"})
    );
    assert_eq!(s.get(&format!("/{b}/r")).text(), "abcd");
}

/// Found by a review: a string of JSON text given to `kvdb.merge` replaced
/// the document with that string (RFC 7396 for a non-object patch); the
/// WebAssembly call parses it. Both now take it as JSON text, as HTTP does.
#[test]
fn merge_and_patch_take_json_text_as_well_as_tables() {
    let (s, b) = with_json_doc(r#"{"a":1}"#);
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.merge("j", '{"b":2}')))
kvdb.say(tostring(kvdb.patch("j", '[{"op":"replace","path":"/a","value":10}]')))
kvdb.say(kvdb.merge("j", '{"b":'))"#,
    );
    assert_body(
        &r,
        "nil\nnil\ninvalid input: not JSON: EOF while parsing a value at line 1 column 5\n",
    );
    assert_eq!(s.get(&format!("/{b}/j")).json(), json!({"a": 10, "b": 2}));
}

/// A bad ttl, limit or permission list is the call's error, returned as
/// every failed data call's is (found by a review: it raised, ending the
/// run unless in `pcall`).
#[test]
fn bad_arguments_to_data_calls_are_returned_errors_not_raised() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.say(kvdb.set("k", 1, -1))
kvdb.say(kvdb.set("k", 1, 1.5))
kvdb.say(kvdb.set("k", 1, 1e30))
kvdb.say(kvdb.set("k", 1, "soon"))
kvdb.say(select(2, kvdb.list("", {limit = -1})))
kvdb.say(select(2, kvdb.access_token{ttl = -1}))
kvdb.say(select(2, kvdb.access_token{permissions = true}))
kvdb.say(select(2, kvdb.access_token{permissions = {{}}}))
kvdb.say(select(2, kvdb.access_token{prefix = "p\255"}))
kvdb.say(select(2, kvdb.access_token{ttl = 0}))
kvdb.say(select(2, kvdb.access_token{permissions = {}}))
kvdb.say(select(2, kvdb.access_token{permissions = ","}))
kvdb.say(tostring(kvdb.set("k", 1, 60.0)), " ", #kvdb.list("", {limit = 1.0}))
kvdb.say(tostring(kvdb.set("k", 1, " 60")), " ", #kvdb.list("", {limit = "1"}))"#,
        SK,
    );
    assert_body(
        &r,
        "invalid input: ttl must be a whole number, 0 or more\n\
         invalid input: ttl must be a whole number, 0 or more\n\
         invalid input: ttl must be a whole number, 0 or more\n\
         invalid input: ttl must be a whole number, 0 or more\n\
         invalid input: limit must be a whole number, 0 or more\n\
         invalid input: ttl must be a whole number, 0 or more\n\
         invalid input: permissions must be a list of names\n\
         invalid input: permissions must be a list of names\n\
         invalid input: a token's prefix must be UTF-8 text\n\
         invalid input: a token's ttl is a whole number of seconds from 1 to 3153600000 (100 years), not 0\n\
         invalid input: a token's permissions must name at least one of read, write, delete, enumerate\n\
         invalid input: a token's permissions must name at least one of read, write, delete, enumerate\n\
         nil 1\n\
         nil 1\n",
    );
}

/// A table nested deeper than JSON that can be read back is refused (it
/// would be stored, then refused by every JSON reader: found by a review).
#[test]
fn a_table_nested_deeper_than_127_levels_is_refused() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval_as(
        &s,
        &b,
        r#"local function nest(n) local t = {} for _ = 2, n do t = {t} end return t end
kvdb.say(tostring(kvdb.set("ok", nest(127))))
kvdb.say(kvdb.set("deep", nest(128)))
kvdb.say(kvdb.merge("ok", '{"a":' .. string.rep("[", 127) .. string.rep("]", 127) .. "}"))"#,
        SK,
    );
    assert_body(
        &r,
        "nil\ninvalid input: the table is not JSON: it nests deeper than 127 levels\n\
         invalid input: not JSON: recursion limit exceeded at line 1 column 132\n",
    );
    assert_eq!(s.get(&format!("/{b}/ok")).status, 200);
    assert_eq!(s.get(&format!("/{b}/deep")).status, 404);
}

/// The same words as the WebAssembly calls for a number that is not one.
#[test]
fn a_non_finite_number_is_refused_with_the_same_words_as_in_webassembly() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(kvdb.set("n", 0/0))
kvdb.say(kvdb.set("n", 1/0))
kvdb.say(kvdb.incr("n", -1/0))"#,
    );
    assert_body(
        &r,
        "invalid input: a float must be finite\ninvalid input: a float must be finite\n\
         invalid input: the amount must be finite\n",
    );
    assert_eq!(s.get(&format!("/{b}/n")).status, 404);
}

/// A table that is not a plain sequence keeps everything it holds, the
/// same in `json.encode` and in what `kvdb.set` and `kvdb.merge` store:
/// holes are `null`, and a table with other keys is an object whose number
/// keys are strings (Lua's length operator had `{"first", name = "bob"}`
/// stored as `["first"]`, and `set` refused what `json.encode` wrote).
#[test]
fn tables_with_holes_or_mixed_keys_keep_every_entry() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local sparse = {} sparse[1] = "a" sparse[3] = "c"
local mixed = {"first", name = "bob"}
local far = {[10] = 1, [1] = 2}
kvdb.say(kvdb.json.encode(sparse), " ", kvdb.json.encode(mixed), " ", kvdb.json.encode(far))
kvdb.say(kvdb.json.encode({[2] = "b"}), " ", kvdb.json.encode({}), " ", kvdb.json.encode({1, 2}))
kvdb.say(tostring(kvdb.set("sparse", sparse)), " ", tostring(kvdb.set("mixed", mixed)))
kvdb.say(tostring(kvdb.set("two", {[2] = "b"})))
kvdb.say(tostring(kvdb.merge("doc", {tags = {"x", extra = true}})))
kvdb.say(tostring(pcall(kvdb.json.encode, {0/0})))
kvdb.say(tostring(kvdb.set("nan", {n = 0/0})))
kvdb.say(tostring(pcall(kvdb.json.encode, {[true] = 1})))
kvdb.say(tostring(pcall(kvdb.json.encode, "\255")))"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..5],
        [
            r#"["a",null,"c"] {"1":"first","name":"bob"} {"1":2,"10":1}"#,
            r#"[null,"b"] {} [1,2]"#,
            "nil nil",
            "nil",
            "nil",
        ],
        "{text}"
    );
    assert_eq!(lines[5], "false", "{text}");
    assert!(lines[6].contains("finite"), "{text}");
    assert_eq!(lines[7..], ["false", "false"], "{text}");
    let get = |k: &str| s.get(&format!("/{b}/{k}")).json();
    assert_eq!(get("sparse"), json!(["a", null, "c"]));
    assert_eq!(get("mixed"), json!({"1": "first", "name": "bob"}));
    assert_eq!(get("two"), json!([null, "b"]));
    assert_eq!(get("doc"), json!({"tags": {"1": "x", "extra": true}}));
    s.get(&format!("/{b}/nan")).assert_problem(404);

    // A decoded array keeps what is added besides its elements; an empty
    // one stays an array. Nesting past 127 is refused (json.decode would
    // refuse the text).
    let r = eval(
        &s,
        &b,
        r#"local t = kvdb.json.decode("[1]") t.name = "x"
kvdb.say(kvdb.json.encode(t), " ", kvdb.json.encode(kvdb.json.decode("[]")))
local deep = {} local at = deep for i = 1, 127 do at[1] = {} at = at[1] end
kvdb.say(tostring(pcall(kvdb.json.encode, deep)))
local ok = {} at = ok for i = 1, 126 do at[1] = {} at = at[1] end
kvdb.say(#kvdb.json.encode(ok))"#,
    );
    assert_body(&r, "{\"1\":1,\"name\":\"x\"} []\nfalse\n254\n");
}

/// A table of more entries than mlua has references for (a million) is
/// stored: it is written as it is walked, holding one entry at a time (all
/// of its entries held at once, it failed with an error about Lua's stack).
#[test]
fn a_table_of_a_million_entries_is_stored() {
    // The debug build's Lua takes a few seconds for it.
    let s = TestServer::start_with(&["--script-time-ms", "60000"]);
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local many = {} for i = 1, 1040000 do many[i] = "a" end
kvdb.say(tostring(kvdb.set("many", many)))"#,
    );
    assert_body(&r, "nil\n");
    let many = s.get(&format!("/{b}/many")).json();
    assert_eq!(many.as_array().map(Vec::len), Some(1_040_000));
}

/// A key that is not UTF-8 (or not a string at all) is the call's error,
/// returned like any other bad key; it ended the run.
#[test]
fn a_key_that_is_not_utf8_text_is_the_calls_error() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(select(2, kvdb.get("\255")))
kvdb.say(kvdb.set("\255", "v"))
kvdb.say(kvdb.set({}, "v"))
kvdb.say(kvdb.delete(true))
kvdb.say(kvdb.incr("\255", 1), " ", kvdb.append("\255", "x"), " ", kvdb.merge("\255", {}))
kvdb.say(select(2, kvdb.exists(nil)))
kvdb.say(tostring(kvdb.set(42, "v")), " ", kvdb.get(42))
kvdb.say("completed")"#,
    );
    assert_body(
        &r,
        "invalid input: a key must be UTF-8 text\n\
         invalid input: a key must be UTF-8 text\n\
         invalid input: a key must be a string, not table\n\
         invalid input: a key must be a string, not boolean\n\
         invalid input: a key must be UTF-8 text invalid input: a key must be UTF-8 text invalid input: a key must be UTF-8 text\n\
         invalid input: a key must be a string, not nil\n\
         nil v\n\
         completed\n",
    );
}

/// A script that raises a table (or a boolean, nil…) is answered with a
/// message that says so, at its line, not with the table's address.
#[test]
fn an_error_raised_with_a_table_is_answered_with_a_message() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for (raised, kind) in [("{}", "table"), ("true", "boolean"), ("nil", "nil")] {
        let r = eval(&s, &b, &format!("kvdb.say('x')\nerror({raised})"));
        let detail = assert_problem_type(&r, 500, "script-error");
        assert!(
            detail.contains(&format!(":2: the script raised a {kind} as its error")),
            "{raised}: {detail}"
        );
        assert!(!detail.contains("0x"), "{detail}");
    }
    // With __tostring, its own words.
    let r = eval(
        &s,
        &b,
        "error(setmetatable({}, {__tostring = function() return 'custom words' end}))",
    );
    let detail = assert_problem_type(&r, 500, "script-error");
    assert!(detail.contains("custom words"), "{detail}");
}

/// 204, 205 and 304 answers carry no content: what the script said is
/// dropped, with no Content-Length for it.
#[test]
fn a_no_content_status_sends_no_body() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for code in [204, 205, 304] {
        let r = eval(&s, &b, &format!("kvdb.say('hello') kvdb.status({code})"));
        assert_eq!(r.status, code);
        assert_eq!(r.text(), "");
        assert!(
            r.header("content-length").is_none_or(|l| l == "0"),
            "{code}: {:?}",
            r.header("content-length")
        );
    }
}

#[test]
fn json_encode_and_decode_round_trip() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(kvdb.json.encode({a = {1, 2}}))
kvdb.say(kvdb.json.encode("q\"uote"))
local d = kvdb.json.decode('{"x":[1,2,{"y":"z"}],"n":null,"f":1.5}')
kvdb.say(d.x[3].y, " ", #d.x, " ", d.f)
kvdb.say(tostring(pcall(kvdb.json.decode, "{not json")))
kvdb.say(tostring(pcall(kvdb.json.encode, print)))"#,
    );
    assert_body(&r, "{\"a\":[1,2]}\n\"q\\\"uote\"\nz 3 1.5\nfalse\nfalse\n");
}

// ---------------------------------------------------------------------------
// Tokens

#[test]
fn access_token_from_a_script_works_over_http() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    assert_eq!(put_as(&s, &format!("/{b}/p:k"), "v", None).status, 204);
    assert_eq!(put_as(&s, &format!("/{b}/q:k"), "w", None).status, 204);
    let r = eval_as(
        &s,
        &b,
        r#"local t, exp = kvdb.access_token{prefix = "p:", permissions = {"read"}, ttl = 60}
kvdb.say(t)
kvdb.say(exp)"#,
        SK,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let (token, expiry) = text.trim().split_once('\n').expect("two lines");
    let expiry: u64 = expiry.parse().expect("expiry in seconds");
    assert!(expiry.abs_diff(now() + 60) < 30, "expiry {expiry}");
    let r = get_as(&s, &format!("/{b}/p:k"), token);
    assert_eq!((r.status, r.text().as_str()), (200, "v"));
    get_as(&s, &format!("/{b}/q:k"), token).assert_problem(403);
    let auth = format!("Bearer {token}");
    let w = s.request(
        "PUT",
        &format!("/{b}/p:k"),
        &[("authorization", auth.as_str())],
        Some(b"x"),
    );
    w.assert_problem(403);
    // Defaults: read on the whole bucket.
    let r = eval_as(&s, &b, "kvdb.print((kvdb.access_token()))", SK);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get_as(&s, &format!("/{b}/q:k"), &r.text()).text(), "w");
    // Permissions as a string are read as over HTTP (a trailing comma
    // was an unknown permission "" in Lua only).
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.print((kvdb.access_token{prefix = "p:", permissions = "read, write,"}))"#,
        SK,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let auth = format!("Bearer {}", r.text());
    let w = s.request(
        "PUT",
        &format!("/{b}/p:k"),
        &[("authorization", auth.as_str())],
        Some(b"x"),
    );
    assert_eq!(w.status, 204, "{}", w.text());
}

#[test]
fn access_token_wider_than_the_scope_is_refused_with_an_error_string() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    let t = s.token(&b, SK, "prefix=p:&permissions=read");
    let source = r#"local function try(opts)
  local tok, err = kvdb.access_token(opts)
  if tok then kvdb.say("token") else kvdb.say("refused: ", err) end
end
try{prefix = "", permissions = {"read"}}
try{prefix = "p:", permissions = {"write"}}
try{prefix = "p:", permissions = {"read", "write"}}
try{prefix = "p:x", permissions = {"read"}}
kvdb.say("done")"#;
    let r = eval_as(&s, &b, source, &t);
    assert_eq!(r.status, 200, "{}", r.text());
    let lines: Vec<String> = r.text().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    for refused in &lines[..3] {
        assert!(
            refused.starts_with("refused: permission denied"),
            "{lines:?}"
        );
    }
    assert_eq!(lines[3..], ["token", "done"]);

    // The read key can't hand out writing; the script's own narrowing counts.
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.say(select(2, kvdb.access_token{permissions = {"write"}}))
kvdb.scope.prefix = "users:1:"
kvdb.say(select(2, kvdb.access_token{prefix = "", permissions = {"read"}}))
kvdb.say((kvdb.access_token{prefix = "users:1:a", permissions = {"read"}}) ~= nil)
kvdb.say(select(2, kvdb.access_token{permissions = {"admin"}}))"#,
        "rk",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("permission denied"), "{lines:?}");
    assert!(lines[1].starts_with("permission denied"), "{lines:?}");
    assert_eq!(lines[2], "true");
    assert!(lines[3].starts_with("invalid input"), "{lines:?}");
}

/// A caller may hand on permissions that come from different grants of its
/// scope in one token: read the bucket leaves open, enumerate its token
/// adds (each could be handed on alone, not both together).
#[test]
fn a_token_handed_on_may_combine_what_the_bucket_and_the_caller_grant() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[("authorization", "Bearer sk")],
        Some(b"prefix=todo:&permissions=enumerate"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let caller = r.json()["access_token"].as_str().expect("token").to_owned();
    let r = eval_as(
        &s,
        &b,
        r#"local t, err = kvdb.access_token{prefix = "todo:items:", permissions = {"read", "enumerate"}}
kvdb.say(t ~= nil, " ", type(err))
kvdb.say(select(2, kvdb.access_token{prefix = "", permissions = {"read", "enumerate"}}))"#,
        &caller,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "true number", "{lines:?}");
    assert!(lines[1].starts_with("permission denied"), "{lines:?}");
}

#[test]
fn a_token_handed_on_expires_no_later_than_the_callers() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[("authorization", "Bearer sk")],
        Some(b"prefix=p:&permissions=read&ttl=60"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let caller = r.json();
    let (t, caller_expiry) = (
        caller["access_token"].as_str().expect("token").to_owned(),
        caller["expires_at"].as_u64().expect("expiry"),
    );
    let source = r#"local year = 365 * 24 * 3600
kvdb.say(select(2, kvdb.access_token{prefix = "p:", permissions = {"read"}, ttl = year}))
kvdb.say(select(2, kvdb.access_token{prefix = "p:", permissions = {"read"}, ttl = 5}))
kvdb.scope.prefix = "p:q"
kvdb.say(select(2, kvdb.access_token{prefix = "p:q", permissions = {"read"}, ttl = year}))"#;
    let r = eval_as(&s, &b, source, &t);
    assert_eq!(r.status, 200, "{}", r.text());
    let expiries: Vec<u64> = r
        .text()
        .lines()
        .map(|l| l.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    // A year was asked for: the caller's token ends in a minute, and so do
    // the tokens handed on, also after the script narrowed its scope.
    assert_eq!(
        [expiries[0], expiries[2]],
        [caller_expiry, caller_expiry],
        "{expiries:?}"
    );
    // Shorter is shorter.
    assert!(expiries[1] < caller_expiry, "{expiries:?}");
    // The secret key's scope does not end: a year is a year.
    let r = eval_as(&s, &b, source, SK);
    let first: u64 = r
        .text()
        .lines()
        .next()
        .expect("a line")
        .parse()
        .expect("expiry");
    assert!(first > now() + 364 * 24 * 3600, "{first}");
}

// ---------------------------------------------------------------------------
// The authorization context of a run

const WHOAMI: &str = r#"local perms = table.concat(kvdb.scope.permissions, ",")
kvdb.say("prefix=", kvdb.scope.prefix, " perms=", perms)
local v, gerr = kvdb.get("p:k")
kvdb.say("get=", tostring(v))
local q = kvdb.get("q:k")
kvdb.say("get q=", tostring(q))
kvdb.say("set=", tostring(kvdb.set("p:new", "x") == nil))
kvdb.say("delete=", tostring(kvdb.delete("p:del") == nil))
local l = kvdb.list("")
kvdb.say("list=", l and table.concat(l, ",") or "refused")
kvdb.say("end")"#;

/// What `WHOAMI` (and the WASM probe's `do=whoami`) answers for each caller of a
/// bucket created with `read_key=rk&write_key=wk` holding `p:k` and `q:k`: one
/// table for both runtimes.
pub fn whoami_cases(s: &TestServer, b: &str) -> Vec<(Option<String>, &'static str)> {
    vec![
        (
            None,
            "prefix= perms=\nget=nil\nget q=nil\nset=false\ndelete=false\nlist=refused\nend\n",
        ),
        (
            Some("rk".into()),
            "prefix= perms=read\nget=p:k\nget q=q:k\nset=false\ndelete=false\nlist=refused\nend\n",
        ),
        (
            Some("wk".into()),
            "prefix= perms=read,write,delete\nget=p:k\nget q=q:k\nset=true\ndelete=true\nlist=refused\nend\n",
        ),
        (
            Some(SK.into()),
            "prefix= perms=read,write,delete,enumerate\nget=p:k\nget q=q:k\nset=true\ndelete=true\nlist=p:k,p:new,q:k\nend\n",
        ),
        (
            Some(s.token(b, SK, "prefix=p:&permissions=read,enumerate")),
            "prefix=p: perms=read,enumerate\nget=p:k\nget q=nil\nset=false\ndelete=false\nlist=p:k,p:new\nend\n",
        ),
    ]
}

#[test]
fn a_run_gets_exactly_the_callers_scope() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    for k in ["p:k", "q:k"] {
        assert_eq!(put_as(&s, &format!("/{b}/{k}"), k, None).status, 204);
    }
    install(&s, &b, "whoami", WHOAMI);
    let cases = whoami_cases(&s, &b);
    for (credential, expected) in cases {
        let r = match &credential {
            None => run(&s, &b, "whoami"),
            Some(c) => run_as(&s, &b, "whoami", c),
        };
        assert_eq!(r.status, 200, "{credential:?}: {}", r.text());
        assert_eq!(r.text(), expected, "{credential:?}");
    }
}

#[test]
fn an_anonymous_run_gets_the_buckets_open_permissions() {
    let s = TestServer::start();
    // Reading and writing open, listing needs the secret key.
    let b = script_bucket(&s, "");
    assert_eq!(put_as(&s, &format!("/{b}/p:k"), "v", None).status, 204);
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(table.concat(kvdb.scope.permissions, ","))
kvdb.say(kvdb.get("p:k"))
kvdb.say(tostring(kvdb.set("anon", 1)))
kvdb.say(type(select(2, kvdb.list(""))))"#,
    );
    assert_body(&r, "read,write,delete\nv\nnil\nstring\n");
    assert_eq!(s.get(&format!("/{b}/anon")).text(), "1");
}

#[test]
fn the_scope_a_script_reads_holds_on_its_whole_prefix_and_assigning_the_prefix_never_widens_it() {
    // Reading open to all, writing only with a key; the caller's token may
    // write under users:1: alone. The run's scope has two grants: the
    // script sees the permissions that hold on every key (read), not the
    // union, so moving the prefix to another user's keys can't write there.
    let s = TestServer::start();
    let b = script_bucket(&s, "write_key=wk");
    let t = s.token(&b, SK, "prefix=users:1:&permissions=write");
    let name = "narrow";
    install(
        &s,
        &b,
        name,
        r#"kvdb.say("before: [", kvdb.scope.prefix, "] ", table.concat(kvdb.scope.permissions, ","))
kvdb.say("own: ", tostring(kvdb.set("users:1:x", "mine")))
kvdb.scope.prefix = "users:" .. kvdb.var.uid .. ":"
kvdb.say("after: [", kvdb.scope.prefix, "] ", table.concat(kvdb.scope.permissions, ","))
kvdb.say("other: ", type(kvdb.set("users:2:x", "pwned")))"#,
    );
    let auth = format!("Bearer {t}");
    let r = s.request(
        "GET",
        &format!("/{b}/scripts/{name}?uid=2"),
        &[("authorization", auth.as_str())],
        None,
    );
    assert_body(
        &r,
        "before: [] read\nown: nil\nafter: [users:2:] read\nother: string\n",
    );
    assert_eq!(s.get(&format!("/{b}/users:1:x")).text(), "mine");
    s.get(&format!("/{b}/users:2:x")).assert_problem(404);
}

#[test]
fn atomic_operations_need_write_and_a_json_patch_needs_read_too() {
    // Reading closed, writing open: an anonymous run may count and merge
    // without reading, but a JSON patch reads the value (a `test`, or a
    // path that may be missing), so it is refused and changes nothing.
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk");
    assert_eq!(
        put_as(
            &s,
            &format!("/{b}/doc"),
            r#"{"a":1}"#,
            Some("application/json")
        )
        .status,
        204
    );
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(kvdb.incr("n", 2)))
kvdb.say(type(select(2, kvdb.get("n"))))
kvdb.say(tostring(kvdb.merge("doc", {b = 2})))
kvdb.say(kvdb.patch("doc", {{op = "add", path = "/c", value = 3}}))
kvdb.say(kvdb.patch("doc", {{op = "test", path = "/a", value = 1}}))"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["nil", "string", "nil"], "{text}");
    for line in &lines[3..] {
        assert!(
            line.starts_with("permission denied: a JSON patch")
                && line.contains("needs read as well as write"),
            "{text}"
        );
    }
    assert_eq!(get_as(&s, &format!("/{b}/n"), "rk").text(), "2");
    assert_eq!(
        get_as(&s, &format!("/{b}/doc"), "rk").json(),
        json!({"a": 1, "b": 2})
    );
}

#[test]
fn scope_prefix_narrows_writes_and_the_script_completes() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.scope.prefix = "users:1:"
kvdb.say(kvdb.scope.prefix)
kvdb.say(tostring(kvdb.set("users:1:name", "alice")))
local err = kvdb.set("users:2:name", "bob")
kvdb.say(err)
local v, gerr = kvdb.get("users:2:other")
kvdb.say(tostring(v), " ", gerr)
kvdb.say(kvdb.get("users:1:name"))
kvdb.say("completed")"#,
        SK,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "users:1:");
    assert_eq!(lines[1], "nil");
    assert!(lines[2].starts_with("permission denied"), "{lines:?}");
    // The refusal names the scope the script set, not the caller's key.
    assert!(
        lines[2].ends_with(
            r#"is not allowed in the scope the script set, which grants read, write, delete, enumerate on keys starting with "users:1:""#
        ),
        "{lines:?}"
    );
    assert!(lines[3].starts_with("nil permission denied"), "{lines:?}");
    assert_eq!(lines[4..], ["alice", "completed"]);
    assert_eq!(s.get(&format!("/{b}/users:1:name")).text(), "alice");
    s.get(&format!("/{b}/users:2:name")).assert_problem(404);
}

#[test]
fn scope_permissions_narrow_what_the_run_may_do() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    assert_eq!(put_as(&s, &format!("/{b}/k"), "v", None).status, 204);
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.scope.permissions = {"read"}
kvdb.say(table.concat(kvdb.scope.permissions, ","), " ", kvdb.scope.prefix)
kvdb.say(kvdb.get("k"))
kvdb.say(type(kvdb.set("k", "changed")))
kvdb.say(type(kvdb.delete("k")))
kvdb.say(type(select(2, kvdb.list(""))))
kvdb.scope.permissions = "write, delete"
kvdb.say(table.concat(kvdb.scope.permissions, ","))
kvdb.say(type(select(2, kvdb.get("k"))))
kvdb.say(tostring(pcall(function() kvdb.scope.permissions = {"admin"} end)))
kvdb.say(tostring(pcall(function() kvdb.scope.other = 1 end)))
kvdb.say(tostring(pcall(function() kvdb.scope.prefix = 5 end)))"#,
        SK,
    );
    assert_body(
        &r,
        "read \nv\nstring\nstring\nstring\nwrite,delete\nstring\nfalse\nfalse\nfalse\n",
    );
    assert_eq!(s.get(&format!("/{b}/k")).text(), "v");
}

/// `kvdb.scope = {prefix = ..., permissions = {...}}` sets the scope, as
/// setting its fields one by one does (it replaced the table and left the
/// scope as it was: the write outside the prefix went through).
#[test]
fn assigning_a_table_to_kvdb_scope_sets_the_scope() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.scope = {prefix = "users:1:", permissions = {"write"}}
kvdb.say(kvdb.scope.prefix, " ", table.concat(kvdb.scope.permissions, ","))
kvdb.say(tostring(kvdb.set("users:1:name", "ann")))
kvdb.say(type(kvdb.set("users:2:name", "kim")))
kvdb.say(type(select(2, kvdb.get("users:1:name"))))
kvdb.scope = {permissions = "read, write"}
kvdb.say(kvdb.scope.prefix, " ", table.concat(kvdb.scope.permissions, ","))
kvdb.scope = kvdb.scope
kvdb.say(kvdb.scope.prefix, " ", table.concat(kvdb.scope.permissions, ","))
kvdb.say(tostring(pcall(function() kvdb.scope = "users:3:" end)))
kvdb.say(tostring(pcall(function() kvdb.scope = {prefix = "x", other = 1} end)))
kvdb.say(tostring(pcall(function() kvdb.scope = {} end)))
kvdb.say(kvdb.scope.prefix)
kvdb.mine = 5
kvdb.say(kvdb.mine)"#,
        SK,
    );
    assert_body(
        &r,
        "users:1: write\nnil\nstring\nstring\nusers:1: read,write\nusers:1: read,write\nfalse\nfalse\nfalse\nusers:1:\n5\n",
    );
    assert_eq!(s.get(&format!("/{b}/users:1:name")).text(), "ann");
    s.get(&format!("/{b}/users:2:name")).assert_problem(404);
}

#[test]
fn an_anonymous_run_on_a_read_key_bucket_reads_only_once_the_script_widens_its_scope() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk");
    assert_eq!(put_as(&s, &format!("/{b}/k"), "secret", None).status, 204);
    install(
        &s,
        &b,
        "plain",
        r#"local v, err = kvdb.get("k") kvdb.say(tostring(v), " ", tostring(err))"#,
    );
    let r = run(&s, &b, "plain");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().starts_with("nil permission denied"),
        "{}",
        r.text()
    );
    // The same script with the read key reads.
    assert_body(&run_as(&s, &b, "plain", "rk"), "secret nil\n");
    install(
        &s,
        &b,
        "widened",
        r#"kvdb.scope.permissions = {"read"}
local v, err = kvdb.get("k") kvdb.say(tostring(v), " ", tostring(err))"#,
    );
    assert_body(&run(&s, &b, "widened"), "secret nil\n");
    // Over HTTP the key stays closed to anonymous readers.
    s.get(&format!("/{b}/k")).assert_problem(401);
}

#[test]
fn a_form_post_that_is_not_utf8_is_400_and_an_untyped_body_still_runs() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "echo",
        "kvdb.say(kvdb.var.name or '-', ' ', #kvdb.body)",
    );
    let path = format!("/{b}/scripts/echo");
    let form = ("content-type", "application/x-www-form-urlencoded");
    let r = s.request("POST", &path, &[form], Some(b"name=%FF"));
    let detail = r.assert_problem(400);
    assert!(detail.contains(r#"form field "name""#), "{detail}");
    assert_body(
        &s.request("POST", &path, &[form], Some(b"name=Ann")),
        "Ann 8\n",
    );
    // A body without a type may be anything: the script gets it whole.
    assert_body(&s.request("POST", &path, &[], Some(b"\xff\xfe")), "- 2\n");
}

/// A request has at most 1000 query parameters and form fields together:
/// past it, a 400 before anything is decoded (found by a review: one form of
/// 8 million fields took 880 MB). A JSON object or a body without a type
/// that has more is not read as fields: the script still runs and reads it
/// whole.
#[test]
fn a_request_has_at_most_a_thousand_fields() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "count",
        "local n = 0 for k in pairs(kvdb.var) do if k ~= 'remote_addr' then n = n + 1 end end\n\
         kvdb.say(n, ' ', #kvdb.body)",
    );
    let form = |n: usize| {
        (0..n)
            .map(|i| format!("f{i}=v"))
            .collect::<Vec<_>>()
            .join("&")
    };
    let post = |body: &str, ct: Option<&str>| {
        let mut headers = vec![];
        if let Some(ct) = ct {
            headers.push(("content-type", ct));
        }
        s.request(
            "POST",
            &format!("/{b}/scripts/count"),
            &headers,
            Some(body.as_bytes()),
        )
    };
    let urlencoded = Some("application/x-www-form-urlencoded");
    assert_body(
        &post(&form(1000), urlencoded),
        &format!("1000 {}\n", form(1000).len()),
    );
    let r = post(&form(1001), urlencoded);
    r.assert_problem(400);
    assert!(
        r.text().contains("more than 1000 form fields"),
        "{}",
        r.text()
    );
    // With the query: 1000 together.
    let r = s.request(
        "POST",
        &format!("/{b}/scripts/count?q=1"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form(1000).as_bytes()),
    );
    r.assert_problem(400);
    assert!(
        r.text()
            .contains("more than 1000 query parameters and body fields"),
        "{}",
        r.text()
    );
    let object = |n: usize| {
        format!(
            "{{{}}}",
            (0..n)
                .map(|i| format!("\"f{i}\":1"))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    // A JSON object of more fields is not read as fields (read whole).
    let json = object(1001);
    assert_body(
        &post(&json, Some("application/json")),
        &format!("0 {}\n", json.len()),
    );
    let json = object(1000);
    assert_body(
        &post(&json, Some("application/json")),
        &format!("1000 {}\n", json.len()),
    );
    // A body without a type: no form, read whole.
    let raw = form(5000);
    assert_body(&post(&raw, None), &format!("0 {}\n", raw.len()));
    // Any route's query.
    let query = (0..1001)
        .map(|i| format!("p{i}=1"))
        .collect::<Vec<_>>()
        .join("&");
    let r = s.get(&format!("/{b}/?{query}"));
    r.assert_problem(400);
    assert!(
        r.text().contains("more than 1000 query parameters"),
        "{}",
        r.text()
    );
}

/// A table holding a string that is not UTF-8 is not JSON: refused, not
/// stored with the string as an array of bytes.
#[test]
fn a_table_with_bytes_that_are_not_utf8_is_not_json() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.say(kvdb.set("k", {s = "\xff"}))
kvdb.say(kvdb.merge("k", {s = "\xff"}))
kvdb.say(kvdb.json.encode({s = "ok"}))"#,
        SK,
    );
    let body = r.text();
    assert_eq!(r.status, 200, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert!(
        lines[0].starts_with("invalid input: the table is not JSON"),
        "{body}"
    );
    assert!(lines[1].starts_with("invalid input: not JSON"), "{body}");
    assert_eq!(lines[2], r#"{"s":"ok"}"#);
    assert_eq!(s.get(&format!("/{b}/k")).status, 404, "nothing stored");
}

// ----- found by a walk-through of writing Lua scripts ----------------------

/// A merge without its patch is refused: a Lua nil would be JSON `null`,
/// which makes the whole value null (it did, and created a key holding
/// `null` when there was none).
#[test]
fn a_merge_without_a_patch_is_an_error_and_changes_nothing() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.set("doc", {a = 1})
kvdb.say(kvdb.merge("doc", nil))
kvdb.say(kvdb.merge("fresh"))
kvdb.say(kvdb.patch("doc", nil))
kvdb.say(kvdb.merge("doc", kvdb.json.null) == nil)"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    for refused in &lines[..3] {
        assert_eq!(
            *refused, "invalid input: needs a table, or a string of JSON text, not nil",
            "{lines:?}"
        );
    }
    // `kvdb.json.null` says it on purpose: RFC 7396 makes the value null.
    assert_eq!(lines[3], "true");
    assert_eq!(s.get(&format!("/{b}/doc")).text(), "null");
    s.get(&format!("/{b}/fresh")).assert_problem(404);
}

/// `1` and `"1"` are one name in JSON: such a table is refused, not stored
/// with one of its values dropped.
#[test]
fn a_table_with_two_keys_of_one_json_name_is_refused() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local t = {name = "x"}
t[1] = "int-key"
t["1"] = "string-key"
kvdb.say(kvdb.set("dk", t))
kvdb.say(kvdb.set("fk", {["1.5"] = "s", [1.5] = "f"}))
kvdb.say(select(2, pcall(kvdb.json.encode, t)) ~= nil)
kvdb.say(kvdb.set("ok", {[1] = "a", [2] = "b"}))"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains(r#"two keys that are the name "1" in JSON"#),
        "{lines:?}"
    );
    assert!(lines[1].contains(r#"the name "1.5""#), "{lines:?}");
    assert_eq!(lines[2..], ["true", "nil"]);
    s.get(&format!("/{b}/dk")).assert_problem(404);
    s.get(&format!("/{b}/fk")).assert_problem(404);
}

/// A data call given the wrong type of argument returns its error, as
/// README says of every data call, instead of ending the run; unknown
/// option names and mistyped option values are errors, not ignored.
#[test]
fn wrong_arguments_of_data_calls_are_returned_errors() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for key in ["L:1", "L:2", "L:3"] {
        assert_eq!(s.put(&format!("/{b}/{key}"), "v").status, 204);
    }
    let r = eval_as(
        &s,
        &b,
        r#"kvdb.say(kvdb.append("ap"))
kvdb.say(kvdb.append("ap", {}))
kvdb.say(kvdb.append("ap", 42))
kvdb.say(select(2, kvdb.list("L:", "x")))
kvdb.say(select(2, kvdb.list("L:", {limt = 2})))
kvdb.say(select(2, kvdb.list("L:", {reverse = "false"})))
kvdb.say(select(2, kvdb.list("L:", {start = {}})))
kvdb.say(#kvdb.list("L:", {limit = 2, reverse = true, start = "L:3"}))
kvdb.say(select(2, kvdb.access_token("x")))
kvdb.say(select(2, kvdb.access_token{permission = {"write"}}))
kvdb.say(select(2, kvdb.access_token{prefix = 5}))
kvdb.say(#kvdb.list("L:", setmetatable({}, {__index = {limit = 1}})))
kvdb.say(select(2, kvdb.list("L:", {[1] = true})))
kvdb.say(kvdb.set(".", 1))
kvdb.say("still running")"#,
        SK,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "invalid input: append needs a string to add, not nil",
            "invalid input: append needs a string to add, not table",
            "nil",
            "invalid input: list options must be a table, not string",
            r#"invalid input: unknown list option "limt": the options are limit, start, end, reverse and values"#,
            "invalid input: reverse must be true or false, not string",
            "invalid input: start must be a string, not table",
            "2",
            "invalid input: access_token takes a table ({prefix = ..., permissions = {...}, ttl = ...}), not string",
            r#"invalid input: unknown access_token field "permission": the fields are prefix, permissions and ttl"#,
            "invalid input: prefix must be a string, not integer",
            "1",
            "invalid input: unknown list option of type integer: the options are limit, start, end, reverse and values",
            "invalid input: a key can't be `.` or `..`: clients take them as steps in the URL's path (a DELETE of the key `.` is a DELETE of the bucket itself); choose another name",
            "still running",
        ]
    );
    assert_eq!(s.get(&format!("/{b}/ap")).text(), "42");
}

/// JSON helpers: `kvdb.json.null` is what `null` decodes to; a decode error
/// says what is wrong once (it said "serialize error: " once a level).
#[test]
fn json_null_has_a_name_and_decode_errors_are_short() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local t = kvdb.json.decode('{"a":null,"b":[1,null]}')
kvdb.say(t.a == kvdb.json.null, " ", t.b[2] == kvdb.json.null, " ", t.c == kvdb.json.null)
local ok, e = pcall(kvdb.json.decode, ("["):rep(200) .. ("]"):rep(200))
kvdb.say(ok, " ", tostring(e))
ok, e = pcall(kvdb.json.decode, "[1e400]")
kvdb.say(tostring(e))
ok, e = pcall(kvdb.json.decode, "{bad")
kvdb.say("bad: " .. e)
xpcall(kvdb.header, function(m) kvdb.say(type(m), " ", m) end, "x-a", nil)"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "true true false", "{lines:?}");
    assert!(lines[1].starts_with("false "), "{lines:?}");
    assert!(!text.contains("serialize error"), "{text}");
    assert!(lines[1].len() < 300, "{}", lines[1]);
    assert!(lines[1].contains("json.decode: not JSON"), "{lines:?}");
    assert!(
        lines[2].contains("json.decode: not JSON: number out of range"),
        "{lines:?}"
    );
    // What pcall and an xpcall handler get is the message, a string, as
    // for Lua's own errors (it was mlua's error object, with a traceback).
    assert!(
        lines[3].starts_with("bad: ") && lines[3].contains("json.decode: not JSON"),
        "{lines:?}"
    );
    assert!(lines[4].starts_with("string "), "{lines:?}");
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(!text.contains("traceback"), "{text}");
}

/// A source as the `lua` command reads it: a byte order mark and a `#!`
/// first line are skipped, and line numbers still count from the file's
/// first line.
#[test]
fn a_bom_and_a_shebang_line_are_skipped_keeping_line_numbers() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let source = b"\xEF\xBB\xBF#!/usr/bin/env lua\nkvdb.say('ran')\nif kvdb.var.fail then error('boom') end\n";
    let r = upload(&s, &b, "sheb", source);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_body(&run(&s, &b, "sheb"), "ran\n");
    let detail = run(&s, &b, "sheb?fail=1").assert_problem(500);
    assert!(detail.contains("sheb:3: boom"), "{detail}");
}

/// `pairs` over a library table lists its functions, without handing out
/// the table behind the read-only view.
#[test]
fn pairs_lists_a_library_tables_fields() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local n, seen = 0, false
for k, v in pairs(string) do
  n = n + 1
  if k == "format" and v == string.format then seen = true end
end
kvdb.say(n > 10, " ", seen, " ", select(2, pairs(string)) == nil)
kvdb.say(pcall(function() string.x = 1 end))"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "true true true", "{lines:?}");
    assert!(lines[1].starts_with("false"), "{lines:?}");
}

/// A stored negative zero reads back into Lua as negative zero (it came
/// back as 0.0: its text `-0` was read as the integer 0).
#[test]
fn negative_zero_keeps_its_sign() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.set("z", -0.0)
local v = kvdb.get("z")
kvdb.say(math.type(v), " ", 1 / v)"#,
    );
    assert_body(&r, "float -inf\n");
    assert_eq!(s.get(&format!("/{b}/z")).text(), "-0");
}

/// API.md: `kvdb.say` as OpenResty's `ngx.say`: arrays written element by
/// element (nested too), `nil`, booleans and `kvdb.json.null` by name; a
/// table that is no array, or a function, is an error naming the argument
/// (it wrote `table: 0x…`, an address in the server's memory).
#[test]
fn say_writes_arrays_as_ngx_say_does_and_refuses_other_tables() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    assert_body(
        &eval(
            &s,
            &b,
            r#"kvdb.say({"a", "b", {"c", 1}}, {}, nil, true, kvdb.json.null, 1.5)
kvdb.print({"x", {{"y"}}}, "z")
kvdb.say(setmetatable({}, {__tostring = function() return "shown" end}))"#,
        ),
        "abc1niltruenull1.5\nxyzshown\n",
    );
    for (source, names) in [
        (
            r#"kvdb.say("ok", {k = "v"})"#,
            "#2 to 'kvdb.say' (a table that is not an array",
        ),
        (
            "kvdb.print(print)",
            "#1 to 'kvdb.print' (a function is not written",
        ),
        (
            "local t = {} t[1] = t kvdb.say(t)",
            "does a table hold itself?",
        ),
    ] {
        let r = eval(&s, &b, source);
        let detail = assert_problem_type(&r, 500, "script-error");
        assert!(detail.contains(names), "{source}: {detail}");
        assert!(!detail.contains("0x"), "{detail}");
    }
}

/// A `__tostring` that `kvdb.say` calls runs once per element, even when
/// the call goes past the run's slice on its worker: the walk then
/// finishes where it is (it started again elsewhere, and a metamethod's
/// writes happened twice; found by a review).
#[test]
fn say_calls_each_tostring_metamethod_once() {
    let s = TestServer::start_with(&["--backend", "memory"]);
    let b = script_bucket(&s, "");
    let source = r#"local n = 0
local o = setmetatable({}, {__tostring = function()
  n = n + 1
  local x = 0
  for i = 1, 300 do x = x + i end
  kvdb.incr("calls", 1)
  return ""
end})
local t = {}
for i = 1, 400 do t[i] = o end
kvdb.print(t)
kvdb.say("n=", n, " calls=", kvdb.get("calls"))"#;
    assert_body(&eval(&s, &b, source), "n=400 calls=400\n");
}

//! WebAssembly components over HTTP: uploading (what is refused and why),
//! running the example guests, the authorization context of a run (the
//! caller's scope, narrowed or widened by `scope.set`, as in the Lua tests),
//! hostile guests that each end only their own run with their own error,
//! replacing, restarting and deleting.
//!
//! The components are built by `./test.sh` (`cargo build --target
//! wasm32-wasip2 --release`): the example guests of `examples/` and the test
//! guests of `tests/guests/` (`hostile`: misbehaves or probes its scope on
//! request; `otherworld`: a component of another world).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Resp, TestServer, assert_log_escaped_and_bounded, assert_script_busy};
use crate::lua_api::{
    SK, Timed, assert_body, assert_problem_type, get_in_background, get_within, install, raw, run,
    run_as, script_bucket, try_get_within, whoami_cases,
};

const TEXT: &str = "text/plain; charset=utf-8";

/// Generous bound for a limit's error to arrive (the limits are far smaller).
const BOUND: Duration = Duration::from_secs(10);

/// What `do=panic` of the hostile guest panics with
/// (`tests/guests/hostile/src/lib.rs`).
const PANIC_MESSAGE: &str = "hostile guest panics on purpose (4f2a)";

/// The component `name` (a crate name with `_`) built for wasm32-wasip2.
/// Missing is a failure, never a skip: `./test.sh` builds them.
pub fn component(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../target/wasm32-wasip2/release/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{path}: {e}. The WebAssembly guests are built by ./test.sh \
             (cargo build --target wasm32-wasip2 --release -p ...); run it first"
        )
    })
}

pub fn hello() -> Vec<u8> {
    component("kvdb_example_hello")
}

fn hostile() -> Vec<u8> {
    component("kvdb_test_hostile")
}

/// Uploads `bytes` as script `name` with the secret key, declared as
/// `application/wasm` when `content_type` says so.
pub fn upload_bytes(
    s: &TestServer,
    b: &str,
    name: &str,
    bytes: &[u8],
    content_type: Option<&str>,
) -> Resp {
    let mut headers = vec![("authorization", "Bearer sk")];
    if let Some(ct) = content_type {
        headers.push(("content-type", ct));
    }
    s.request(
        "PUT",
        &format!("/{b}/scripts/{name}"),
        &headers,
        Some(bytes),
    )
}

/// Uploads a component as script `name`, asserting success.
#[track_caller]
pub fn install_wasm(s: &TestServer, b: &str, name: &str, bytes: &[u8]) {
    let r = upload_bytes(s, b, name, bytes, Some("application/wasm"));
    assert_eq!(r.status, 200, "upload {name}: {}", r.text());
}

fn as_sk(s: &TestServer, method: &str, path: &str) -> Resp {
    s.request(method, path, &[("authorization", "Bearer sk")], None)
}

fn put_sk(s: &TestServer, b: &str, key: &str, value: &str) {
    let r = s.request(
        "PUT",
        &format!("/{b}/{key}"),
        &[("authorization", "Bearer sk")],
        Some(value.as_bytes()),
    );
    assert_eq!(r.status, 204, "PUT {key}: {}", r.text());
}

/// `POST` of a form to script `name`, with a credential if any.
fn post_form(s: &TestServer, b: &str, name: &str, form: &str, credential: Option<&str>) -> Resp {
    let auth = credential.map(|c| format!("Bearer {c}"));
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    s.request(
        "POST",
        &format!("/{b}/scripts/{name}"),
        &headers,
        Some(form.as_bytes()),
    )
}

fn scripts_of(s: &TestServer, b: &str) -> serde_json::Value {
    let r = as_sk(s, "GET", &format!("/{b}/scripts/"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Today's key of the visitors counter (UTC).
pub fn visitors_key() -> String {
    let secs = crate::lua_api::now();
    let z = i64::try_from(secs / 86_400).expect("days") + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("visitors:{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------------------
// Uploading

#[test]
fn garbage_declared_as_wasm_is_400_saying_it_is_not_webassembly() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = upload_bytes(
        &s,
        &b,
        "g",
        b"kvdb.say('not wasm')",
        Some("application/wasm"),
    );
    let detail = r.assert_problem(400);
    assert!(detail.contains("not WebAssembly"), "{detail}");
    // The magic and no more: too short, not "no magic" (found by a review).
    let detail =
        upload_bytes(&s, &b, "g", b"\0asm\x0d", Some("application/wasm")).assert_problem(400);
    assert!(
        detail.contains("5 bytes, shorter than a WebAssembly header (8)")
            && !detail.contains("does not start with"),
        "{detail}"
    );
    // The media type's essence, in any case and with parameters, is what
    // declares it (a prefix did: `application/wasmx` declared WebAssembly,
    // `Application/WASM` did not).
    let detail = upload_bytes(
        &s,
        &b,
        "g",
        b"kvdb.say('not wasm')",
        Some("Application/WASM; x=1"),
    )
    .assert_problem(400);
    assert!(detail.contains("not WebAssembly"), "{detail}");
    assert_eq!(scripts_of(&s, &b), json!([]));
    let r = upload_bytes(
        &s,
        &b,
        "lua",
        b"kvdb.say('lua after all')",
        Some("application/wasmx"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(run(&s, &b, "lua").text(), "lua after all\n");
    let r = s.request(
        "DELETE",
        &format!("/{b}/scripts/lua"),
        &[("authorization", "Bearer sk")],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    // The magic and then garbage: WebAssembly, but not a valid component.
    let mut broken = b"\0asm\x0d\0\x01\0".to_vec();
    broken.extend_from_slice(&[0xff; 64]);
    let detail = upload_bytes(&s, &b, "g", &broken, None).assert_problem(400);
    assert!(
        detail.contains("not a valid WebAssembly component"),
        "{detail}"
    );
    // A truncated component: its first half.
    let bytes = hello();
    let detail = upload_bytes(
        &s,
        &b,
        "g",
        &bytes[..bytes.len() / 2],
        Some("application/wasm"),
    )
    .assert_problem(400);
    assert!(!detail.is_empty());
    assert_eq!(scripts_of(&s, &b), json!([]));
    assert_problem_type(&run(&s, &b, "g"), 404, "script-not-found");
}

#[test]
fn a_core_module_is_400_saying_it_is_a_core_module_not_a_component() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let module = b"\0asm\x01\0\0\0";
    // Recognised by its magic, or declared.
    for content_type in [None, Some("application/wasm")] {
        let detail = upload_bytes(&s, &b, "core", module, content_type).assert_problem(400);
        assert!(
            detail.contains("core WebAssembly module") && detail.contains("component"),
            "{content_type:?}: {detail}"
        );
    }
    assert_eq!(scripts_of(&s, &b), json!([]));
}

/// A component PUT to `/B/scripts`, its name forgotten, is refused saying
/// where scripts go: it was stored as the key `scripts` with a 204 (found by
/// a review). Other values of that key are stored as any key's.
#[test]
fn a_component_put_to_the_scripts_key_is_400_saying_where_scripts_go() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    for content_type in [None, Some("application/wasm")] {
        let mut headers = vec![("authorization", "Bearer sk")];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let r = s.request("PUT", &format!("/{b}/scripts"), &headers, Some(&hello()));
        let detail = r.assert_problem(400);
        assert!(
            detail.contains("/BUCKET/scripts/NAME"),
            "{content_type:?}: {detail}"
        );
        assert_eq!(as_sk(&s, "GET", &format!("/{b}/scripts")).status, 404);
    }
    assert_eq!(scripts_of(&s, &b), json!([]));
    put_sk(&s, &b, "scripts", "a list of mine");
    assert_eq!(
        as_sk(&s, "GET", &format!("/{b}/scripts")).text(),
        "a list of mine"
    );
    // A declared component over the value limit is told the same (it was a
    // 413, "value too large").
    let s = TestServer::start_with(&["--max-value-bytes", "1000"]);
    let b = script_bucket(&s, "");
    let detail = s
        .request(
            "PUT",
            &format!("/{b}/scripts"),
            &[
                ("content-type", "application/wasm"),
                ("authorization", "Bearer sk"),
            ],
            Some(&hello()),
        )
        .assert_problem(400);
    assert!(detail.contains("/BUCKET/scripts/NAME"), "{detail}");
}

/// Found by a reviewer writing guests: a binary uploaded as Lua (neither
/// declared `application/wasm` nor starting with the `\0asm` magic) answered
/// only Lua's "x:1: unexpected symbol near '<\224>'".
#[test]
fn a_binary_uploaded_as_lua_is_400_saying_how_to_upload_a_component() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    // What `curl -d @file` (8.7 and later) sends of a component: its bytes
    // without NUL, CR and LF, as a form.
    let stripped: Vec<u8> = hello()
        .into_iter()
        .filter(|c| !matches!(c, 0 | b'\r' | b'\n'))
        .collect();
    let form = Some("application/x-www-form-urlencoded");
    let detail = upload_bytes(&s, &b, "d", &stripped, form).assert_problem(400);
    // Lua's message, then what to do.
    assert!(detail.contains("d:1: syntax error"), "{detail}");
    assert!(
        detail
            .contains("looks like a WebAssembly component whose NUL, CR and LF bytes were dropped"),
        "{detail}"
    );
    assert!(
        detail.contains("-H 'Content-Type: application/wasm'")
            && detail.contains("use `--data-binary @file` or `-T file`"),
        "{detail}"
    );
    // The same bytes declared a component (`curl -d @file -H 'Content-Type:
    // application/wasm'`, as the README's upload lines set the type): the
    // same advice after wasmtime's message (a reviewer following the README
    // got only "this is not WebAssembly").
    let detail = upload_bytes(&s, &b, "w", &stripped, Some("application/wasm")).assert_problem(400);
    assert!(detail.contains("this is not WebAssembly"), "{detail}");
    assert!(
        detail
            .contains("looks like a WebAssembly component whose NUL, CR and LF bytes were dropped")
            && detail.contains("use `--data-binary @file` or `-T file`"),
        "{detail}"
    );
    // Other bytes declared a component (what curl before 8.7 leaves of a
    // `-d @file`: cut at each NUL): how to send a component file.
    let detail =
        upload_bytes(&s, &b, "x", b"nothing", Some("application/wasm")).assert_problem(400);
    assert!(
        !detail.contains("looks like a WebAssembly component")
            && detail.contains("If it is a component file: send it unaltered"),
        "{detail}"
    );
    // Binary garbage (or a component cut at its first NUL, as older curls
    // send it): not UTF-8.
    let garbage = [0xe0, 0x80, 0xff, 0xfe, 0x01, 0x02];
    let detail = upload_bytes(&s, &b, "g", &garbage, None).assert_problem(400);
    assert!(detail.contains("unexpected symbol"), "{detail}");
    assert!(
        detail.contains("A Lua script is UTF-8 text, and this is not")
            && detail.contains("Content-Type: application/wasm"),
        "{detail}"
    );
    // Text that is no Lua: Lua's message alone.
    let detail = upload_bytes(&s, &b, "t", b"kvdb.say(", None).assert_problem(400);
    assert!(!detail.contains("WebAssembly"), "{detail}");
    assert_eq!(scripts_of(&s, &b), json!([]));
}

/// A hand-written component of the `kvdb:script` world (no imports): its
/// `handle` runs `prelude`, then answers `200 ok`. `before` goes ahead of
/// the main module (more core modules and instances).
fn wat_component(before: &str, prelude: &str) -> Vec<u8> {
    let text = format!(
        r#"(component
  {before}
  (core module $Main
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 1024))
    (data (i32.const 100) "ok\n")
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.const 7)) (i32.const -8)))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (local.get $p))
    (func (export "handle") (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      {prelude}
      {ANSWER_OK}))
  (core instance $main (instantiate $Main))
  {export})"#,
        export = handle_export("$main"),
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The end of a hand-written `handle`: answers 200 `ok\n` (the bytes at
/// 100) with no headers, the response record at address 0.
const ANSWER_OK: &str = "(i32.store16 (i32.const 0) (i32.const 200))
      (i32.store (i32.const 4) (i32.const 0))
      (i32.store (i32.const 8) (i32.const 0))
      (i32.store (i32.const 12) (i32.const 100))
      (i32.store (i32.const 16) (i32.const 3))
      (i32.const 0)";

/// The kvdb:script `request` and `response` types and the `handle` export,
/// lifted from the core instance `$main`'s `handle` with the memory and
/// `cabi_realloc` of the core instance `memory`.
fn handle_export(memory: &str) -> String {
    format!(
        r#"(type $req (record (field "method" string) (field "path" string)
     (field "vars" (list (tuple string string))) (field "headers" (list (tuple string string)))
     (field "body" (list u8))))
  (type $resp (record (field "status" u16) (field "headers" (list (tuple string string))) (field "body" (list u8))))
  (export $reqt "request" (type $req))
  (export $respt "response" (type $resp))
  (func (export "handle") (param "request" $reqt) (result $respt)
    (canon lift (core func $main "handle") (memory (core memory {memory} "memory"))
      (realloc (core func {memory} "cabi_realloc"))))"#
    )
}

/// Core instances of a module with a memory of `pages` 64 KiB pages.
fn memories(count: usize, pages: u32) -> String {
    let instances: String = (0..count)
        .map(|i| format!("(core instance $m{i} (instantiate $Mem))\n"))
        .collect();
    format!("(core module $Mem (memory (export \"m\") {pages}))\n{instances}")
}

#[test]
fn the_hand_written_component_runs() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "w", &wat_component(&memories(1, 1), ""));
    assert_body(&run(&s, &b, "w"), "ok\n");
}

/// Found by a review: with no cap, one component of 511 memories took every
/// memory slot of the pool, and other buckets' scripts failed while it ran.
#[test]
fn a_component_with_more_memories_or_instances_than_allowed_is_400() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let many = wat_component(&memories(2, 1), "");
    let detail = upload_bytes(&s, &b, "many", &many, Some("application/wasm")).assert_problem(400);
    assert!(detail.contains("3 Wasm linear memories"), "{detail}");
    let instances: String = (0..40)
        .map(|i| format!("(core instance $e{i} (instantiate $Empty))\n"))
        .collect();
    let wide = wat_component(&format!("(core module $Empty)\n{instances}"), "");
    let detail = upload_bytes(&s, &b, "wide", &wide, Some("application/wasm")).assert_problem(400);
    assert!(detail.contains("core module instances"), "{detail}");
    assert_eq!(scripts_of(&s, &b), json!([]));
}

/// Found by a review: the memory limit held for each memory alone, so a
/// component with many memories used it many times over.
#[test]
fn the_memory_limit_holds_for_all_of_a_runs_memories_together() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    // 12.5 MiB in a second memory, then 12.5 MiB more in the main one: each
    // within the 16 MiB limit, together over it.
    let grows = "(drop (memory.grow (i32.const 200)))";
    install_wasm(&s, &b, "two", &wat_component(&memories(1, 200), grows));
    let t = get_within(&s, &format!("/{b}/scripts/two"), BOUND);
    let detail = assert_limit(&t, &[(500, "script-memory-limit")]);
    assert!(detail.contains("16777216"), "{detail}");
    assert!(detail.contains("use less memory per request"), "{detail}");
    assert!(detail.contains("--script-memory-bytes"), "{detail}");
    // Either alone fits.
    install_wasm(&s, &b, "one", &wat_component(&memories(1, 1), grows));
    assert_body(&run(&s, &b, "one"), "ok\n");
    install_wasm(&s, &b, "other", &wat_component(&memories(1, 200), ""));
    assert_body(&run(&s, &b, "other"), "ok\n");
    assert_server_still_answers(&s, &b);
}

/// Found by a review: a trap answered "error while executing at wasm
/// backtrace:", the heading of its backtrace.
#[test]
fn a_trap_is_a_script_error_that_names_the_trap() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let oob = "(drop (i32.load (i32.const -8)))";
    install_wasm(&s, &b, "oob", &wat_component(&memories(1, 1), oob));
    let detail = run(&s, &b, "oob").assert_problem(500);
    assert!(detail.contains("out of bounds memory access"), "{detail}");
    let unreachable = "(unreachable)";
    install_wasm(&s, &b, "u", &wat_component(&memories(1, 1), unreachable));
    let detail = run(&s, &b, "u").assert_problem(500);
    assert!(detail.contains("unreachable"), "{detail}");
}

#[test]
fn a_component_of_another_world_is_400_saying_it_does_not_fit_kvdb_script() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let other = component("kvdb_test_otherworld");
    let detail =
        upload_bytes(&s, &b, "other", &other, Some("application/wasm")).assert_problem(400);
    assert!(detail.contains("kvdb:script"), "{detail}");
    assert!(
        detail.contains("does not fit") || detail.contains("does not export"),
        "{detail}"
    );
    // The import this server lacks, named.
    assert!(
        detail.contains("does not provide: `test:other/greeter`"),
        "{detail}"
    );
    assert_eq!(scripts_of(&s, &b), json!([]));
}

/// The version of `kvdb:script` the server provides: `wit/kvdb.wit`'s.
fn wit_version() -> &'static str {
    include_str!("../../wit/kvdb.wit")
        .lines()
        .find_map(|l| l.strip_prefix("package kvdb:script@"))
        .and_then(|v| v.strip_suffix(';'))
        .expect("wit/kvdb.wit names its package")
}

/// Found by a reviewer writing guests: a component built against another
/// version of the WIT package got wasmtime's "instance export `get` has the
/// wrong type: function implementation is missing".
#[test]
fn a_component_built_against_another_kvdb_script_version_is_400_saying_to_rebuild() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let kv = r#"(import "kvdb:script/kv@0.2.0" (instance
      (export "get" (func (param "key" string) (result (option (list u8)))))))"#;
    let detail = upload_bytes(
        &s,
        &b,
        "v2",
        &wat_component(kv, ""),
        Some("application/wasm"),
    )
    .assert_problem(400);
    assert!(
        detail.contains("this component was built against kvdb:script@0.2.0"),
        "{detail}"
    );
    assert!(
        detail.contains(&format!(
            "this server provides kvdb:script@{}: rebuild it against this server's wit/",
            wit_version()
        )),
        "{detail}"
    );
    assert!(!detail.contains("implementation is missing"), "{detail}");
    assert_eq!(scripts_of(&s, &b), json!([]));
    // The same import at the server's version, and a WASI one it provides:
    // uploaded (an unused import is no error).
    let fits = format!(
        r#"(import "kvdb:script/kv@{}" (instance))
  (import "wasi:random/random@0.2.0" (instance))"#,
        wit_version()
    );
    install_wasm(&s, &b, "fits", &wat_component(&fits, ""));
    assert_body(&run(&s, &b, "fits"), "ok\n");
}

/// Found by a reviewer writing guests: componentize-js's default output
/// imports wasi:http (for `fetch` and fetch events), which the server does
/// not provide; the 400 named only wasmtime's first mismatch.
#[test]
fn a_component_importing_wasi_http_is_400_naming_it_and_the_componentize_js_fix() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    // An instance import needs an item to be refused: one without any is
    // satisfied by nothing.
    let http = r#"(import "wasi:http/types@0.2.3" (instance
    (export "fields" (type (sub resource)))))
  (import "wasi:io/streams@0.2.3" (instance
    (export "input-stream" (type (sub resource)))))
  (import "wasi:http/outgoing-handler@0.2.3" (instance (export "handle" (func))))"#;
    let detail = upload_bytes(
        &s,
        &b,
        "js",
        &wat_component(http, ""),
        Some("application/wasm"),
    )
    .assert_problem(400);
    assert!(
        detail.contains(
            "does not provide: `wasi:http/types@0.2.3`, `wasi:http/outgoing-handler@0.2.3`."
        ),
        "{detail}"
    );
    assert!(
        detail.contains("disableFeatures: ['http', 'fetch-event']"),
        "{detail}"
    );
    assert_eq!(scripts_of(&s, &b), json!([]));
}

#[test]
fn uploading_a_component_needs_the_secret_key_and_stores_nothing_without_it() {
    let s = TestServer::start();
    let b = script_bucket(&s, "write_key=wk");
    let bytes = hello();
    let anonymous = s.request(
        "PUT",
        &format!("/{b}/scripts/h"),
        &[("content-type", "application/wasm")],
        Some(&bytes),
    );
    anonymous.assert_problem(401);
    let write_key = s.request(
        "PUT",
        &format!("/{b}/scripts/h"),
        &[
            ("content-type", "application/wasm"),
            ("authorization", "Bearer wk"),
        ],
        Some(&bytes),
    );
    write_key.assert_problem(403);
    let wrong = s.request(
        "PUT",
        &format!("/{b}/scripts/h"),
        &[
            ("content-type", "application/wasm"),
            ("authorization", "Bearer nope"),
        ],
        Some(&bytes),
    );
    wrong.assert_problem(401);
    assert_problem_type(&run(&s, &b, "h"), 404, "script-not-found");
    assert_eq!(scripts_of(&s, &b), json!([]));
}

#[test]
fn a_component_upload_answers_a_summary_of_kind_wasm_and_is_listed() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let bytes = hello();
    // Recognised by its magic without a content type, too.
    for (name, content_type) in [("declared", Some("application/wasm")), ("sniffed", None)] {
        let r = upload_bytes(&s, &b, name, &bytes, content_type);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let doc = r.json();
        assert_eq!(doc["name"], name);
        assert_eq!(doc["kind"], "wasm", "{doc}");
        assert_eq!(doc["size"], bytes.len(), "{doc}");
        assert_body(&run(&s, &b, &format!("{name}?name=x")), "Hello x\n");
    }
    let listed = scripts_of(&s, &b);
    let kinds: Vec<_> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|e| (e["name"].clone(), e["kind"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (json!("declared"), json!("wasm")),
            (json!("sniffed"), json!("wasm"))
        ]
    );
}

#[test]
fn a_component_beyond_the_component_size_limit_is_413_and_stores_nothing() {
    let hello = hello();
    let visitors = component("kvdb_example_visitors");
    assert!(hello.len() < 100_000 && visitors.len() > 100_000);
    let s = TestServer::start_with(&["--script-component-bytes", "100000"]);
    let b = script_bucket(&s, "");
    let r = upload_bytes(&s, &b, "big", &visitors, Some("application/wasm"));
    let detail = r.assert_problem(413);
    assert!(detail.contains("--script-component-bytes"), "{detail}");
    // Without the media type, the body is read up to the larger limit (the
    // Lua one, 256 KiB, here), and a component is still held to its own.
    let r = upload_bytes(&s, &b, "big", &visitors, None);
    let detail = r.assert_problem(413);
    assert!(detail.contains("--script-component-bytes"), "{detail}");
    // Past both, both limits are named.
    let mut huge = visitors.clone();
    huge.resize(300 * 1024, 0);
    let detail = upload_bytes(&s, &b, "big", &huge, None).assert_problem(413);
    assert!(
        detail.contains("--script-source-bytes") && detail.contains("--script-component-bytes"),
        "{detail}"
    );
    assert_problem_type(&run(&s, &b, "big"), 404, "script-not-found");
    install_wasm(&s, &b, "small", &hello);
    assert_body(&run(&s, &b, "small?name=s"), "Hello s\n");
}

// ---------------------------------------------------------------------------
// The examples, by GET and POST

#[test]
fn hello_greets_by_get_and_post_with_the_name_escaped() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    let r = run(&s, &b, "hello?name=%3Cb%3E%26%22x%22");
    assert_body(&r, "Hello &lt;b&gt;&amp;&quot;x&quot;\n");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT));
    assert_body(
        &post_form(&s, &b, "hello", "name=Form", None),
        "Hello Form\n",
    );
    assert_body(
        &post_form(&s, &b, "hello?name=query", "name=body", None),
        "Hello body\n",
    );
    assert_body(&run(&s, &b, "hello"), "Hello \n");
}

#[test]
fn visitors_counts_by_get_and_post_into_todays_key() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "visitors", &component("kvdb_example_visitors"));
    assert_body(&run(&s, &b, "visitors"), "1\n");
    assert_body(&post_form(&s, &b, "visitors", "x=1", None), "2\n");
    assert_body(&run(&s, &b, "visitors"), "3\n");
    let r = s.get(&format!("/{b}/{}", visitors_key()));
    assert_eq!((r.status, r.text().as_str()), (200, "3"));
    let keys = as_sk(&s, "GET", &format!("/{b}/?format=json")).json();
    assert_eq!(keys, json!([visitors_key()]));
}

#[test]
fn visitors_reports_a_denied_increment_with_500_and_counts_with_the_write_key() {
    let s = TestServer::start();
    let b = script_bucket(&s, "write_key=wk");
    install_wasm(&s, &b, "visitors", &component("kvdb_example_visitors"));
    let r = run(&s, &b, "visitors");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text()
            .starts_with("error incrementing: permission denied"),
        "{}",
        r.text()
    );
    assert_body(&run_as(&s, &b, "visitors", "wk"), "1\n");
}

#[test]
fn the_scope_example_writes_only_under_its_own_prefix_whoever_calls() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    install_wasm(&s, &b, "scope", &component("kvdb_example_scope"));
    let token = s.token(&b, SK, "prefix=x:&permissions=read");
    for credential in [None, Some("rk"), Some("wk"), Some(SK), Some(token.as_str())] {
        for post in [false, true] {
            let r = match (credential, post) {
                (None, false) => run(&s, &b, "scope"),
                (Some(c), false) => run_as(&s, &b, "scope", c),
                (c, true) => post_form(&s, &b, "scope", "a=1", c),
            };
            assert_eq!(r.status, 200, "{credential:?} post={post}: {}", r.text());
            let text = r.text();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "{text}");
            assert_eq!(lines[0], "users:1:name: ok", "{credential:?}");
            assert!(
                lines[1].starts_with("users:2:name: permission denied"),
                "{credential:?}: {text}"
            );
        }
    }
    let r = as_sk(&s, "GET", &format!("/{b}/users:1:name"));
    assert_eq!((r.status, r.text().as_str()), (200, "bob"));
    as_sk(&s, "GET", &format!("/{b}/users:2:name")).assert_problem(404);
}

#[test]
fn guestbook_stores_posts_and_lists_them_by_get() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "guestbook", &component("kvdb_example_guestbook"));
    let r = post_form(&s, &b, "guestbook", "name=ann&message=hi", None);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.text(), r#"{"id":1,"name":"ann","message":"hi"}"#);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let r = post_form(&s, &b, "guestbook", "name=bob", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.text(), r#"{"error":"name and message are required"}"#);
    // Listing needs the secret key: anonymous is a 403 naming the refusal.
    let r = run(&s, &b, "guestbook");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("permission denied"), "{}", r.text());
    let r = run_as(&s, &b, "guestbook", SK);
    assert_body(&r, r#"[{"id":1,"name":"ann","message":"hi"}]"#);
    let stored = s.get(&format!("/{b}/guestbook:00000001"));
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(
        stored.json(),
        json!({"id": 1, "name": "ann", "message": "hi"})
    );
}

// ---------------------------------------------------------------------------
// The authorization context of a run (the Lua tests' scenarios)

#[test]
fn a_run_gets_exactly_the_callers_scope() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk&write_key=wk");
    for k in ["p:k", "q:k"] {
        put_sk(&s, &b, k, k);
    }
    install_wasm(&s, &b, "probe", &hostile());
    let cases = whoami_cases(&s, &b);
    for (credential, expected) in cases {
        let r = match &credential {
            None => run(&s, &b, "probe?do=whoami"),
            Some(c) => run_as(&s, &b, "probe?do=whoami", c),
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
    put_sk(&s, &b, "p:k", "v");
    install_wasm(&s, &b, "probe", &hostile());
    assert_body(
        &run(&s, &b, "probe?do=anon"),
        "read,write,delete\nv\nnil\nstring\n",
    );
    assert_eq!(s.get(&format!("/{b}/anon")).text(), "1");
}

#[test]
fn scope_set_prefix_narrows_writes_and_the_guest_completes() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "probe", &hostile());
    let r = run_as(&s, &b, "probe?do=narrow-prefix", SK);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[0], "users:1:");
    assert_eq!(lines[1], "nil");
    assert!(lines[2].starts_with("permission denied"), "{lines:?}");
    assert!(lines[3].starts_with("nil permission denied"), "{lines:?}");
    assert_eq!(lines[4..], ["alice", "completed"]);
    assert_eq!(s.get(&format!("/{b}/users:1:name")).text(), "alice");
    s.get(&format!("/{b}/users:2:name")).assert_problem(404);
}

#[test]
fn scope_set_permissions_narrow_what_the_run_may_do() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    put_sk(&s, &b, "k", "v");
    install_wasm(&s, &b, "probe", &hostile());
    assert_body(
        &run_as(&s, &b, "probe?do=narrow-perms", SK),
        "read \nv\nstring\nstring\nstring\nwrite,delete\nstring\n",
    );
    assert_eq!(s.get(&format!("/{b}/k")).text(), "v");
}

#[test]
fn an_anonymous_run_on_a_read_key_bucket_reads_only_once_the_guest_widens_its_scope() {
    let s = TestServer::start();
    let b = script_bucket(&s, "read_key=rk");
    put_sk(&s, &b, "k", "secret");
    install_wasm(&s, &b, "probe", &hostile());
    let r = run(&s, &b, "probe?do=plain-get");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().starts_with("nil permission denied"),
        "{}",
        r.text()
    );
    // The same guest with the read key reads.
    assert_body(&run_as(&s, &b, "probe?do=plain-get", "rk"), "secret nil\n");
    assert_body(&run(&s, &b, "probe?do=widen"), "secret nil\n");
    // Over HTTP the key stays closed to anonymous readers.
    s.get(&format!("/{b}/k")).assert_problem(401);
}

// ---------------------------------------------------------------------------
// Hostile guests

/// A server with small limits, each far below what a hostile guest asks for.
fn limited(time_ms: &str, fuel: &str) -> TestServer {
    TestServer::start_with(&[
        "--script-time-ms",
        time_ms,
        "--script-fuel",
        fuel,
        "--script-memory-bytes",
        "16777216",
        "--script-response-bytes",
        "10000",
    ])
}

/// A bucket with the hostile guest as `h` and a plain value.
fn hostile_bucket(s: &TestServer) -> String {
    let b = hostile_bucket_with(s, "");
    put_sk(s, &b, "plain", "value");
    b
}

/// A bucket made with `fields` (and the secret key) holding the hostile
/// guest as script `h`.
fn hostile_bucket_with(s: &TestServer, fields: &str) -> String {
    let b = script_bucket(s, fields);
    install_wasm(s, &b, "h", &hostile());
    b
}

/// Runs the hostile guest with `do=what`, failing if no answer comes within
/// [`BOUND`].
#[track_caller]
fn misbehave(s: &TestServer, b: &str, what: &str) -> Timed {
    get_within(s, &format!("/{b}/scripts/h?do={what}"), BOUND)
}

/// Asserts a limit's problem document of one of these types; returns its
/// detail.
#[track_caller]
fn assert_limit(t: &Timed, kinds: &[(u16, &str)]) -> String {
    let doc = t.json();
    let kind = doc["type"].as_str().unwrap_or_default();
    assert!(
        kinds
            .iter()
            .any(|(status, k)| t.status == *status && kind == format!("urn:kvdb:problem:{k}")),
        "{} {kind}, expected one of {kinds:?}: {doc}",
        t.status
    );
    assert_eq!(doc["status"], t.status);
    assert!(
        doc["title"].as_str().is_some_and(|d| !d.is_empty()),
        "{doc}"
    );
    let detail = doc["detail"].as_str().unwrap_or_default().to_owned();
    assert!(!detail.is_empty(), "{doc}");
    assert!(t.elapsed < BOUND, "took {:?}", t.elapsed);
    detail
}

/// After a run hit a limit: the same guest, a plain GET, a Lua script and
/// another bucket's component all still work.
#[track_caller]
fn assert_server_still_answers(s: &TestServer, b: &str) {
    let t = misbehave(s, b, "ok");
    assert_eq!((t.status, t.body.as_str()), (200, "ok\n"));
    let t = get_within(s, &format!("/{b}/plain"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "value"));
    install(s, b, "lua", "kvdb.say('still here')");
    let t = get_within(s, &format!("/{b}/scripts/lua"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "still here\n"));
    let other = script_bucket(s, "");
    install_wasm(s, &other, "hello", &hello());
    let t = get_within(s, &format!("/{other}/scripts/hello?name=b"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "Hello b\n"));
}

#[test]
fn an_endless_loop_ends_with_the_fuel_or_time_limit() {
    let s = limited("500", "50000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "loop");
    assert_limit(
        &t,
        &[(500, "script-fuel-limit"), (504, "script-time-limit")],
    );
    assert_server_still_answers(&s, &b);
}

#[test]
fn an_endless_loop_with_little_fuel_ends_with_the_fuel_limit() {
    let s = limited("10000", "5000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "loop");
    let detail = assert_limit(&t, &[(500, "script-fuel-limit")]);
    assert!(detail.contains("5000000"), "{detail}");
    // What to do: less work, or an operator's flag.
    assert!(detail.contains("do less work per request"), "{detail}");
    assert!(detail.contains("--script-fuel"), "{detail}");
    assert!(t.elapsed < Duration::from_secs(5), "took {:?}", t.elapsed);
    assert_server_still_answers(&s, &b);
}

#[test]
fn an_endless_loop_with_plenty_of_fuel_ends_with_the_time_limit() {
    let s = limited("300", "1000000000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "loop");
    let detail = assert_limit(&t, &[(504, "script-time-limit")]);
    assert!(detail.contains("300"), "{detail}");
    assert!(t.elapsed >= Duration::from_millis(300), "{:?}", t.elapsed);
    assert!(t.elapsed < Duration::from_secs(5), "took {:?}", t.elapsed);
    assert_server_still_answers(&s, &b);
}

/// A guest's log calls are escaped (no forged lines) and end at 64 KiB a
/// run, as Lua's `print` (found by a review: 40 MB logged in one run).
#[test]
fn a_guests_log_is_escaped_and_bounded() {
    let mut answered = None;
    let log = TestServer::log_while(&[], |s| {
        let b = hostile_bucket(s);
        answered = Some(misbehave(s, &b, "log"));
    });
    let t = answered.expect("ran");
    assert_eq!((t.status, t.body.as_str()), (200, "logged\n"));
    assert_log_escaped_and_bounded(&log);
}

/// A run that fails is in the log with its bucket and script (its caller
/// got the error; the admin would otherwise never see it), in both
/// runtimes; a long error is cut.
#[test]
fn a_failed_run_is_logged_with_its_script() {
    let mut bucket = String::new();
    let log = TestServer::log_while(&["--script-fuel", "5000000"], |s| {
        let b = hostile_bucket(s);
        let t = misbehave(s, &b, "loop");
        assert_limit(&t, &[(500, "script-fuel-limit")]);
        crate::lua_api::install(
            s,
            &b,
            "oops",
            "error('bad input ' .. string.rep('z', 5000))",
        );
        let r = run(s, &b, "oops");
        r.assert_problem(500);
        bucket = b;
    });
    let fuel = format!("script={bucket}/h");
    assert!(
        log.lines()
            .any(|l| l.contains(&fuel) && l.contains("run failed") && l.contains("fuel")),
        "{log}"
    );
    let lua = format!("script={bucket}/oops");
    let line = log
        .lines()
        .find(|l| l.contains(&lua) && l.contains("run failed"))
        .unwrap_or_else(|| panic!("no line for the Lua run: {log}"));
    assert!(
        line.contains("bad input zzz") && line.contains("(cut)"),
        "{line}"
    );
    assert!(line.len() < 2000, "{line}");
}

/// A guest that prints more than the host keeps of its stdout (128 KiB
/// against 64 KiB) goes on: the rest is dropped, and the log says so. The
/// pipe refused writes past its cap, and Rust's `println!` panicked on that
/// (found by a review: a 500).
#[test]
fn a_guest_printing_past_the_kept_output_goes_on() {
    let mut answered = None;
    let mut bucket = String::new();
    let log = TestServer::log_while(&[], |s| {
        let b = hostile_bucket(s);
        answered = Some(misbehave(s, &b, "print"));
        misbehave(s, &b, "panic");
        bucket = b;
    });
    let t = answered.expect("ran");
    assert_eq!((t.status, t.body.as_str()), (200, "printed\n"));
    assert!(
        log.contains("is dropped"),
        "no notice of the dropped output in the log"
    );
    // What it printed is in the log, a line each, with its bucket, script
    // and stream (found by an audit: nothing looked at them).
    let tagged = |stream: &str, text: &str| {
        log.lines().any(|l| {
            l.contains(text)
                && l.contains(&format!("script={bucket}/h"))
                && l.contains(&format!("stream=\"{stream}\""))
        })
    };
    assert!(tagged("stdout", &"p".repeat(1023)), "{log}");
    assert!(tagged("stderr", PANIC_MESSAGE), "{log}");
}

/// A guest that waits in the host (a WASI sleep) runs no guest code, where
/// the epoch deadline is looked at: the time limit ends it all the same,
/// started on the async worker or moved to a blocking thread after some
/// work, and its pool slot is free again (found by a review: a sleep ran
/// past the limit, after its client had gone).
#[test]
fn a_guest_sleeping_in_the_host_ends_with_the_time_limit() {
    let s = limited("300", "1000000000000000");
    let b = hostile_bucket(&s);
    for what in ["sleep", "sleep&work=50"] {
        let t = misbehave(&s, &b, what);
        let detail = assert_limit(&t, &[(504, "script-time-limit")]);
        assert!(detail.contains("300"), "{what}: {detail}");
        assert!(
            t.elapsed < Duration::from_secs(5),
            "{what}: took {:?}",
            t.elapsed
        );
    }
    assert_server_still_answers(&s, &b);
}

/// A guest's write that waits for the store (a merge into a large JSON
/// value, queued behind others) stops waiting at the run's time limit, and
/// the run ends with it: no guest code runs while it waits, where the epoch
/// would be looked at (a run with a 1 s limit answered after 12 s, holding
/// its pool slot and a thread; found by a review).
#[test]
fn a_guest_write_waiting_for_the_store_ends_with_the_time_limit() {
    let s = limited("300", "1000000000000000");
    let b = hostile_bucket(&s);
    let (t, answered, drained) = crate::lua_sandbox::with_merges_queued(&s, &b, "big", 8, || {
        misbehave(&s, &b, "merge&at=big")
    });
    assert!(
        drained > answered + Duration::from_millis(500),
        "the merges ({drained:?}) did not outlast the run ({answered:?}): this proves nothing"
    );
    let detail = assert_limit(&t, &[(504, "script-time-limit")]);
    assert!(detail.contains("300"), "{detail}");
    assert!(t.elapsed < Duration::from_secs(2), "took {:?}", t.elapsed);
    // A merge that does not wait is unaffected.
    put_sk(&s, &b, "small", "{}");
    assert_eq!(misbehave(&s, &b, "merge&at=small").body, "merged\n");
    assert_server_still_answers(&s, &b);
}

/// A run whose client goes away while the run is suspended on the async
/// worker (in a WASI sleep here; a write waiting for its commit is another
/// such point, now that writes are async imports) goes on to its end: a
/// script is not cut off between two of its writes by a closed connection.
/// (It holds because the server answers every request it has read, to the
/// end, and drops no handler when its client goes away.)
#[test]
fn a_run_whose_client_went_away_goes_on_to_its_end() {
    let s = limited("10000", "1000000000000000");
    let b = hostile_bucket(&s);
    // The run sets the key once and sleeps 1.5 s: its client goes away
    // meanwhile.
    s.get_and_hang_up(
        &format!("/{b}/scripts/h?do=nap-set&at=n&ms=1500"),
        Duration::from_millis(300),
    );
    // It wakes and sets the key again.
    let started = Instant::now();
    loop {
        let r = s.request(
            "GET",
            &format!("/{b}/n"),
            &[("authorization", "Bearer sk")],
            None,
        );
        if (r.status, r.text().as_str()) == (200, "2") {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "the run was cut off when its client went away: {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_server_still_answers(&s, &b);
}

/// The handles a run holds (WASI pollables here) take host memory, outside
/// the memory limit: past 1024 at once the run ends with the memory limit
/// (wasmtime's default of 100,000 let a guest hold ~28 MB a run; found by a
/// review).
#[test]
fn a_guest_holding_too_many_handles_ends_with_the_memory_limit() {
    let s = limited("10000", "1000000000000000");
    let b = hostile_bucket(&s);
    assert_eq!(
        misbehave(&s, &b, "pollables&n=1000").body,
        "1000 pollables\n"
    );
    let t = misbehave(&s, &b, "pollables&n=90000");
    let detail = assert_limit(&t, &[(500, "script-memory-limit")]);
    assert!(detail.contains("1024 handles"), "{detail}");
    assert_server_still_answers(&s, &b);
}

/// On a server with a 2.5 s time limit, runs the hostile guest's `what`
/// once, then 4 runs of it at once (more than there are async workers), and
/// asserts that a plain request is answered while they go on, and that each
/// run ends with the time limit. The first run is there because a run past
/// its slice once marked its script, and later runs then started off the
/// worker: every run must leave it on its own. The bucket holds a 4 MiB
/// value under `big`.
#[track_caller]
fn assert_runs_do_not_hold_the_server(what: &str) {
    let s = limited("2500", "1000000000000000");
    let b = hostile_bucket(&s);
    put_sk(&s, &b, "big", &"b".repeat(4 << 20));
    assert_limit(&misbehave(&s, &b, what), &[(504, "script-time-limit")]);
    std::thread::scope(|scope| {
        let (s, b) = (&s, &b);
        let runs: Vec<_> = (0..4)
            .map(|_| scope.spawn(move || misbehave(s, b, what)))
            .collect();
        // Time for the runs to start (if they have not, this proves less,
        // but does not fail).
        std::thread::sleep(Duration::from_millis(500));
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            runs.iter().all(|run| !run.is_finished()),
            "{what}: a plain request was answered only after the runs ended"
        );
        for run in runs {
            let t = run.join().expect("run");
            assert_limit(&t, &[(504, "script-time-limit")]);
        }
    });
    assert_server_still_answers(&s, &b);
}

/// Runs that read a large value (4 MiB) again and again don't hold the
/// server, in every run of the script: host calls use no fuel, so a run
/// looping over them hands control back only because each call first looks
/// at its slice on the async worker (a run past its slice no longer marks
/// its script for blocking threads, and without that look every run held
/// its worker to its time limit; found by a review).
#[test]
fn guests_looping_over_large_reads_do_not_hold_the_server() {
    assert_runs_do_not_hold_the_server("gets");
}

/// The same with WASI's calls, which are not the server's own and have no
/// slice check: 1 MiB of random bytes, again and again. The guest's code
/// hands control back at the next epoch tick past its slice (without it,
/// every run held its worker to its time limit; found by a review).
#[test]
fn guests_looping_over_wasi_calls_do_not_hold_the_server() {
    assert_runs_do_not_hold_the_server("randoms");
}

/// Runs whose host calls copy a lot (an 8 MiB log line, for ever) and use
/// little fuel don't hold the server either. (A review reasoned they would
/// hold their workers for the whole limit; they don't, and this keeps it
/// so.)
#[test]
fn guests_copying_in_host_calls_do_not_hold_the_server() {
    assert_runs_do_not_hold_the_server("copies");
}

/// One bucket's runs hold at most a quarter of the pool (64 of its 256
/// slots) at once: past that, its next run is a 503 `script-busy` with
/// `Retry-After`, while another bucket's run still gets a slot; the share
/// comes back as its runs end.
#[test]
fn one_bucket_holds_at_most_a_quarter_of_the_pool() {
    const SHARE: usize = 64;
    // The sleepers sleep until the time limit; under the full test run's
    // load, starting 64 of them can take seconds.
    let s = limited("10000", "1000000000000000");
    let b = hostile_bucket(&s);
    let other = hostile_bucket(&s);
    std::thread::scope(|scope| {
        let (s, b) = (&s, &b);
        // A sleeper that comes in while a probe below holds a place is
        // refused: it tries again until it is in.
        let sleepers: Vec<_> = (0..SHARE)
            .map(|_| {
                scope.spawn(move || {
                    loop {
                        let r = s.get(&format!("/{b}/scripts/h?do=sleep"));
                        if r.status != 503 {
                            return r;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        // Once all of them are in flight, the bucket's next run is refused.
        let started = Instant::now();
        let refused = loop {
            let r = s.get(&format!("/{b}/scripts/h?do=ok"));
            if r.status == 503 {
                break r;
            }
            assert_eq!((r.status, r.text()), (200, "ok\n".to_owned()));
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "{SHARE} sleeping runs never filled the bucket's share"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_script_busy(
            &refused,
            "this bucket already has 64 WebAssembly script runs",
        );
        // Another bucket is not held up by this one's runs.
        let t = misbehave(s, &other, "ok");
        assert_eq!((t.status, t.body.as_str()), (200, "ok\n"));
        for sleeper in sleepers {
            let r = sleeper.join().expect("a sleeper");
            assert_eq!(r.status, 504, "{}", r.text());
        }
    });
    let t = misbehave(&s, &b, "ok");
    assert_eq!((t.status, t.body.as_str()), (200, "ok\n"));
}

/// Context switches so far of the server's WebAssembly epoch ticker thread.
#[cfg(target_os = "linux")]
fn epoch_ticker_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "kvdb-wasm-epoch" {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        return status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
    }
    panic!("no kvdb-wasm-epoch thread in process {pid}");
}

/// The epoch ticker (the time limit's clock) ticks every 10 ms only while a
/// guest runs: an idle server does not wake a hundred times a second, and the
/// first run after an idle spell still ends at its time limit.
#[test]
#[cfg(target_os = "linux")]
fn the_time_limit_clock_sleeps_while_no_guest_runs() {
    let s = limited("300", "1000000000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "ok");
    assert_eq!((t.status, t.body.as_str()), (200, "ok\n"));
    // Let the ticks of that run end, then watch the idle server for 2 s:
    // ticking would be ~200 switches, sleeping 2 (one check a second).
    std::thread::sleep(Duration::from_millis(200));
    let before = epoch_ticker_switches(s.pid());
    std::thread::sleep(Duration::from_secs(2));
    let idle = epoch_ticker_switches(s.pid()) - before;
    assert!(idle <= 10, "the idle ticker woke {idle} times in 2 s");
    let t = misbehave(&s, &b, "loop");
    assert_limit(&t, &[(504, "script-time-limit")]);
    assert!(t.elapsed >= Duration::from_millis(300), "{:?}", t.elapsed);
    // And it ticked while the loop ran.
    assert!(epoch_ticker_switches(s.pid()) - before >= idle + 10);
    assert_server_still_answers(&s, &b);
}

/// CPU time (user + system) the server has used so far, in clock ticks.
#[cfg(target_os = "linux")]
fn server_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields 14 and 15, counted after the ")" that ends the command name.
    let after = stat.rsplit_once(") ").expect("stat format").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// A client that gives up on an endless loop does not leave it running: the
/// run, by then on a blocking thread, still ends at its time limit (the
/// time-limit clock keeps ticking for it though no request waits for it).
#[test]
#[cfg(target_os = "linux")]
fn a_run_whose_client_hung_up_still_ends_at_its_time_limit() {
    let s = limited("300", "1000000000000000");
    let b = hostile_bucket(&s);
    // Hang up once the loop is running (and has left the async worker).
    s.get_and_hang_up(
        &format!("/{b}/scripts/h?do=loop"),
        Duration::from_millis(100),
    );
    // Well past the 300 ms limit, the server must be idle again: an endless
    // loop would burn a whole core (~100 ticks a second).
    std::thread::sleep(Duration::from_millis(1200));
    let before = server_cpu_ticks(s.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = server_cpu_ticks(s.pid()) - before;
    assert!(
        used < 30,
        "the server used {used} ticks of CPU in an idle second"
    );
    assert_server_still_answers(&s, &b);
}

#[test]
fn endless_allocation_ends_with_the_memory_limit() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "grow");
    assert_limit(&t, &[(500, "script-memory-limit")]);
    assert_server_still_answers(&s, &b);
}

/// Frames in linear memory run out of the guest's own 64 KiB stack before
/// the host's stack limit: the trap is an out-of-bounds access, and the
/// error says what most often causes it (found by a review).
#[test]
fn recursion_past_the_guests_own_stack_is_an_error_that_says_so() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "recurse-frames");
    let detail = assert_limit(&t, &[(500, "script-error")]);
    assert!(
        detail.contains("out of bounds memory access") && detail.contains("stack overflowing"),
        "{detail}"
    );
    assert_server_still_answers(&s, &b);
}

#[test]
fn unbounded_recursion_ends_with_the_stack_limit() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "recurse");
    assert_limit(&t, &[(500, "script-stack-limit")]);
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_panic_is_a_script_error_carrying_the_panic_message() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "panic");
    let detail = assert_limit(&t, &[(500, "script-error")]);
    assert!(detail.contains(PANIC_MESSAGE), "{detail}");
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_huge_response_ends_with_the_response_limit_and_one_at_the_limit_is_sent() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    let t = misbehave(&s, &b, "huge");
    let detail = assert_limit(&t, &[(500, "script-response-limit")]);
    assert!(detail.contains("10000"), "{detail}");
    assert!(detail.contains("answer less per request"), "{detail}");
    assert!(detail.contains("--script-response-bytes"), "{detail}");
    assert!(!t.body.contains("xxxx"), "a partial body was sent");
    let t = misbehave(&s, &b, "huge&bytes=10001");
    assert_limit(&t, &[(500, "script-response-limit")]);
    let t = misbehave(&s, &b, "huge&bytes=10000");
    assert_eq!(t.status, 200, "{}", &t.body[..t.body.len().min(200)]);
    assert_eq!(t.body, "x".repeat(10_000));
    assert_server_still_answers(&s, &b);
}

/// Every request runs in a fresh instance: what one run leaves in guest
/// memory (a static in the data segment, pages of heap) is gone for the next,
/// whichever pooled slot and worker thread either of them gets.
#[test]
fn a_run_never_sees_what_an_earlier_run_left_in_memory() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    let fresh = "0 bytes, 0 runs\n";
    for round in 0..20 {
        let kept = s.get(&format!("/{b}/scripts/h?do=remember&secret=s{round}"));
        assert_eq!((kept.status, kept.text()), (200, "kept\n".to_owned()));
        let recalled = s.get(&format!("/{b}/scripts/h?do=recall"));
        assert_eq!(recalled.text(), fresh, "round {round}");
    }
    // Concurrent runs: slots are freed and reused on several threads.
    std::thread::scope(|scope| {
        for client in 0..4 {
            let (s, b) = (&s, &b);
            scope.spawn(move || {
                for round in 0..25 {
                    let what = if round % 2 == 0 {
                        format!("remember&secret=c{client}r{round}")
                    } else {
                        "recall".to_owned()
                    };
                    let r = s.get(&format!("/{b}/scripts/h?do={what}"));
                    assert_eq!(r.status, 200, "{}", r.text());
                    if round % 2 == 1 {
                        assert_eq!(r.text(), fresh, "client {client} round {round}");
                    }
                }
            });
        }
    });
}

#[test]
fn many_limit_hits_in_a_row_leave_the_server_serving() {
    // Every pooled instance a hostile run used must come back: more runs
    // than the pool would survive if they leaked. The loop ends at its fuel
    // or its time; the time limit leaves the other runs room on a loaded
    // machine (at 200 ms, one failed once while CI ran beside it).
    let s = limited("3000", "20000000");
    let b = hostile_bucket(&s);
    for round in 0..6 {
        for (what, kinds) in [
            (
                "loop",
                &[(500, "script-fuel-limit"), (504, "script-time-limit")][..],
            ),
            ("grow", &[(500, "script-memory-limit")][..]),
            ("recurse", &[(500, "script-stack-limit")][..]),
            ("panic", &[(500, "script-error")][..]),
        ] {
            let t = misbehave(&s, &b, what);
            assert_limit(&t, kinds);
            let ok = misbehave(&s, &b, "ok");
            assert_eq!(
                (ok.status, ok.body.as_str()),
                (200, "ok\n"),
                "round {round} after {what}"
            );
        }
    }
    assert_server_still_answers(&s, &b);
}

#[test]
fn hostile_runs_on_every_worker_do_not_hold_up_other_requests() {
    let s = limited("6000", "1000000000000000");
    let b = hostile_bucket(&s);
    let other = script_bucket(&s, "");
    install_wasm(&s, &other, "hello", &hello());
    let path = format!("/{b}/scripts/h?do=loop");
    let url = s.url(&path);
    // More endless runs at once than the server has async workers: each
    // leaves its worker after its first slice.
    let spinning: Vec<_> = (0..4).map(|_| get_in_background(url.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    // While it spins: a plain read and another bucket's component answer.
    // Far below the hostile run's 6 s, with room for a loaded machine.
    let quick = Duration::from_millis(4000);
    let t = try_get_within(&s, &format!("/{b}/plain"), quick)
        .expect("a plain GET waited for the hostile run");
    assert_eq!((t.status, t.body.as_str()), (200, "value"));
    let t = try_get_within(&s, &format!("/{other}/scripts/hello?name=o"), quick)
        .expect("another bucket's component waited for the hostile run");
    assert_eq!((t.status, t.body.as_str()), (200, "Hello o\n"));
    for spin in spinning {
        let status = spin.join().expect("thread").expect("the hostile run");
        assert_eq!(status, 504);
    }
}

#[test]
fn a_guest_answering_an_invalid_status_is_a_script_error() {
    let s = limited("5000", "1000000000");
    let b = hostile_bucket(&s);
    // 1xx too: an informational status is not a response (100 would be
    // hyper's empty 500, 101 a dropped connection).
    for code in ["600", "99", "0", "100", "101", "199"] {
        let t = misbehave(&s, &b, &format!("status&code={code}"));
        let detail = assert_limit(&t, &[(500, "script-error")]);
        assert!(detail.contains(code), "{code}: {detail}");
    }
    let t = misbehave(&s, &b, "status&code=418");
    assert_eq!((t.status, t.body.as_str()), (418, "status\n"));
    assert_server_still_answers(&s, &b);
}

/// A guest's `Response::new().with_status(204)` has no content and no
/// Content-Type (it went out as text/plain, its Lua twin's without; found
/// by a guest author); the same empty answer with another status is plain
/// text, as in Lua.
#[test]
fn a_guest_answering_204_sends_no_content_type() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    for (code, content_type) in [
        (204, None),
        (304, None),
        (200, Some("text/plain; charset=utf-8")),
    ] {
        let r = s.get(&format!("/{b}/scripts/h?do=empty&code={code}"));
        assert_eq!(
            (r.status, r.header("content-type").as_deref()),
            (code, content_type)
        );
    }
}

#[test]
fn a_guest_sees_its_request_variables_in_order_with_only_the_real_remote_addr_last() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    let r = s.get(&format!(
        "/{b}/scripts/h?do=vars&name=World&remote_addr=spoofed"
    ));
    assert_eq!(
        r.text(),
        "do=vars\nname=World\nremote_addr=127.0.0.1\nvar(remote_addr)=127.0.0.1\n"
    );
}

#[test]
fn guest_headers_cannot_lie_about_the_length_or_inject_lines() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    let (status, headers, body) = raw(&s, "GET", &format!("/{b}/scripts/h?do=headers"));
    assert_eq!((status, body.as_str()), (200, "hi"), "{headers:?}");
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("x-test"), ["1"], "{headers:?}");
    assert_eq!(values("content-length"), ["2"], "{headers:?}");
    assert_eq!(values("content-type"), [TEXT], "{headers:?}");
    // As kvdb.header raises in Lua: a script error naming the header, and
    // nothing of the response sent.
    for (which, named) in [
        ("length", "\"content-length\" is set by the server"),
        ("inject", "invalid value of the header \"x-injected\""),
        ("name", "invalid header name \"bad name\""),
    ] {
        let (status, headers, body) = raw(
            &s,
            "GET",
            &format!("/{b}/scripts/h?do=headers&which={which}"),
        );
        assert_eq!(status, 500, "{which}: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("a problem document");
        assert_eq!(
            doc["type"], "urn:kvdb:problem:script-error",
            "{which}: {body}"
        );
        assert!(
            doc["detail"].as_str().is_some_and(|d| d.contains(named)),
            "{which}: {body}"
        );
        assert!(
            !headers
                .iter()
                .any(|(k, _)| k == "injected" || k == "x-test"),
            "{which}: {headers:?}"
        );
    }
}

/// A JSON value is typed as an HTTP body sent as `application/json`: a
/// number is a number, which PATCH can count (found by a review: it was
/// stored as JSON text, which PATCH +1 refused).
#[test]
fn a_guests_json_number_is_a_number_as_over_http() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    let r = s.get(&format!("/{b}/scripts/h?do=set-json&at=n&json=42"));
    assert_body(&r, "set\n");
    let r = s.request(
        "PATCH",
        &format!("/{b}/n"),
        &[("authorization", "Bearer sk")],
        Some(b"+1"),
    );
    assert_eq!((r.status, r.text().as_str()), (200, "43"));
    let r = s.get(&format!(
        "/{b}/scripts/h?do=set-json&at=o&json=%7B%22a%22%3A1%7D"
    ));
    assert_body(&r, "set\n");
    assert_eq!(s.get(&format!("/{b}/o")).json(), json!({"a": 1}));
    let r = s.get(&format!("/{b}/scripts/h?do=set-json&at=x&json=%7B"));
    assert!(
        r.text().starts_with("set: invalid input: not JSON:"),
        "{}",
        r.text()
    );
}

/// Found by a review: Lua kept any number of headers of any size outside
/// every limit (1,000 headers of 8 MiB took a gigabyte).
#[test]
fn too_many_or_too_large_headers_end_the_run_with_the_response_limit() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    for which in ["many", "big"] {
        let t = misbehave(&s, &b, &format!("headers&which={which}"));
        let detail = assert_limit(&t, &[(500, "script-response-limit")]);
        assert!(detail.contains("100 headers of 65536 bytes"), "{detail}");
    }
    for lua in [
        r#"for i = 1, 101 do kvdb.header("x-h" .. i, "1") end kvdb.say("no")"#,
        r#"for i = 1, 1000 do kvdb.header("x-h" .. i, string.rep("a", 8 << 20)) end"#,
    ] {
        install(&s, &b, "lua", lua);
        let t = get_within(&s, &format!("/{b}/scripts/lua"), BOUND);
        let detail = assert_limit(&t, &[(500, "script-response-limit")]);
        assert!(detail.contains("the limit is 100 headers"), "{detail}");
    }
    assert_server_still_answers(&s, &b);
}

/// Found by a review: wasmtime copies a guest's response (and each call's
/// arguments) out of the guest before any of the host's checks, with room
/// for 128 MiB a call, and the host's copy of a header is three times the
/// guest's 16 bytes before its strings. Two million empty headers (32 MiB of
/// zeros that the guest never even wrote) took ~100 MB of server memory a
/// run before the header limit refused them. A run now hands over at most
/// the larger of the value and response limits, plus 1 MiB, at once, and
/// wasmtime checks that before it allocates.
#[cfg(target_os = "linux")]
#[test]
fn a_response_of_millions_of_headers_is_refused_before_the_host_copies_it() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    // Memory grown to the default limit (32 MiB); the headers are every 16
    // bytes from 64 KiB on: (ptr 0, len 0) pairs, empty strings.
    let headers = ((32 << 20) - 65_536) / 16;
    let prelude = format!(
        "(drop (memory.grow (i32.const 511)))
      (i32.store16 (i32.const 0) (i32.const 200))
      (i32.store (i32.const 4) (i32.const 65536))
      (i32.store (i32.const 8) (i32.const {headers}))
      (i32.store (i32.const 12) (i32.const 100))
      (i32.store (i32.const 16) (i32.const 3))
      (return (i32.const 0))"
    );
    install_wasm(&s, &b, "flood", &wat_component("", &prelude));
    let before = crate::lua_sandbox::peak_memory(s.pid());
    let runs: Vec<Timed> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| get_within(&s, &format!("/{b}/scripts/flood"), BOUND)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("run"))
            .collect()
    });
    let grown = crate::lua_sandbox::peak_memory(s.pid()).saturating_sub(before);
    for t in &runs {
        let detail = assert_limit(t, &[(500, "script-memory-limit")]);
        assert!(detail.contains("handed the host more than"), "{detail}");
        assert!(
            detail.contains("--max-value-bytes and --script-response-bytes"),
            "{detail}"
        );
    }
    assert!(grown < 100_000_000, "the server grew by {grown} bytes");
    assert_server_still_answers(&s, &b);
}

/// A hand-written component that asks WASI for `len` random bytes (into a
/// memory grown to room for them), then answers `ok`.
fn random_bytes_component(len: u64) -> Vec<u8> {
    let text = format!(
        r#"(component
  (import "wasi:random/random@0.2.0" (instance $random
    (export "get-random-bytes" (func (param "len" u64) (result (list u8))))))
  (core module $Mem
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 1024))
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.const 7)) (i32.const -8)))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (local.get $p)))
  (core instance $mem (instantiate $Mem))
  (core func $bytes (canon lower (func $random "get-random-bytes")
    (memory (core memory $mem "memory")) (realloc (core func $mem "cabi_realloc"))))
  (core module $Main
    (import "mem" "memory" (memory 1))
    (import "random" "bytes" (func $bytes (param i64 i32)))
    (data (i32.const 100) "ok\n")
    (func (export "handle") (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (drop (memory.grow (i32.const {pages})))
      (call $bytes (i64.const {len}) (i32.const 200))
      {ANSWER_OK}))
  (core instance $main (instantiate $Main
    (with "mem" (instance $mem))
    (with "random" (instance (export "bytes" (func $bytes))))))
  {export})"#,
        pages = len.div_ceil(65_536) + 1,
        export = handle_export("$mem"),
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// WASI lets a guest ask for up to 64 MiB of random bytes in one call, which
/// the host allocates before the guest's memory limit can refuse them: a run
/// may ask for at most 1 MiB at a time (a guest needs a few bytes).
#[test]
fn a_guest_gets_at_most_a_mebibyte_of_random_bytes_at_a_time() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    install_wasm(&s, &b, "some", &random_bytes_component(1 << 20));
    assert_body(&run(&s, &b, "some"), "ok\n");
    install_wasm(&s, &b, "more", &random_bytes_component((1 << 20) + 1));
    let t = get_within(&s, &format!("/{b}/scripts/more"), BOUND);
    let detail = assert_limit(&t, &[(500, "script-error")]);
    assert!(detail.contains("exceeds limit 1048576"), "{detail}");
    assert_server_still_answers(&s, &b);
}

// ---------------------------------------------------------------------------
// Replacing, restarting, deleting

#[test]
fn reuploading_a_different_component_under_the_same_name_runs_the_new_code() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "v", &hello());
    assert_body(&run(&s, &b, "v?name=one"), "Hello one\n");
    install_wasm(&s, &b, "v", &hostile());
    for _ in 0..2 {
        assert_body(&run(&s, &b, "v?name=one"), "ok\n");
    }
    let listed = scripts_of(&s, &b);
    assert_eq!(listed[0]["size"], hostile().len(), "{listed}");
    // Back to the first component (compiled before, still cached).
    install_wasm(&s, &b, "v", &hello());
    assert_body(&run(&s, &b, "v?name=two"), "Hello two\n");
    // Lua replaces WebAssembly and the other way round.
    install(&s, &b, "v", "kvdb.say('lua')");
    assert_body(&run(&s, &b, "v"), "lua\n");
    assert_eq!(scripts_of(&s, &b)[0]["kind"], "lua");
    install_wasm(&s, &b, "v", &hostile());
    assert_body(&run(&s, &b, "v"), "ok\n");
    assert_eq!(scripts_of(&s, &b)[0]["kind"], "wasm");
    // A rejected upload leaves the old code in place.
    upload_bytes(&s, &b, "v", b"\0asm\x01\0\0\0", None).assert_problem(400);
    upload_bytes(&s, &b, "v", b"garbage", Some("application/wasm")).assert_problem(400);
    assert_body(&run(&s, &b, "v"), "ok\n");
}

#[test]
fn the_same_component_in_two_buckets_keeps_each_buckets_data() {
    let s = TestServer::start();
    let visitors = component("kvdb_example_visitors");
    let first = script_bucket(&s, "");
    let second = script_bucket(&s, "");
    install_wasm(&s, &first, "count", &visitors);
    install_wasm(&s, &second, "count", &visitors);
    assert_body(&run(&s, &first, "count"), "1\n");
    assert_body(&run(&s, &first, "count"), "2\n");
    assert_body(&run(&s, &second, "count"), "1\n");
    let key = visitors_key();
    assert_eq!(s.get(&format!("/{first}/{key}")).text(), "2");
    assert_eq!(s.get(&format!("/{second}/{key}")).text(), "1");
}

#[test]
fn uploaded_components_still_run_after_a_restart() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    install_wasm(&s, &b, "visitors", &component("kvdb_example_visitors"));
    assert_body(&run(&s, &b, "visitors"), "1\n");
    let s = s.restart_after_kill();
    // Compiled again on first use.
    assert_body(&run(&s, &b, "hello?name=again"), "Hello again\n");
    assert_body(&run(&s, &b, "visitors"), "2\n");
    assert_body(&run(&s, &b, "hello?name=twice"), "Hello twice\n");
    let listed = scripts_of(&s, &b);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert!(
        listed
            .as_array()
            .expect("array")
            .iter()
            .all(|e| e["kind"] == "wasm"),
        "{listed}"
    );
}

/// The compiled code files under the data directory's `compiled/` folder
/// (wasmtime's cache: one file per component, named by a hash without a dot;
/// its bookkeeping files have extensions), with what identifies each write.
fn compiled_files(
    data: &std::path::Path,
) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut dirs = vec![data.join("compiled")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        // The cache's worker thread may be writing (and renaming) its
        // bookkeeping files meanwhile: entries can vanish under the walk.
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if !entry.file_name().to_string_lossy().contains('.')
                && let Ok(meta) = entry.metadata()
            {
                let modified = meta.modified().expect("mtime");
                found.push((entry.path(), meta.ino(), modified, meta.len()));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn compiled_code_is_kept_beside_the_data_and_loaded_after_a_restart() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    assert!(compiled_files(s.data_dir()).is_empty());
    install_wasm(&s, &b, "hello", &hello());
    // The same component again, in another bucket: no second copy.
    let other = script_bucket(&s, "");
    install_wasm(&s, &other, "hello", &hello());
    let before = compiled_files(s.data_dir());
    assert_eq!(before.len(), 1, "{before:?}");
    let s = s.restart_after_kill();
    assert_body(&run(&s, &b, "hello?name=again"), "Hello again\n");
    assert_body(&run(&s, &other, "hello?name=there"), "Hello there\n");
    // Loaded, not compiled again: a compilation would have written the file
    // anew (a new file renamed over it).
    assert_eq!(compiled_files(s.data_dir()), before);
}

#[test]
fn damaged_compiled_code_is_compiled_again() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    let files = compiled_files(s.data_dir());
    assert_eq!(files.len(), 1, "{files:?}");
    let path = files[0].0.clone();
    let len = files[0].3;
    let s = s.restart_after_kill_with(|_| {
        std::fs::write(&path, b"not compiled code").expect("damage the file");
    });
    assert_body(&run(&s, &b, "hello?name=again"), "Hello again\n");
    // Written again, whole.
    let files = compiled_files(s.data_dir());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].0, path);
    assert_eq!(files[0].3, len);
    // And only the cache is touched: with it gone, the script still runs.
    let s = s.restart_after_kill_with(|data| {
        std::fs::remove_dir_all(data.join("compiled")).expect("remove the cache");
    });
    assert_body(&run(&s, &b, "hello?name=thrice"), "Hello thrice\n");
    assert_eq!(compiled_files(s.data_dir()).len(), 1);
}

#[test]
fn an_unusable_folder_for_compiled_code_does_not_stop_the_server() {
    // A file where the folder should be: the server still starts, and
    // components compile in memory (again after each restart).
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("compiled"), b"in the way").expect("a file in the way");
    let s = TestServer::start_on(&data, &[]);
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    assert_body(&run(&s, &b, "hello?name=still"), "Hello still\n");
    let s = s.restart_after_kill();
    assert_body(&run(&s, &b, "hello?name=again"), "Hello again\n");
    assert_eq!(
        std::fs::read(data.join("compiled")).expect("the file"),
        b"in the way"
    );
    drop(s);
}

#[test]
fn the_memory_backend_keeps_no_compiled_code_on_disk() {
    let s = TestServer::start_with(&["--backend", "memory"]);
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    assert_body(&run(&s, &b, "hello?name=mem"), "Hello mem\n");
    assert!(!s.data_dir().join("compiled").exists());
}

#[test]
fn deleting_a_component_answers_204_and_running_it_is_404() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    install_wasm(&s, &b, "kept", &hostile());
    let r = as_sk(&s, "DELETE", &format!("/{b}/scripts/hello"));
    assert_eq!(r.status, 204, "{}", r.text());
    assert_problem_type(&run(&s, &b, "hello"), 404, "script-not-found");
    assert_body(&run(&s, &b, "kept"), "ok\n");
    // Uploaded again: runs again.
    install_wasm(&s, &b, "hello", &hello());
    assert_body(&run(&s, &b, "hello?name=back"), "Hello back\n");
}

#[test]
fn deleting_the_bucket_removes_its_components() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let other = script_bucket(&s, "");
    install_wasm(&s, &b, "hello", &hello());
    install_wasm(&s, &other, "hello", &hello());
    let r = as_sk(&s, "DELETE", &format!("/{b}"));
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    run(&s, &b, "hello").assert_problem(404);
    as_sk(&s, "GET", &format!("/{b}/scripts/")).assert_problem(404);
    assert_body(&run(&s, &other, "hello?name=o"), "Hello o\n");
    // Still gone after a restart.
    let s = s.restart_after_kill();
    run(&s, &b, "hello").assert_problem(404);
    assert_body(&run(&s, &other, "hello?name=o"), "Hello o\n");
}

/// Makes the data calls of `calls` (see the hostile guest's `call`) in a
/// run of the hostile guest as `credential`, answering its lines.
fn calls_as(s: &TestServer, b: &str, credential: &str, calls: serde_json::Value) -> Vec<String> {
    let auth = format!("Bearer {credential}");
    let r = s.request(
        "POST",
        &format!("/{b}/scripts/h?do=calls"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        Some(calls.to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.text().lines().map(str::to_owned).collect()
}

/// Every data call of the `kvdb:script` interface from a guest, with the
/// results the Lua twins give (found by an audit: `exists`, `set` with a
/// ttl, `patch`, `append`, a float `incr`, the list options and
/// `access-token` were implemented but no guest of the tests made them).
#[test]
fn a_guest_makes_every_data_call_of_the_interface() {
    let s = TestServer::start();
    // Closed to anonymous reads and writes: a token's limits show.
    let b = hostile_bucket_with(&s, "read_key=rk&write_key=wk");
    let lines = calls_as(
        &s,
        &b,
        SK,
        json!([
            ["set", "k", "v"],
            ["exists", "k"],
            ["exists", "none"],
            ["get", "none"],
            ["set", "short", "x", "3"],
            ["incr", "f", "1.5"],
            ["incr", "f", "1"],
            ["incr", "k", "1"],
            ["merge", "j", r#"{"a":1}"#],
            ["patch", "j", r#"[{"op":"add","path":"/b","value":2}]"#],
            ["patch", "j", r#"[{"op":"test","path":"/a","value":5}]"#],
            ["append", "r", "ab"],
            ["append", "r", "cd"],
            ["set", "p:1", "1"],
            ["set", "p:2", "2"],
            ["set", "p:3", "3"],
            ["list", "p:", "limit=2"],
            ["list", "p:", "reverse"],
            ["list", "p:", "start=p:1,end=p:3"],
            ["list", "p:", "values,limit=1"],
            ["delete", "k"],
            ["exists", "k"],
            ["token", "p:", "read", "60"],
        ]),
    );
    assert_eq!(lines.len(), 23, "{lines:#?}");
    assert_eq!(
        lines[..10],
        [
            "ok",
            "true",
            "false",
            "nil",
            "ok",
            "1.5",
            "2.5",
            "error: type mismatch: the current value is raw bytes, not a number",
            r#"{"a":1}"#,
            r#"{"a":1,"b":2}"#,
        ],
        "{lines:#?}"
    );
    // A failed `test` is the interface's type mismatch (HTTP's 409).
    assert!(
        lines[10].starts_with("error: type mismatch: the JSON patch does not apply"),
        "{lines:#?}"
    );
    assert_eq!(
        lines[11..22],
        [
            "ab",
            "abcd",
            "ok",
            "ok",
            "ok",
            "p:1 p:2",
            "p:3 p:2 p:1",
            "p:2",
            "p:1=1",
            "true",
            "false"
        ],
        "{lines:#?}"
    );
    // The token it was handed reads under its prefix and nothing else.
    let token = lines[22]
        .strip_prefix("token ")
        .and_then(|t| t.split(' ').next())
        .unwrap_or_else(|| panic!("{lines:#?}"));
    let r = s.request(
        "GET",
        &format!("/{b}/p:1"),
        &[("authorization", &format!("Bearer {token}"))],
        None,
    );
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    let r = s.request(
        "GET",
        &format!("/{b}/r"),
        &[("authorization", &format!("Bearer {token}"))],
        None,
    );
    r.assert_problem(403);
    // The value set with a ttl of 3 s expires.
    assert_eq!(as_sk(&s, "GET", &format!("/{b}/short")).text(), "x");
    std::thread::sleep(Duration::from_millis(3200));
    as_sk(&s, "GET", &format!("/{b}/short")).assert_problem(404);
}

/// The WebAssembly twin of the Lua test of the same name: the scope a run
/// reads is what holds on its whole prefix, so moving the prefix to another
/// user's keys can't write there (found by an audit: no guest test).
#[test]
fn the_scope_a_guest_reads_holds_on_its_whole_prefix_and_assigning_the_prefix_never_widens_it() {
    let s = TestServer::start();
    let b = hostile_bucket_with(&s, "write_key=wk");
    let t = s.token(&b, SK, "prefix=users:1:&permissions=write");
    let lines = calls_as(
        &s,
        &b,
        &t,
        json!([
            ["whoami"],
            ["set", "users:1:x", "mine"],
            ["scope", "users:2:"],
            ["whoami"],
            ["set", "users:2:x", "pwned"],
        ]),
    );
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert_eq!(
        lines[..4],
        ["[] read", "ok", "ok", "[users:2:] read"],
        "{lines:#?}"
    );
    assert!(
        lines[4].starts_with("error: permission denied"),
        "{lines:#?}"
    );
    assert_eq!(s.get(&format!("/{b}/users:1:x")).text(), "mine");
    s.get(&format!("/{b}/users:2:x")).assert_problem(404);
}

/// The WebAssembly twin of the Lua test of the same name: a token a guest
/// hands on can't reach beyond the run's scope.
#[test]
fn an_access_token_wider_than_the_guests_scope_is_refused() {
    let s = TestServer::start();
    let b = hostile_bucket_with(&s, "read_key=rk&write_key=wk");
    let t = s.token(&b, SK, "prefix=p:&permissions=read");
    let lines = calls_as(
        &s,
        &b,
        &t,
        json!([
            ["token", "", "read", "60"],
            ["token", "p:", "write", "60"],
            ["token", "p:", "read,write", "60"],
            ["token", "p:x", "read", "60"],
        ]),
    );
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for refused in &lines[..3] {
        assert!(
            refused.starts_with("error: permission denied"),
            "{lines:#?}"
        );
    }
    assert!(lines[3].starts_with("token "), "{lines:#?}");
}

/// WASI gives a script clocks and random only: no environment variables or
/// arguments, no file system (not even `/`), no socket (not even to this
/// server); found by an audit: nothing tested it.
#[test]
fn a_guest_gets_no_environment_file_system_or_network() {
    let s = TestServer::start();
    let b = hostile_bucket(&s);
    let port = s.base().rsplit(':').next().expect("a port");
    let r = s.get(&format!("/{b}/scripts/h?do=escape&port={port}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[..2], ["env 0", "args 0"], "{text}");
    let fs = lines[3].strip_prefix("fs ").expect("fs line");
    for path in ["/", ".", "/etc/passwd"] {
        assert!(fs.contains(&format!("{path} error ")), "{text}");
    }
    // Refused by the host (WASI's sockets are there, and closed).
    assert_eq!(lines[4], "net error permission denied", "{text}");
    assert_eq!(lines[5], "clock true", "{text}");
}

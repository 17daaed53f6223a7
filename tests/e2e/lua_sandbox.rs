//! Lua scripts that misbehave: sandbox escapes (files, processes, `require`,
//! bytecode, `debug`, `collectgarbage`, tampering that would leak into the
//! next run, finalizers), isolation between runs and buckets, and the limits
//! (time, instructions, memory, stack, response size), each ending only the
//! offending run with its own error while the server keeps answering.

use std::time::Duration;

use crate::harness::{TestServer, assert_log_escaped_and_bounded, assert_script_busy};
use crate::lua_api::{
    SK, Timed, assert_body, assert_problem_type, eval, eval_as, get_in_background, get_within,
    install, run, script_bucket, try_get_within, upload,
};

/// Generous bound for a limit's error to arrive (the limits are far smaller).
const BOUND: Duration = Duration::from_secs(5);

/// A server whose instruction, memory and response limits are small; its
/// time limit is long, so the others are what a run hits.
fn limited() -> TestServer {
    TestServer::start_with(&[
        "--script-time-ms",
        "10000",
        "--script-instructions",
        "5000000",
        "--script-memory-bytes",
        "8000000",
        "--script-response-bytes",
        "10000",
    ])
}

/// A server with a short time limit and practically no instruction limit,
/// so the wall clock is what a run hits.
fn timed() -> TestServer {
    TestServer::start_with(&[
        "--script-time-ms",
        "300",
        "--script-instructions",
        "1000000000000",
    ])
}

/// A server where a run may take 6 s of wall time and practically any number
/// of instructions: runs that other requests must not wait for.
fn long_runs_server() -> TestServer {
    TestServer::start_with(&[
        "--script-time-ms",
        "6000",
        "--script-instructions",
        "1000000000000",
    ])
}

/// Uploads `source` and runs it, failing if no answer comes within [`BOUND`].
#[track_caller]
fn eval_within(s: &TestServer, b: &str, name: &str, source: &str) -> Timed {
    install(s, b, name, source);
    get_within(s, &format!("/{b}/scripts/{name}"), BOUND)
}

/// Asserts a limit's problem document.
#[track_caller]
fn assert_limit(t: &Timed, status: u16, kinds: &[&str]) {
    assert_eq!(t.status, status, "{}", t.body);
    let doc = t.json();
    let kind = doc["type"].as_str().unwrap_or_default();
    assert!(
        kinds
            .iter()
            .any(|k| kind == format!("urn:kvdb:problem:{k}")),
        "type {kind}, expected one of {kinds:?}: {doc}"
    );
    assert_eq!(doc["status"], status);
    // Each says what to do: less per request, or the operator's flag.
    let flag = match kind.trim_start_matches("urn:kvdb:problem:") {
        "script-instruction-limit" => "--script-instructions",
        "script-time-limit" => "--script-time-ms",
        "script-memory-limit" => "--script-memory-bytes",
        "script-response-limit" => "--script-response-bytes",
        _ => "",
    };
    assert!(
        doc["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty() && d.contains(flag)),
        "{doc}"
    );
    assert!(t.elapsed < BOUND, "took {:?}", t.elapsed);
}

/// After a run hit a limit: a normal script, a plain GET and another bucket's
/// script all still work.
#[track_caller]
fn assert_server_still_answers(s: &TestServer, b: &str) {
    install(s, b, "normal", "kvdb.say('still here')");
    let t = get_within(s, &format!("/{b}/scripts/normal"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "still here\n"));
    let t = get_within(s, &format!("/{b}/plain"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "value"));
    let other = script_bucket(s, "");
    install(s, &other, "other", "kvdb.say(1 + 1)");
    let t = get_within(s, &format!("/{other}/scripts/other"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "2\n"));
}

/// A bucket for limit tests, with a plain value to read back afterwards.
fn limit_bucket(s: &TestServer) -> String {
    let b = script_bucket(s, "");
    assert_eq!(s.put(&format!("/{b}/plain"), "value").status, 204);
    b
}

// ---------------------------------------------------------------------------
// Escapes

#[test]
fn dangerous_globals_and_library_functions_are_absent() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval_as(
        &s,
        &b,
        r#"local names = {"io", "require", "dofile", "loadfile", "load", "loadstring",
  "debug", "collectgarbage", "package", "rawset", "module", "setfenv", "getfenv",
  "newproxy", "coroutine", "jit", "ffi", "arg"}
for _, n in ipairs(names) do
  if _G[n] ~= nil or _ENV[n] ~= nil or rawget(_G, n) ~= nil then kvdb.say("present: ", n) end
end
for _, n in ipairs({"execute", "exit", "getenv", "remove", "rename", "tmpname", "setlocale"}) do
  if os[n] ~= nil then kvdb.say("present: os.", n) end
end
if string.dump ~= nil then kvdb.say("present: string.dump") end
kvdb.say("checked")"#,
        SK,
    );
    assert_body(&r, "checked\n");
}

#[test]
fn file_process_and_module_access_fail_safely() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("pwned");
    let marker = marker.to_str().expect("utf-8 path");
    let source = format!(
        r#"local marker = "{marker}"
local attempts = {{
  function() return io.open(marker, "w"):write("x") end,
  function() return io.popen("touch " .. marker) end,
  function() return os.execute("touch " .. marker) end,
  function() return os.remove("/etc/hostname") end,
  function() return os.getenv("HOME") end,
  function() return os.exit(1) end,
  function() return require("io") end,
  function() return require("os").execute("touch " .. marker) end,
  function() return dofile("/etc/passwd") end,
  function() return loadfile("/etc/passwd") end,
  function() return load("return 1")() end,
  function() return package.loadlib("libc.so.6", "system") end,
  function() return debug.getregistry() end,
  function() return debug.sethook() end,
  function() return collectgarbage("count") end,
  function() return string.dump(print) end,
  function() return coroutine.wrap(function() end)() end,
}}
local failed = 0
for i, f in ipairs(attempts) do
  local ok = pcall(f)
  if ok then kvdb.say("attempt ", i, " succeeded") else failed = failed + 1 end
end
kvdb.say(failed, " of ", #attempts, " failed")"#
    );
    let r = eval_as(&s, &b, &source, SK);
    assert_body(&r, "17 of 17 failed\n");
    assert!(!std::path::Path::new(marker).exists(), "a file was created");
    // The server process is alive and well.
    assert_body(&eval(&s, &b, "kvdb.say('alive')"), "alive\n");
}

#[test]
fn bytecode_uploads_are_refused() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    // The header of a Lua 5.4 binary chunk, then junk.
    let mut chunk = b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08".to_vec();
    chunk.extend_from_slice(&[0x78, 0x56, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
    upload(&s, &b, "bin", &chunk).assert_problem(400);
    assert_problem_type(&run(&s, &b, "bin"), 404, "script-not-found");
    // Nor can a script load code at run time, text or binary.
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring(load), " ", tostring(loadstring), " ", tostring(string.dump))"#,
    );
    assert_body(&r, "nil nil nil\n");
}

#[test]
fn a_bad_os_date_format_fails_safely() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(tostring((pcall(os.date, "%Q"))))
kvdb.say(tostring((pcall(os.date, "%E"))))
kvdb.say(type(os.date("%c")))"#,
    );
    assert_body(&r, "false\nfalse\nstring\n");
}

/// `os.date` works its format in C, where the run's limits never look: a
/// format of millions of conversions held a worker seconds past the time
/// limit. A format is at most 4096 bytes; one that long still works.
#[test]
fn an_os_date_format_of_millions_of_conversions_is_refused() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        r#"local ok, err = pcall(os.date, string.rep("%%", 7000000))
kvdb.say(tostring(ok), " ", (string.gsub(tostring(err), "^[^:]*:%d+: ", "")))
kvdb.say(#os.date(string.rep("%%", 2048)))
kvdb.say(os.date("!%Y", 0))"#,
    );
    assert_body(
        &r,
        "false os.date: a format of more than 4096 bytes: use a shorter one, or several calls\n2048\n1970\n",
    );
}

// ---------------------------------------------------------------------------
// Isolation between runs and buckets

#[test]
fn a_global_set_in_one_run_is_nil_in_the_next() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let other = script_bucket(&s, "");
    let source = r#"kvdb.say(tostring(leaked), " ", tostring(rawget(_G, "also")), " ", tostring(_G.third))
leaked = "yes"
_G.also = "yes"
_ENV.third = "yes"
function defined() end"#;
    install(&s, &b, "g", source);
    install(&s, &other, "g", source);
    for _ in 0..3 {
        assert_body(&run(&s, &b, "g"), "nil nil nil\n");
        assert_body(&run(&s, &other, "g"), "nil nil nil\n");
    }
    assert_body(&eval(&s, &b, "kvdb.say(tostring(defined))"), "nil\n");
}

/// The generator behind `math.random` belongs to a pooled state that runs
/// every bucket's scripts: a run that seeds it (or reads ahead) must not fix
/// the numbers of the next run, in this bucket or another.
#[test]
fn math_randomseed_in_one_run_does_not_fix_the_numbers_of_the_next() {
    let s = TestServer::start();
    let a = script_bucket(&s, "");
    let b = script_bucket(&s, "");
    install(
        &s,
        &a,
        "seed",
        r#"math.randomseed(42) kvdb.say(math.random(1, 1000000000))"#,
    );
    install(
        &s,
        &b,
        "rng",
        r#"kvdb.say(math.random(1, 1000000000), " ", math.random(1, 1000000000))"#,
    );
    let mut seeded = Vec::new();
    let mut others = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = run(&s, &a, "seed");
        assert_eq!(r.status, 200, "{}", r.text());
        seeded.push(r.text());
        let r = run(&s, &b, "rng");
        assert_eq!(r.status, 200, "{}", r.text());
        others.insert(r.text());
    }
    // Seeding still makes a run's own numbers repeatable.
    assert!(seeded.iter().all(|t| *t == seeded[0]), "{seeded:?}");
    assert_eq!(others.len(), 4, "the next run's numbers repeat: {others:?}");
}

#[test]
fn library_tables_are_read_only_and_the_next_run_sees_them_intact() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "tamper",
        r#"local attempts = {
  function() string.x = 1 end,
  function() string.rep = nil end,
  function() string.format = function() return "pwned" end end,
  function() math.pi = 3 end,
  function() math.floor = nil end,
  function() table.insert = nil end,
  function() utf8.char = nil end,
  function() os.time = function() return 0 end end,
  function() kvdb.json.encode = nil end,
  function() setmetatable(string, {}) end,
  function() rawequal = nil; string.upper = nil end,
}
local failed = 0
for _, f in ipairs(attempts) do if not pcall(f) then failed = failed + 1 end end
-- The run's own kvdb table and globals are its own to change.
kvdb.say(failed, " of ", #attempts, " failed")
tostring = function() return "pwned" end
kvdb.escape_html = nil"#,
    );
    assert_body(&run(&s, &b, "tamper"), "11 of 11 failed\n");
    let check = r#"kvdb.say(string.rep("ab", 3), " ", ("x"):rep(2), " ", tostring(string.x))
kvdb.say(string.format("%d", 7), " ", math.pi > 3.14, " ", math.floor(2.5))
kvdb.say(kvdb.json.encode({1}), " ", kvdb.escape_html("<"), " ", os.time() > 0)
kvdb.say(type(rawequal) == "function")
local t = {} table.insert(t, "ok") kvdb.say(t[1], " ", utf8.char(72))"#;
    for _ in 0..2 {
        let r = eval(&s, &b, check);
        assert_body(&r, "ababab xx nil\n7 true 2\n[1] &lt; true\ntrue\nok H\n");
        assert_eq!(run(&s, &b, "tamper").status, 200);
    }
}

#[test]
fn metatable_tampering_fails_and_strings_keep_their_methods() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "meta",
        r#"local attempts = {
  function() setmetatable(_G, {__index = function() return "pwned" end}) end,
  function() getmetatable("").__index = {rep = function() return "pwned" end} end,
  function() getmetatable("").__index.rep = nil end,
  function() getmetatable(_G).__index.string = nil end,
  function() getmetatable(string).__index.rep = nil end,
  function() setmetatable(kvdb.scope, {}) end,
  function() getmetatable(kvdb.scope).__newindex = nil end,
  function() getmetatable(kvdb.json).__index.encode = nil end,
}
local failed = 0
for _, f in ipairs(attempts) do if not pcall(f) then failed = failed + 1 end end
kvdb.say(failed, " of ", #attempts, " failed")
kvdb.say(tostring(getmetatable("")), " ", tostring(getmetatable(_G)), " ", tostring(getmetatable(string)))"#,
    );
    assert_body(&run(&s, &b, "meta"), "8 of 8 failed\nfalse false false\n");
    let r = eval(
        &s,
        &b,
        r#"kvdb.say(("a"):rep(3), " ", ("%d-%s"):format(5, "x"), " ", ("abc"):upper(), " ", tostring(undefined_global))"#,
    );
    assert_body(&r, "aaa 5-x ABC nil\n");
}

#[test]
fn finalizers_of_one_run_never_run_in_a_later_run() {
    let s = TestServer::start();
    let a = script_bucket(&s, "");
    let b = script_bucket(&s, "");
    // Garbage with finalizers that would write to whatever bucket is running
    // when they are collected, and into its response.
    install(
        &s,
        &a,
        "plant",
        r#"for i = 1, 200 do
  setmetatable({}, {__gc = function() kvdb.set("pwned", "from A") kvdb.say("LEAK") end})
end
kvdb.say("planted")"#,
    );
    install(
        &s,
        &b,
        "churn",
        r#"local t = {}
for i = 1, 20000 do t[i % 100] = {i, tostring(i)} end
kvdb.say("done")"#,
    );
    // Finalizers are refused outright: the planting run fails, naming `__gc`.
    let r = run(&s, &a, "plant");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("__gc"), "{}", r.text());
    for _ in 0..3 {
        let r = run(&s, &b, "churn");
        assert_body(&r, "done\n");
    }
    s.get(&format!("/{b}/pwned")).assert_problem(404);
}

#[test]
fn a_finalizer_that_never_ends_does_not_hang_the_request() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "gc",
        r#"setmetatable({}, {__gc = function() while true do end end})
while true do end"#,
    );
    // Refused at `setmetatable`, before any endless finalizer can exist.
    assert_limit(&t, 500, &["script-error"]);
    assert_server_still_answers(&s, &b);
}

/// A to-be-closed variable's `__close` ran with Lua's hooks off when a
/// limit stopped the run, so an endless one held a server thread at 100%
/// CPU for ever (found by a review). Scripts that declare one are refused
/// at upload, however the attribute is spelled; `<const>` is fine.
#[test]
fn to_be_closed_variables_are_refused_at_upload() {
    let s = limited();
    let b = limit_bucket(&s);
    for (name, source) in [
        (
            "tbc",
            "local x <close> = setmetatable({}, {__close = function() while true do end end})
             while true do end",
        ),
        (
            "spelled",
            "local x < --[[ hidden ]] close
> = nil
kvdb.say('ran')",
        ),
        (
            "nested",
            "local ok = pcall(function()
  local y <close> = nil
end)
kvdb.say(ok)",
        ),
    ] {
        let r = upload(&s, &b, name, source.as_bytes());
        r.assert_problem(400);
        assert!(r.text().contains("to-be-closed variables"), "{}", r.text());
        assert_problem_type(&run(&s, &b, name), 404, "script-not-found");
    }
    let t = eval_within(
        &s,
        &b,
        "const",
        "local x <const> = 41
kvdb.say(x + 1)",
    );
    assert_eq!((t.status, t.body.as_str()), (200, "42\n"));
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_script_cannot_reach_another_buckets_keys() {
    let s = TestServer::start();
    let a = script_bucket(&s, "read_key=rk");
    let b = script_bucket(&s, "");
    let put = s.request(
        "PUT",
        &format!("/{a}/secret"),
        &[("authorization", "Bearer sk")],
        Some(b"A only"),
    );
    assert_eq!(put.status, 204);
    let source = format!(
        r#"local a = "{a}"
for _, k in ipairs({{"secret", a .. "/secret", "../" .. a .. "/secret", a .. "%2Fsecret"}}) do
  local v, err = kvdb.get(k)
  kvdb.say(tostring(v))
end
kvdb.say(#kvdb.list(""))
kvdb.print((kvdb.access_token{{permissions = {{"read"}}}}))"#
    );
    let r = eval_as(&s, &b, &source, SK);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..5], ["nil", "nil", "nil", "nil", "0"], "{text}");
    // A token issued by bucket B's script is no key to bucket A.
    let auth = format!("Bearer {}", lines[5]);
    let r = s.request(
        "GET",
        &format!("/{a}/secret"),
        &[("authorization", auth.as_str())],
        None,
    );
    r.assert_problem(401);
}

// ---------------------------------------------------------------------------
// Limits

#[test]
fn an_endless_loop_ends_with_the_instruction_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(&s, &b, "spin", "while true do end");
    assert_limit(&t, 500, &["script-instruction-limit"]);
    let t = eval_within(
        &s,
        &b,
        "count",
        "local n = 0 for i = 1, 1e12 do n = n + i end kvdb.say(n)",
    );
    assert_limit(&t, 500, &["script-instruction-limit"]);
    assert_server_still_answers(&s, &b);
}

#[test]
fn an_endless_loop_ends_with_the_time_limit() {
    let s = timed();
    let b = limit_bucket(&s);
    let t = eval_within(&s, &b, "spin", "kvdb.say('started') while true do end");
    assert_limit(&t, 504, &["script-time-limit"]);
    let t = eval_within(
        &s,
        &b,
        "clock",
        "while true do local c = os.clock() local d = os.date() end",
    );
    assert_limit(&t, 504, &["script-time-limit"]);
    assert_server_still_answers(&s, &b);
}

/// The `pcall` forms around an endless loop that must not outlive a limit.
const PCALL_ESCAPES: &[&str] = &[
    "pcall(function() while true do end end) kvdb.say('escaped')",
    "for i = 1, 100 do pcall(function() while true do end end) end kvdb.say('escaped')",
    "xpcall(function() while true do end end, function(e) return e end) kvdb.say('escaped')",
    "pcall(pcall, pcall, function() while true do end end) kvdb.say('escaped')",
    "local ok, err = pcall(function() while true do end end) error('again: ' .. tostring(err))",
    "while true do pcall(function() while true do end end) end",
];

/// Runs every escape on `s`; the ones that did not end with the limit's
/// error (status and problem type) within [`BOUND`], with what they did.
fn escapes_past(s: &TestServer, status: u16, kind: &str) -> Vec<String> {
    let b = limit_bucket(s);
    let mut wrong = Vec::new();
    for (i, source) in PCALL_ESCAPES.iter().enumerate() {
        let name = format!("escape{i}");
        install(s, &b, &name, source);
        match try_get_within(s, &format!("/{b}/scripts/{name}"), BOUND) {
            None => wrong.push(format!("{source}: no answer within {BOUND:?}")),
            Some(t) => {
                let ok = t.status == status
                    && serde_json::from_str::<serde_json::Value>(&t.body)
                        .is_ok_and(|d| d["type"] == format!("urn:kvdb:problem:{kind}"));
                if !ok {
                    wrong.push(format!("{source}: {} {}", t.status, t.body));
                }
            }
        }
    }
    assert_server_still_answers(s, &b);
    wrong
}

#[test]
fn endless_runs_on_every_worker_do_not_hold_up_other_requests() {
    // More endless runs at once than the server has async workers: each
    // leaves its worker after its first slice, so the server still answers.
    let s = long_runs_server();
    let b = limit_bucket(&s);
    install(&s, &b, "spin", "while true do end");
    let url = s.url(&format!("/{b}/scripts/spin"));
    let spinning: Vec<_> = (0..4).map(|_| get_in_background(url.clone())).collect();
    assert_not_held_up_by(&s, &b, spinning, "the endless runs");
}

/// While the `running` requests (runs of 6 s on `s`, started just before)
/// go on, a plain GET of `b` and another bucket's script answer well before
/// they end; then each of them ends with the time limit.
#[track_caller]
fn assert_not_held_up_by(
    s: &TestServer,
    b: &str,
    running: Vec<std::thread::JoinHandle<Result<u16, ureq::Error>>>,
    what: &str,
) {
    std::thread::sleep(Duration::from_millis(300));
    // Far below the runs' 6 s, with room for a loaded machine.
    let quick = Duration::from_millis(4000);
    let t = try_get_within(s, &format!("/{b}/plain"), quick)
        .unwrap_or_else(|| panic!("a plain GET waited for {what}"));
    assert_eq!((t.status, t.body.as_str()), (200, "value"));
    let other = script_bucket(s, "");
    install(s, &other, "other", "kvdb.say(1 + 1)");
    let t = try_get_within(s, &format!("/{other}/scripts/other"), quick)
        .unwrap_or_else(|| panic!("another bucket's script waited for {what}"));
    assert_eq!((t.status, t.body.as_str()), (200, "2\n"));
    for run in running {
        assert_eq!(run.join().expect("thread").expect(what), 504);
    }
}

/// Endless code that Lua calls from C, where it can't suspend a run (a
/// metamethod called by a library function, a sort comparator, an `xpcall`
/// handler): a run leaves its async worker before it can get there, so more
/// such runs at once than the server has workers do not hold up other
/// requests (two of them held every bucket's requests for their whole time
/// limit; found by a review).
#[test]
fn code_called_from_c_on_every_worker_does_not_hold_up_other_requests() {
    let s = long_runs_server();
    let b = limit_bucket(&s);
    let endless = "function() while true do end end";
    let calls = [
        format!("kvdb.say(setmetatable({{}}, {{__tostring = {endless}}}))"),
        format!("tostring(setmetatable({{}}, {{__tostring = {endless}}}))"),
        format!("string.format('%s', setmetatable({{}}, {{__tostring = {endless}}}))"),
        format!("for _ in ipairs(setmetatable({{}}, {{__index = {endless}}})) do end"),
        format!(
            "table.concat(setmetatable({{}}, {{__len = function() return 2 end, __index = {endless}}}))"
        ),
        format!("table.sort({{3, 2, 1}}, {endless})"),
        format!("xpcall(function() error('x') end, {endless})"),
    ];
    let running = run_each_in_background(&s, &b, &calls);
    assert_not_held_up_by(&s, &b, running, "the code called from C");
}

/// Uploads each of `sources` as a script of its own (a script that held a
/// worker starts its later runs elsewhere), all before the first run, then
/// runs each in the background.
fn run_each_in_background(
    s: &TestServer,
    b: &str,
    sources: &[impl AsRef<str>],
) -> Vec<std::thread::JoinHandle<Result<u16, ureq::Error>>> {
    let urls: Vec<String> = sources
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let name = format!("each{i}");
            install(s, b, &name, source.as_ref());
            s.url(&format!("/{b}/scripts/{name}"))
        })
        .collect();
    urls.into_iter().map(get_in_background).collect()
}

/// A loop of long library or `kvdb` calls (each one VM instruction to the
/// hook, which looks every thousand): a run on an async worker leaves it at
/// the first call past its slice, so more such runs at once than the server
/// has workers do not hold up other requests (they held them for the whole
/// time limit; found by a review).
#[test]
fn loops_of_long_calls_on_every_worker_do_not_hold_up_other_requests() {
    let s = long_runs_server();
    let b = limit_bucket(&s);
    let loops = [
        r#"local s = ("\1"):rep(2000000) while true do local u = string.format("%q", s) end"#,
        r#"local j = "[" .. ("0,"):rep(200000) .. "0]" while true do local t = kvdb.json.decode(j) end"#,
        r#"local h = ("<"):rep(1000000) while true do local e = kvdb.escape_html(h) end"#,
        r#"local t = {("x"):rep(200000):byte(1, -1)} while true do local e = kvdb.json.encode(t) end"#,
    ];
    let running = run_each_in_background(&s, &b, &loops);
    assert_not_held_up_by(&s, &b, running, "the loops of long calls");
}

/// With `--script-runs 8`, one bucket's Lua runs hold at most 2 (a quarter)
/// at once: while two endless runs (whose clients hung up) go on, the
/// bucket's next run, even a quick one, is a 503 `script-busy` with
/// `Retry-After: 1` at once, while plain requests and another bucket's
/// scripts go on; the share comes back as the runs end at their time limit.
#[test]
fn one_bucket_holds_at_most_a_quarter_of_the_lua_runs() {
    use std::time::Instant;
    const TIME: Duration = Duration::from_millis(3000);
    let s = TestServer::start_with(&[
        "--script-runs",
        "8",
        "--script-time-ms",
        "3000",
        "--script-instructions",
        "1000000000000",
    ]);
    let b = limit_bucket(&s);
    install(&s, &b, "spin", "while true do end");
    install(&s, &b, "quick", "kvdb.say('quick')");
    let quick = format!("/{b}/scripts/quick");
    assert_eq!(s.get(&quick).text(), "quick\n");
    let started = Instant::now();
    for _ in 0..2 {
        s.get_and_hang_up(&format!("/{b}/scripts/spin"), Duration::from_millis(50));
    }
    // Once both endless runs have started (a quick run may come first on
    // a loaded machine), the bucket's next run is refused.
    let refused = loop {
        let r = s.get(&quick);
        if r.status != 200 {
            break r;
        }
        assert!(
            started.elapsed() < TIME - Duration::from_millis(500),
            "two endless runs never filled the bucket's share"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_script_busy(&refused, "this bucket already has 2 Lua script runs");
    // Nothing else is held to this bucket's share.
    let t = get_within(&s, &format!("/{b}/plain"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "value"));
    let other = script_bucket(&s, "");
    install(&s, &other, "other", "kvdb.say(1 + 1)");
    let t = get_within(&s, &format!("/{other}/scripts/other"), BOUND);
    assert_eq!((t.status, t.body.as_str()), (200, "2\n"));
    // The endless runs end at their time limit and give their places back.
    let deadline = Instant::now() + TIME + BOUND;
    loop {
        let t = get_within(&s, &quick, BOUND);
        if t.status == 200 {
            assert_eq!(t.body, "quick\n");
            break;
        }
        assert_eq!(t.status, 503, "{}", t.body);
        assert!(
            Instant::now() < deadline,
            "the share never came back: {}",
            t.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.elapsed() >= TIME, "{:?}", started.elapsed());
}

#[test]
fn pcall_around_an_endless_loop_still_ends_with_the_instruction_limit() {
    let wrong = escapes_past(&limited(), 500, "script-instruction-limit");
    assert!(wrong.is_empty(), "escaped the limit:\n{}", wrong.join("\n"));
}

#[test]
fn pcall_around_an_endless_loop_still_ends_with_the_time_limit() {
    let wrong = escapes_past(&timed(), 504, "script-time-limit");
    assert!(wrong.is_empty(), "escaped the limit:\n{}", wrong.join("\n"));
}

#[test]
fn an_endless_message_handler_still_ends_with_the_time_limit() {
    let s = timed();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "handler",
        "xpcall(function() while true do end end, function() while true do end end)",
    );
    assert_limit(&t, 504, &["script-time-limit"]);
    assert_server_still_answers(&s, &b);
}

#[test]
fn an_error_object_with_an_endless_tostring_ends_with_a_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "custom",
        r#"error(setmetatable({}, {__tostring = function() return "custom message" end}))"#,
    );
    assert_eq!(t.status, 500, "{}", t.body);
    assert_eq!(t.json()["type"], "urn:kvdb:problem:script-error");
    assert!(t.body.contains("custom message"), "{}", t.body);
    let t = eval_within(
        &s,
        &b,
        "endless",
        "error(setmetatable({}, {__tostring = function() while true do end end}))",
    );
    assert_limit(&t, 500, &["script-instruction-limit"]);
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_pathological_pattern_ends_with_the_time_limit() {
    let s = timed();
    let b = limit_bucket(&s);
    // Few VM instructions, but backtracking without end inside one call of
    // each pattern function.
    let calls = [
        r#"local s = ("a"):rep(3000) kvdb.say(tostring(s:find(("a-"):rep(6) .. "b")))"#,
        r#"kvdb.say(tostring(("a"):rep(40):match(("a*"):rep(12) .. "b")))"#,
        r#"for w in ("a"):rep(40):gmatch(("a*"):rep(12) .. "b") do kvdb.say(w) end"#,
        r#"kvdb.say((("a"):rep(40):gsub(("a*"):rep(12) .. "b", "x")))"#,
        r#"kvdb.say((("a"):rep(40):gsub(("a*"):rep(12) .. "b", string.upper)))"#,
        r#"kvdb.say(tostring(pcall(string.find, ("a"):rep(40), ("a*"):rep(12) .. "b")))"#,
        // Steps that each scan a long set, or compare a long capture.
        r#"kvdb.say(tostring(("a"):rep(1e6):find("[" .. ("b"):rep(2^20) .. "]")))"#,
        // (8 MiB: making a string of 16 needs the limit's 32 MiB twice
        // over for a moment, the buffer and the string.)
        r#"kvdb.say(tostring(("a"):rep(2^23):find("(.*)%1x")))"#,
    ];
    for (i, source) in calls.iter().enumerate() {
        let t = eval_within(&s, &b, &format!("pattern{i}"), source);
        assert_limit(&t, 504, &["script-time-limit"]);
    }
    assert_server_still_answers(&s, &b);
}

/// A pattern call that runs long on the async worker that took its request
/// goes on in `block_in_place` once the run's slice is over, and a `gsub`
/// replacement function is Lua code the hook suspends (the port calls it
/// from Lua), as any Lua code: more such runs at once than the server has
/// workers do not hold up other requests.
#[test]
fn long_pattern_calls_on_every_worker_do_not_hold_up_other_requests() {
    let s = long_runs_server();
    let b = limit_bucket(&s);
    // Each first run of a script starts on a worker: one script each, all
    // uploaded before the first run (an upload must not wait for them).
    // More than the workers, within a bucket's share of the runs.
    let runs = (2 * std::thread::available_parallelism().map_or(2, usize::from)).min(32);
    let urls: Vec<String> = (0..runs)
        .map(|i| {
            let name = format!("long{i}");
            let call = if i % 2 == 0 {
                r#"("a"):rep(40):find(("a*"):rep(12) .. "b")"#
            } else {
                r#"("a"):gsub("a", function() while true do end end)"#
            };
            install(
                &s,
                &b,
                &name,
                &format!("-- {i}\nkvdb.say(tostring({call}))"),
            );
            s.url(&format!("/{b}/scripts/{name}"))
        })
        .collect();
    let running = urls.into_iter().map(get_in_background).collect();
    assert_not_held_up_by(&s, &b, running, "the long pattern calls");
}

#[test]
fn a_memory_bomb_ends_with_the_memory_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    let bombs = [
        r#"local s = string.rep("x", 1e9) kvdb.say(#s)"#,
        r#"local s = "x" while true do s = s .. s end"#,
        r#"local t = {} local i = 0 while true do i = i + 1 t[i] = ("x"):rep(1000) .. i end"#,
        r#"local t = {} for i = 1, 1e8 do t[i] = i end"#,
        r#"local s = ("x"):rep(1000000) local t = {} for i = 1, 100 do t[i] = s .. i end"#,
        r#"kvdb.say(table.concat({("x"):rep(4000000), ("y"):rep(4000000), ("z"):rep(4000000)}))"#,
        // gsub builds a string replacement's result outside Lua, a function's
        // in a Lua table: both are held to the limit.
        r#"kvdb.say(#(("x"):rep(100000):gsub("x", ("y"):rep(1000))))"#,
        r#"kvdb.say(#(("x"):rep(100000):gsub("x", function() return ("y"):rep(1000) end)))"#,
        // One match whose replacement copies it half a million times
        // (512 GiB): held to the limit as it grows.
        r#"kvdb.say(#(("x"):rep(2^20):gsub(".+", ("%0"):rep(2^19))))"#,
    ];
    for (i, source) in bombs.iter().enumerate() {
        let t = eval_within(&s, &b, &format!("bomb{i}"), source);
        assert_limit(&t, 500, &["script-memory-limit"]);
    }
    assert_server_still_answers(&s, &b);
}

#[test]
fn deep_recursion_ends_with_the_stack_or_memory_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    let deep = [
        "local function f() return 1 + f() end f()",
        "local function f(n) local a, b, c = n, n, n return f(n + 1) + a end f(1)",
        "local t = setmetatable({}, {__index = function(t, k) return t[k] end}) return t.x",
        r#"local function g(s) return (s:gsub(".", g)) end g("x")"#,
        "local t = setmetatable({}, {__tostring = function(t) return tostring(t) end}) kvdb.say(t)",
    ];
    for (i, source) in deep.iter().enumerate() {
        let t = eval_within(&s, &b, &format!("deep{i}"), source);
        assert_limit(&t, 500, &["script-stack-limit", "script-memory-limit"]);
    }
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_huge_response_ends_with_the_response_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    // Exactly at the limit is fine.
    let t = eval_within(&s, &b, "fits", r#"kvdb.print(("x"):rep(10000))"#);
    assert_eq!((t.status, t.body.len()), (200, 10000));
    for (i, source) in [
        r#"while true do kvdb.say(("x"):rep(1000)) end"#,
        r#"kvdb.print(("x"):rep(10001))"#,
        r#"for i = 1, 10001 do kvdb.print("x") end"#,
        r#"for i = 1, 100 do pcall(kvdb.say, ("x"):rep(1000)) end kvdb.say("escaped")"#,
    ]
    .iter()
    .enumerate()
    {
        let t = eval_within(&s, &b, &format!("big{i}"), source);
        assert_limit(&t, 500, &["script-response-limit"]);
        assert!(t.body.len() < 2000, "the problem is sent, not the body");
    }
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_run_past_its_response_limit_writes_nothing_more() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "past",
        r#"pcall(kvdb.print, ("x"):rep(20000))
kvdb.set("after_limit", 1)"#,
    );
    assert_limit(&t, 500, &["script-response-limit"]);
    s.get(&format!("/{b}/after_limit")).assert_problem(404);
}

#[test]
fn a_limit_in_one_run_leaves_the_next_runs_state_clean() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "dirty",
        r#"leftover = ("x"):rep(1000) kvdb.status(201) kvdb.header("x-left", "1") while true do end"#,
    );
    assert_limit(&t, 500, &["script-instruction-limit"]);
    let r = eval(&s, &b, "kvdb.say(tostring(leftover))");
    assert_body(&r, "nil\n");
    assert_eq!(r.header("x-left"), None);
    assert_server_still_answers(&s, &b);
}

#[test]
fn a_runtime_error_after_output_is_a_script_error_not_a_partial_body() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let r = eval(
        &s,
        &b,
        "kvdb.say('partial')\nkvdb.status(201)\nerror('late')",
    );
    let detail = assert_problem_type(&r, 500, "script-error");
    assert!(
        detail.contains(":3:") && detail.contains("late"),
        "{detail}"
    );
    assert!(!r.text().contains("partial"));
}

// ---------------------------------------------------------------------------
// Host-side copies and output (found by a review)

/// The peak resident memory of a process, in bytes (Linux).
#[cfg(target_os = "linux")]
pub fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM")
}

/// The fields of a JSON object body are read without building the document:
/// a `serde_json::Value` of a 15 MB `{"a":[0,0,…]}` grew the server by
/// 400 MB, for anyone who could run a script, before any of its limits
/// applied (found by a review). A field that is not a string comes as its
/// JSON text, as sent.
#[cfg(target_os = "linux")]
#[test]
fn a_large_json_object_body_is_read_as_fields_without_building_the_document() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "fields",
        r#"kvdb.say(#kvdb.var.a, " ", kvdb.var.s, " ", kvdb.var.l, " ", kvdb.var.o)"#,
    );
    let mut body = br#"{"s": "x\u00e9", "l": [1, 2], "o": {"k": null}, "a": ["#.to_vec();
    body.extend(b"0,".repeat(6_000_000));
    body.extend(b"0]}");
    let before = crate::lua_sandbox::peak_memory(s.pid());
    let r = s.request(
        "POST",
        &format!("/{b}/scripts/fields"),
        &[("content-type", "application/json")],
        Some(&body),
    );
    let grown = crate::lua_sandbox::peak_memory(s.pid()).saturating_sub(before);
    assert!(grown < 100_000_000, "the server grew by {grown} bytes");
    assert_body(&r, "12000003 x\u{e9} [1, 2] {\"k\": null}\n");
}

/// Runs `run` while `n` clients merge into a JSON value of ~4 MB under `key`
/// in bucket `b` (secret key `sk`): JSON operations on large values are made
/// one at a time, so a script's own merge into it waits behind theirs.
/// Returns what `run` returned, when it returned and when the last merge was
/// answered (both from when the merges started).
pub fn with_merges_queued<T: Send>(
    s: &TestServer,
    b: &str,
    key: &str,
    n: usize,
    run: impl FnOnce() -> T + Send,
) -> (T, Duration, Duration) {
    let doc = format!("{{\"a\":[{}0]}}", "0,".repeat(2_000_000));
    let r = s.request(
        "PUT",
        &format!("/{b}/{key}"),
        &[("authorization", "Bearer sk")],
        Some(doc.as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        let merges: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| {
                    let r = s.request(
                        "PATCH",
                        &format!("/{b}/{key}"),
                        &[
                            ("authorization", "Bearer sk"),
                            ("content-type", "application/merge-patch+json"),
                        ],
                        Some(br#"{"x":1}"#),
                    );
                    assert_eq!(r.status, 200, "{}", r.text());
                })
            })
            .collect();
        // Time for the merges to be queued.
        std::thread::sleep(Duration::from_millis(300));
        let out = run();
        let answered = started.elapsed();
        for m in merges {
            m.join().expect("merge");
        }
        (out, answered, started.elapsed())
    })
}

/// A write a script waits for (a merge into a large JSON value, queued
/// behind others) stops waiting at the run's time limit, and the run ends
/// with it: no script code runs while it waits, so the hook could not end
/// it, and a run with a 1 s limit answered after 12 s, holding its thread
/// (found by a review).
#[test]
fn a_write_waiting_for_the_store_ends_with_the_time_limit() {
    let s = timed();
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "merge",
        // The run ends with the time limit, and makes no write after the
        // one that stopped waiting.
        r#"local err = kvdb.merge("big", {w = 1})
kvdb.set("after", err or "merged")"#,
    );
    let (r, answered, drained) = with_merges_queued(&s, &b, "big", 8, || {
        get_within(&s, &format!("/{b}/scripts/merge"), BOUND)
    });
    assert!(
        drained > answered + Duration::from_millis(500),
        "the merges ({drained:?}) did not outlast the run ({answered:?}): this proves nothing"
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.elapsed < Duration::from_secs(2), "took {:?}", r.elapsed);
    assert_eq!(s.get(&format!("/{b}/after")).status, 404);
}

/// A script's listing with values holds at most one page's budget of values
/// (32 MiB), even when it is read in two steps (the first 1000 keys, then
/// the rest): the second step had a whole budget of its own, so one call
/// built up to twice that (found by a review). 1100 values of 32 KiB: the
/// first 1000 are 31.25 MiB, and 24 more fill the budget.
#[test]
fn a_script_listing_with_values_holds_one_budget_of_values() {
    // 32 MiB through a debug build's Lua: a time limit with room for a
    // loaded machine (the default 1 s was hit once while CI ran beside it).
    let s = TestServer::start_with(&[
        "--durability",
        "relaxed",
        "--script-memory-bytes",
        "200000000",
        "--script-time-ms",
        "20000",
    ]);
    let b = script_bucket(&s, "");
    let value = "v".repeat(32 * 1024);
    std::thread::scope(|scope| {
        for part in 0..4 {
            let (s, b, value) = (&s, &b, &value);
            scope.spawn(move || {
                for i in (part..1100).step_by(4) {
                    let r = s.request(
                        "PUT",
                        &format!("/{b}/v:{i:04}"),
                        &[("authorization", "Bearer sk")],
                        Some(value.as_bytes()),
                    );
                    assert_eq!(r.status, 204, "{}", r.text());
                }
            });
        }
    });
    let r = eval_as(
        &s,
        &b,
        r#"local page = kvdb.list("v:", {values = true})
local last = page[#page]
kvdb.say(#page, " ", last.key, " ", #last.value)"#,
        SK,
    );
    assert_body(&r, "1024 v:1023 32768\n");
    // Without values, all of them.
    let r = eval_as(&s, &b, r#"kvdb.say(#kvdb.list("v:"))"#, SK);
    assert_body(&r, "1100\n");
}

/// A run's memory limit is counted from what its pooled state keeps between
/// runs, not from what it used when the run started: earlier runs' garbage
/// counted as kept, so a script that fills its memory and catches the error
/// could keep a limit's worth more in each run of the same state (found by
/// a review).
#[test]
fn a_pooled_state_gives_each_run_the_same_memory() {
    let s = TestServer::start_with(&["--script-memory-bytes", "4000000"]);
    let b = script_bucket(&s, "");
    install(
        &s,
        &b,
        "fill",
        r#"local t = {}
while pcall(function() t[#t + 1] = ("x"):rep(1 << 20) end) do end
kvdb.say(#t)"#,
    );
    let held: Vec<String> = (0..6).map(|_| run(&s, &b, "fill").text()).collect();
    assert!(
        held.iter().all(|h| h == &held[0]) && held[0].trim().parse::<u32>().is_ok_and(|n| n <= 4),
        "MiB held by successive runs: {held:?}"
    );
}

/// A table that holds one table many times over is walked once for each
/// (2^24 tables for 24 lines of Lua): the walk to JSON (or by `kvdb.say`) looks at the run's
/// meter and ends with the time limit, and does not hold the async worker
/// past the run's slice (found by a review: seconds, on a worker).
#[test]
fn a_json_walk_of_a_shared_table_ends_with_the_time_limit() {
    let s = timed();
    let b = script_bucket(&s, "");
    for (name, call) in [
        ("encode", "kvdb.json.encode(t)"),
        ("set", r#"kvdb.set("k", t)"#),
        // kvdb.say writes an array's elements, as ngx.say: the same walk.
        ("say", "kvdb.say(t)"),
        ("print", "kvdb.print({t, {t}})"),
    ] {
        install(
            &s,
            &b,
            name,
            &format!("local t = {{}} for i = 1, 24 do t = {{t, t}} end {call} kvdb.say('done')"),
        );
        let t = get_within(&s, &format!("/{b}/scripts/{name}"), BOUND);
        assert_limit(&t, 504, &["script-time-limit"]);
        assert!(
            t.elapsed < Duration::from_secs(2),
            "{name}: took {:?}",
            t.elapsed
        );
    }
}

/// Compiled scripts kept for the next run are bounded by their size, not
/// only by their number: 256 scripts of 250 KB compiled in each pooled
/// state (a table of short string literals takes ~7 times its source)
/// grew a server by gigabytes, outside every run's memory limit (found by
/// a review). Here 24 such scripts, each run by 4 clients at once, twice:
/// ~170 MB more if each state kept them all.
#[cfg(target_os = "linux")]
#[test]
fn compiled_scripts_kept_for_later_runs_are_bounded_in_size() {
    let s = TestServer::start();
    let b = script_bucket(&s, "");
    let names: Vec<String> = (0..24).map(|n| format!("big{n}")).collect();
    for (n, name) in names.iter().enumerate() {
        let mut source = String::from("local t = {");
        for i in 0..20_000 {
            source.push_str(&format!("\"{n:02}x{i:06}\","));
        }
        source.push_str("}\nkvdb.say(#t)");
        assert!(source.len() < 250_000);
        install(&s, &b, name, &source);
    }
    let before = peak_memory(s.pid());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..2 {
                    for name in &names {
                        assert_body(&run(&s, &b, name), "20000\n");
                    }
                }
            });
        }
    });
    let grown = peak_memory(s.pid()).saturating_sub(before);
    assert!(grown < 120_000_000, "the server grew by {grown} bytes");
}

/// A script may hold one large string many times over (references cost it
/// nothing): the host never copies them all out at once. `kvdb.say` writes
/// each argument against the response limit as it comes, and a table made
/// JSON (`json.encode`, `kvdb.set`, a merge) stops at the run's memory limit.
#[cfg(target_os = "linux")]
#[test]
fn many_references_to_a_large_string_are_not_copied_out_whole() {
    let s = limited();
    let b = limit_bucket(&s);
    let before = peak_memory(s.pid());
    let refs = "local s = string.rep('x', 3000000)\nlocal t = {}\nfor i = 1, 100 do t[i] = s end\n";
    let t = eval_within(&s, &b, "say", &format!("{refs}kvdb.say(table.unpack(t))"));
    assert_limit(&t, 500, &["script-response-limit"]);
    for (name, call, words) in [
        (
            "encode",
            "kvdb.json.encode(t)",
            "json.encode: its JSON text would be over 8000000 bytes",
        ),
        (
            "set",
            "error(kvdb.set('big', t) or 'stored')",
            "the table is not JSON: its JSON text would be over 8000000 bytes",
        ),
        (
            "merge",
            "error(kvdb.merge('big', t) or 'merged')",
            "over 8000000 bytes",
        ),
    ] {
        let t = eval_within(&s, &b, name, &format!("{refs}{call}"));
        assert_limit(&t, 500, &["script-error"]);
        assert!(
            t.json()["detail"]
                .as_str()
                .is_some_and(|d| d.contains(words)),
            "{name}: {}",
            t.body
        );
    }
    let grown = peak_memory(s.pid()).saturating_sub(before);
    assert!(grown < 150_000_000, "the server grew by {grown} bytes");
    assert_eq!(s.get(&format!("/{b}/big")).status, 404, "nothing stored");
    assert_server_still_answers(&s, &b);
}

/// JSON text a script decodes (or a stored JSON value it reads) is built
/// into Lua values as it is read, under the run's memory limit: read into
/// a whole document first, 2.6 MB of `[0,0,…]` took ~70 MB outside it.
#[cfg(target_os = "linux")]
#[test]
fn decoding_json_stays_within_the_memory_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    let before = peak_memory(s.pid());
    let t = eval_within(
        &s,
        &b,
        "decode",
        "local text = '[' .. string.rep('0,', 1300000) .. '0]'\nkvdb.json.decode(text)",
    );
    assert_limit(&t, 500, &["script-memory-limit"]);
    let grown = peak_memory(s.pid()).saturating_sub(before);
    assert!(grown < 30_000_000, "the server grew by {grown} bytes");
    // Caught by pcall and raised again, it is still the memory limit (pcall
    // hands a script other host errors as their message, a string).
    let t = eval_within(
        &s,
        &b,
        "decode-again",
        "local text = '[' .. string.rep('0,', 1300000) .. '0]'\n\
         local ok, e = pcall(kvdb.json.decode, text)\n\
         if not ok then error(e) end",
    );
    assert_limit(&t, 500, &["script-memory-limit"]);
    let t = eval_within(
        &s,
        &b,
        "small",
        "local v = kvdb.json.decode('{\"a\": [1, 2.5, \"x\", null, true], \"b\": {}}')\n\
         kvdb.say(#v.a, ' ', math.type(v.a[1]), ' ', v.a[2], ' ', v.a[3], ' ', tostring(v.a[5]), ' ', type(v.b))\n\
         local ok, err = pcall(kvdb.json.decode, '[1] x')\nkvdb.say(tostring(ok), ' ', err)",
    );
    assert_eq!(t.status, 200, "{}", t.body);
    assert!(
        t.body.starts_with("5 integer 2.5 x true table\nfalse ")
            && t.body
                .contains("json.decode: not JSON: trailing characters at line 1 column 5"),
        "{}",
        t.body
    );
    assert_server_still_answers(&s, &b);
}

/// A script's error message is cut in the response: an error can't make an
/// answer larger than the response limit.
#[test]
fn a_huge_error_message_is_cut() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(&s, &b, "huge", "error(string.rep('A', 1000000), 0)");
    assert_limit(&t, 500, &["script-error"]);
    let detail = t.json()["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.len() < 5000, "{} bytes", detail.len());
    assert!(
        detail.contains("… (cut: the message is 10000"),
        "{detail:.200}"
    );
}

/// `print` goes to the server log, escaped (a script can't forge log lines)
/// and at most 64 KiB a run; the run is not slowed by what it can't log.
#[test]
fn a_runs_log_is_escaped_and_bounded() {
    let mut answered = None;
    let log = TestServer::log_while(&[], |s| {
        let b = script_bucket(s, "");
        let t = eval_within(
            s,
            &b,
            "flood",
            "print('one\\nFORGED log line')\n\
             local s = string.rep('y', 4000000)\n\
             for i = 1, 1000 do print(s) end\n\
             kvdb.say('done')",
        );
        answered = Some((t.status, t.body.clone(), t.elapsed));
    });
    let (status, body, elapsed) = answered.expect("ran");
    assert_eq!((status, body.as_str()), (200, "done\n"));
    assert!(elapsed < BOUND, "took {elapsed:?}");
    assert_log_escaped_and_bounded(&log);
}

/// One call of a library function is one VM instruction to the limits'
/// hook, which looks every 1000: a loop of long scans or sorts ran far past
/// its time limit (found by a review). Those functions look at the limits
/// as they start; `table.move` over an absurd range is refused (its range
/// given as numbers or numeric strings); the wrapped functions' errors still
/// name them and the script's line.
#[test]
fn long_scans_and_moves_stay_within_the_limits() {
    let s = timed();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "scan",
        "local s = string.rep('a', 8000000)\nwhile true do s:find('[b]') end",
    );
    assert_limit(&t, 504, &["script-time-limit"]);
    let t = eval_within(
        &s,
        &b,
        "sorts",
        "local t = {} for i = 1, 200000 do t[i] = i end\nwhile true do table.sort(t) end",
    );
    assert_limit(&t, 504, &["script-time-limit"]);
    for end in ["1e15", "'1e15'"] {
        let source = format!("\ntable.move({{}}, 1, {end}, 1, {{}})");
        let t = eval_within(&s, &b, "move", &source);
        assert_limit(&t, 500, &["script-error"]);
        let detail = t.json()["detail"].as_str().unwrap_or_default().to_owned();
        assert!(
            detail.contains("move:2: table.move of more than"),
            "{end}: {detail}"
        );
    }
    // Nor a table.concat over one: its elements are read in C, through
    // __index (a C function there is never seen by the hook; it held a
    // worker two seconds past the time limit; found by a review), or over
    // a range whose size wraps, in table.move too.
    for (name, call) in [
        (
            "concat",
            "table.concat(setmetatable({}, {__index = rawlen}), '', 1, math.maxinteger)",
        ),
        (
            "concatlen",
            "table.concat(setmetatable({}, {__index = rawlen, __len = function() return 1e15 end}))",
        ),
        (
            "concatwrap",
            "table.concat(setmetatable({}, {__index = rawlen}), '', math.mininteger, math.maxinteger)",
        ),
        (
            "movewrap",
            "table.move(setmetatable({}, {__index = rawlen}), math.mininteger, math.maxinteger, 1, {})",
        ),
    ] {
        let t = eval_within(&s, &b, name, &format!("\n{call}"));
        assert_limit(&t, 500, &["script-error"]);
        let detail = t.json()["detail"].as_str().unwrap_or_default().to_owned();
        assert!(
            detail.contains(&format!("{name}:2: table.")) && detail.contains("of more than"),
            "{name}: {detail}"
        );
    }
    let r = eval(
        &s,
        &b,
        "kvdb.say(table.concat({1, 2, 3}, '-'), table.concat({'a', 'b', 'c'}, '', 2), table.concat({}, ','))",
    );
    assert_body(&r, "1-2-3bc\n");
    let t = eval_within(&s, &b, "bad", "\n\nstring.find(nil, 'x')");
    let detail = t.json()["detail"].as_str().unwrap_or_default().to_owned();
    assert!(
        detail.contains("bad:3: bad argument #1 to 'find'"),
        "{detail}"
    );
    let t = eval_within(
        &s,
        &b,
        "fine",
        "local a, b = ('hello world'):find('o w')\n\
         local k, v = ('k=v'):match('(%w+)=(%w+)')\n\
         local n = 0 for _ in ('a b c'):gmatch('%a') do n = n + 1 end\n\
         local r, c = ('a b'):gsub(' ', '_')\n\
         local m = table.move({1, 2, 3}, 1, 3, 2, {})\n\
         kvdb.say(a, b, k, v, n, r, c, #m)",
    );
    assert_eq!((t.status, t.body.as_str()), (200, "57kv3a_b14\n"));
    assert_server_still_answers(&s, &b);
}

/// Library calls that loop in C, where the limits' hook never looks, as
/// long as a script says (found by a review, each held a server thread for
/// seconds to for ever): `string.rep` of an empty piece, `table.insert` and
/// `table.remove` on a table whose `__len` is huge, `table.sort` of copies
/// of a long string, and a loop of `kvdb` calls on long text. Each stays
/// within the limits, and the functions still work.
#[test]
fn c_loops_a_script_can_make_long_stay_within_the_limits() {
    let s = timed();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "rep",
        "kvdb.say(#string.rep('', math.maxinteger), ' ', #(''):rep(1e18, ''), ' ', ('ab'):rep(2, ','), ' ', ('x'):rep(0))",
    );
    assert_eq!((t.status, t.body.as_str()), (200, "0 0 ab,ab \n"));
    let t = eval_within(&s, &b, "rep2", "string.rep('', 1.5)");
    assert_limit(&t, 500, &["script-error"]);
    let huge = "local t = setmetatable({}, {__len = function() return math.maxinteger end})";
    for (name, call) in [
        ("ins", "table.insert(t, 1, 0)"),
        ("rm", "table.remove(t, 1)"),
    ] {
        let t = eval_within(&s, &b, name, &format!("{huge}\n{call}"));
        assert_limit(&t, 500, &["script-error"]);
        let detail = t.json()["detail"].as_str().unwrap_or_default().to_owned();
        assert!(
            detail.contains(&format!("{name}:2: table.")) && detail.contains("shifting more than"),
            "{detail}"
        );
    }
    let t = eval_within(
        &s,
        &b,
        "shift",
        "local t = {1, 2, 3}\ntable.insert(t, 1, 0)\nlocal last = table.remove(t)\n\
         table.insert(t, 9)\nlocal first = table.remove(t, 1)\n\
         kvdb.say(table.concat(t, ','), ' ', last, ' ', first)",
    );
    assert_eq!((t.status, t.body.as_str()), (200, "1,2,9 3 0\n"));
    let t = eval_within(
        &s,
        &b,
        "longsort",
        "local s = string.rep('a', 2000000)\nlocal t = {}\nfor i = 1, 10000 do t[i] = s end\n\
         while true do table.sort(t) end",
    );
    assert_limit(&t, 504, &["script-time-limit"]);
    let t = eval_within(
        &s,
        &b,
        "escapes",
        "local s = string.rep('\"', 1048576)\nwhile true do kvdb.escape_html(s) end",
    );
    assert_limit(&t, 504, &["script-time-limit"]);
    let t = eval_within(
        &s,
        &b,
        "sorted",
        "local t = {'b', 'c', 'a'}\ntable.sort(t)\nlocal n = {3, 1, 2}\n\
         table.sort(n, function(x, y) return x > y end)\n\
         kvdb.say(table.concat(t), table.concat(n))",
    );
    assert_eq!((t.status, t.body.as_str()), (200, "abc321\n"));
    assert_server_still_answers(&s, &b);
}

/// `kvdb.escape_html` builds its result outside Lua's memory limit, up to 6
/// times as long as the text: over the limit it raises instead.
#[test]
fn escape_html_refuses_a_result_over_the_memory_limit() {
    let s = limited();
    let b = limit_bucket(&s);
    let t = eval_within(
        &s,
        &b,
        "big",
        "local ok, err = pcall(kvdb.escape_html, string.rep('\"', 2000000))\n\
         kvdb.say(tostring(ok), ' ', err)\nkvdb.say(kvdb.escape_html('<a href=\"/\">'))",
    );
    assert_eq!(t.status, 200, "{}", t.body);
    assert!(
        t.body.starts_with("false ")
            && t.body.contains(
                "kvdb.escape_html: the escaped text would be 12000000 bytes, over the script's memory limit"
            ),
        "{}",
        t.body
    );
    assert!(
        t.body.ends_with("&lt;a href=&quot;&#x2F;&quot;&gt;\n"),
        "{}",
        t.body
    );
}

/// CPU time (user + system, in clock ticks) the process has used (Linux).
#[cfg(target_os = "linux")]
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After the command name in parentheses: fields 14 and 15 of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

/// A generic `for`'s fourth value is closed like a `<close>` variable, and
/// can't be refused at upload. When a limit stops a run, its endless
/// `__close` must not run outside the limits: with mlua's hook it ran with
/// Lua's hooks off and held a thread at 100% CPU for ever (found by a
/// review). On the run's thread, in a `pcall`, and inside a `table.sort`
/// comparator (where Lua can't yield).
#[cfg(target_os = "linux")]
#[test]
fn a_closing_value_never_runs_past_the_limits() {
    let s = timed();
    let b = limit_bucket(&s);
    let closer = "local closer = setmetatable({}, {__close = function() while true do end end})\n\
                  local function forever() return 1 end\n";
    for (name, body) in [
        ("plain", "for _ in forever, nil, nil, closer do end"),
        (
            "caught",
            "print(pcall(function() for _ in forever, nil, nil, closer do end end))\nwhile true do end",
        ),
        (
            "sorted",
            "table.sort({3, 2, 1}, function(a, c) for _ in forever, nil, nil, closer do end return a < c end)",
        ),
    ] {
        let t = eval_within(&s, &b, name, &format!("{closer}{body}"));
        assert_limit(&t, 504, &["script-time-limit"]);
    }
    // No thread is left running a `__close`: the server goes idle.
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(s.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(s.pid()) - before;
    assert!(
        used < 30,
        "the server used {used} ticks of CPU in 1 s while idle"
    );
    assert_server_still_answers(&s, &b);
}

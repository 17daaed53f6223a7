//! A test guest for tests/e2e/wasm.rs. The request variable `do` picks what
//! it does:
//!
//! - misbehaviour, each of which must end only this run with its own error:
//!   `loop` (never ends), `log` (logs a line with a line break in it, then
//!   1000 lines of 4 KB), `sleep` (sleeps 60 s in WASI's clock, in the
//!   host; with `work`, after that many million loop turns), `grow`
//!   (allocates without end), `recurse`
//!   (unbounded recursion), `recurse-frames` (unbounded recursion of frames
//!   kept in linear memory, which run out of the 64 KiB stack there first),
//!   `panic` (panics with [`PANIC_MESSAGE`]), `huge`
//!   (a body of `bytes` bytes, default 1 MB), `status` (answers the status
//!   `code`), `empty` (answers the status `code`, default 204, with no body
//!   nor headers), `headers` (`x-test: 1`, and with `which`: a lying
//!   `content-length` (`length`), a header value with a line break
//!   (`inject`), an invalid header name (`name`), 101 headers (`many`), a
//!   70 KB header (`big`));
//! - `merge`: merges `{"w":1}` into the JSON value under `at` (answers
//!   `merged` or the error), a write that may wait for the store;
//! - `pollables`: holds `n` WASI pollables (default 90,000) at once;
//! - `gets`: reads the key `at` for ever (host calls that copy a lot and use
//!   little fuel);
//! - `randoms`: asks WASI for 1 MiB of random bytes for ever (a host call
//!   that is not the server's own and uses little fuel);
//! - `nap-set`: sets the key `at` to `1`, sleeps `ms` milliseconds (in the
//!   host, where the run is suspended) and sets it to `2`: a run whose
//!   client goes away meanwhile must still end;
//! - `ok` (or nothing): answers `ok\n`;
//! - `set-json`: sets the key `at` to the JSON value `json` (as text);
//! - `remember` (keeps `secret`, repeated to fill several pages, in a static
//!   and counts the run in another) and `recall` (answers what those hold):
//!   every request runs in a fresh instance, so `recall` must never see
//!   what an earlier `remember` left behind;
//! - the WebAssembly twins of the Lua scope tests (tests/e2e/lua_api.rs),
//!   printing the same lines as those Lua scripts: `whoami`, `anon`,
//!   `narrow-prefix`, `narrow-perms`, `plain-get`, `widen`;
//! - `escape`: tries what WASI would give a script beyond clocks and random
//!   (the environment, the file system, a TCP connection to `port` on
//!   127.0.0.1) and answers a line for each: what it got;
//! - `calls`: makes the data calls the POST body lists, a JSON array of
//!   calls, each an array of strings (`["incr", "n", "1.5"]`; see
//!   [`call`]), and answers a line for each: its result, or `error: ` and
//!   the error as the Lua error strings word it.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use kvdb_guest::{Error, Handler, ListOptions, Permission, Request, Response};

/// What `do=panic` panics with.
pub const PANIC_MESSAGE: &str = "hostile guest panics on purpose (4f2a)";

/// What `remember` leaves in the instance's memory (data segment and heap).
static REMEMBERED: Mutex<String> = Mutex::new(String::new());

/// Runs of `remember` this instance has seen.
static RUNS: AtomicU32 = AtomicU32::new(0);

struct Hostile;

impl Handler for Hostile {
    fn handle(req: Request) -> Response {
        match req.var("do").unwrap_or("ok") {
            "ok" => Response::text("ok\n"),
            "remember" => {
                let secret = req.var("secret").unwrap_or("secret");
                *REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner) = secret.repeat(4096);
                RUNS.fetch_add(1, Ordering::Relaxed);
                Response::text("kept\n")
            }
            "recall" => {
                let kept = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner);
                let runs = RUNS.load(Ordering::Relaxed);
                Response::text(format!("{} bytes, {runs} runs\n", kept.len()))
            }
            "loop" => endless_loop(),
            "log" => {
                kvdb_guest::log::info("one\nFORGED log line");
                let line = "z".repeat(4096);
                for _ in 0..1000 {
                    kvdb_guest::log::info(&line);
                }
                Response::text("logged\n")
            }
            "print" => {
                // 128 KiB to stdout, past what the host keeps of it.
                let line = "p".repeat(1023);
                for _ in 0..128 {
                    println!("{line}");
                }
                Response::text("printed\n")
            }
            "copies" => {
                // Host calls that copy a lot and use little fuel, for ever.
                let line = "c".repeat(8 << 20);
                loop {
                    kvdb_guest::log::info(black_box(&line));
                }
            }
            "sleep" => {
                let turns: u64 = req.var("work").and_then(|w| w.parse().ok()).unwrap_or(0);
                let mut n: u64 = 0;
                for _ in 0..turns * 1_000_000 {
                    n = black_box(n.wrapping_add(1));
                }
                std::thread::sleep(std::time::Duration::from_secs(60));
                Response::text(format!("woke after {n}\n"))
            }
            "grow" => grow(),
            "merge" => match kvdb_guest::merge(req.var("at").unwrap_or("big"), r#"{"w":1}"#) {
                Ok(_) => Response::text("merged\n"),
                Err(e) => Response::text(format!("merge: {e}\n")),
            },
            "pollables" => {
                let n: usize = req.var("n").and_then(|n| n.parse().ok()).unwrap_or(90_000);
                let kept: Vec<i32> = (0..n).map(|_| pollable()).collect();
                Response::text(format!("{} pollables\n", black_box(kept.len())))
            }
            "recurse" => {
                let depth = recurse(black_box(u32::MAX));
                Response::text(format!("{depth}\n"))
            }
            "recurse-frames" => {
                let depth = recurse_with_frames(black_box(u32::MAX));
                Response::text(format!("{depth}\n"))
            }
            "panic" => panic!("{PANIC_MESSAGE}"),
            "huge" => {
                let bytes = req
                    .var("bytes")
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(1_000_000);
                Response::text("x".repeat(bytes))
            }
            "status" => {
                let code = req.var("code").and_then(|c| c.parse().ok()).unwrap_or(200);
                Response::text("status\n").with_status(code)
            }
            "empty" => {
                let code = req.var("code").and_then(|c| c.parse().ok()).unwrap_or(204);
                Response::new().with_status(code)
            }
            "headers" => {
                let response = Response::text("hi").with_header("X-Test", "1");
                match req.var("which") {
                    Some("length") => response.with_header("content-length", "5"),
                    Some("inject") => response.with_header("x-injected", "bad\r\nInjected: 1"),
                    Some("name") => response.with_header("bad name", "x"),
                    Some("many") => {
                        (0..100).fold(response, |r, i| r.with_header(&format!("x-h{i}"), "1"))
                    }
                    Some("big") => response.with_header("x-big", "b".repeat(70_000)),
                    _ => response,
                }
            }
            "vars" => {
                let mut text: String = req
                    .vars()
                    .iter()
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect();
                text.push_str(&format!(
                    "var(remote_addr)={}\n",
                    req.var("remote_addr").unwrap_or("nil")
                ));
                Response::text(text)
            }
            "whoami" => Response::text(whoami()),
            "anon" => Response::text(anon()),
            "narrow-prefix" => Response::text(narrow_prefix()),
            "narrow-perms" => Response::text(narrow_perms()),
            "plain-get" => Response::text(plain_get()),
            "gets" => {
                let key = req.var("at").unwrap_or("big");
                loop {
                    let _ = black_box(kvdb_guest::get(black_box(key)));
                }
            }
            "randoms" => loop {
                random_bytes(1 << 20);
            },
            "nap-set" => {
                let key = req.var("at").unwrap_or("n");
                let ms: u64 = req.var("ms").and_then(|m| m.parse().ok()).unwrap_or(500);
                if let Err(e) = kvdb_guest::set(key, 1) {
                    return Response::text(format!("set: {e}\n"));
                }
                std::thread::sleep(std::time::Duration::from_millis(ms));
                match kvdb_guest::set(key, 2) {
                    Ok(()) => Response::text("set twice\n"),
                    Err(e) => Response::text(format!("set: {e}\n")),
                }
            }
            "set-json" => {
                let key = req.var("at").unwrap_or("j");
                let text = req.var("json").unwrap_or("null");
                match kvdb_guest::set(key, kvdb_guest::Value::Json(text.to_owned())) {
                    Ok(()) => Response::text("set\n"),
                    Err(e) => Response::text(format!("set: {e}\n")),
                }
            }
            "widen" => match kvdb_guest::set_scope("", &[Permission::Read]) {
                Ok(()) => Response::text(plain_get()),
                Err(e) => Response::text(format!("set_scope: {e}\n")),
            },
            "escape" => Response::text(escape(req.var("port").unwrap_or("1"))),
            "calls" => match req.json::<Vec<Vec<String>>>() {
                Ok(calls) => {
                    Response::text(calls.iter().map(|c| call(c) + "\n").collect::<String>())
                }
                Err(e) => Response::text(format!("calls: {e}\n")).with_status(400),
            },
            other => Response::text(format!("unknown do={other}\n")).with_status(400),
        }
    }
}

kvdb_guest::export!(Hostile);

fn endless_loop() -> Response {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn grow() -> Response {
    let mut total: usize = 0;
    loop {
        // 1 MiB at a time, written to and never freed.
        let block = black_box(vec![0xA5_u8; 1 << 20]);
        total += block.len();
        black_box(block.leak());
        black_box(total);
    }
}

/// Recursion that is not a tail call and has no closed form: every level
/// needs the result of the next one.
fn recurse(n: u32) -> u32 {
    if n == 0 {
        return 1;
    }
    recurse(n - 1).rotate_left(3) ^ n
}

/// Recursion whose frames are in linear memory (their address is taken),
/// on the stack the linker put below the data.
fn recurse_with_frames(n: u32) -> u32 {
    let mut frame = [0_u8; 512];
    frame[0] = n.to_le_bytes()[0];
    let frame = black_box(&mut frame);
    if n == 0 {
        return u32::from(frame[0]);
    }
    recurse_with_frames(n - 1).wrapping_add(u32::from(frame[1]))
}

/// `nil` for success, else the error's text: what a Lua data call returns.
fn lua_err<T>(r: Result<T, Error>) -> String {
    match r {
        Ok(_) => "nil".to_owned(),
        Err(e) => e.to_string(),
    }
}

/// Lua's `type(err)` of a data call's error: `nil` or `string`.
fn lua_type<T>(r: Result<T, Error>) -> &'static str {
    if r.is_ok() { "nil" } else { "string" }
}

/// `kvdb.get(key)` as Lua's `tostring(v), tostring(err)`.
fn lua_get(key: &str) -> (String, String) {
    match kvdb_guest::get(key) {
        Ok(Some(v)) => (v.to_string(), "nil".to_owned()),
        Ok(None) => ("nil".to_owned(), "not found".to_owned()),
        Err(e) => ("nil".to_owned(), e.to_string()),
    }
}

fn permissions() -> String {
    kvdb_guest::scope()
        .permissions
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The Lua test's `WHOAMI`, line for line.
fn whoami() -> String {
    let mut out = format!(
        "prefix={} perms={}\n",
        kvdb_guest::scope().prefix,
        permissions()
    );
    out += &format!("get={}\n", lua_get("p:k").0);
    out += &format!("get q={}\n", lua_get("q:k").0);
    out += &format!("set={}\n", kvdb_guest::set("p:new", "x").is_ok());
    out += &format!("delete={}\n", kvdb_guest::delete("p:del").is_ok());
    let listed = kvdb_guest::list("", ListOptions::default()).map_or_else(
        |_| "refused".to_owned(),
        |entries| {
            entries
                .into_iter()
                .map(|e| e.key)
                .collect::<Vec<_>>()
                .join(",")
        },
    );
    out += &format!("list={listed}\nend\n");
    out
}

/// An anonymous run: the bucket's open permissions.
fn anon() -> String {
    format!(
        "{}\n{}\n{}\n{}\n",
        permissions(),
        lua_get("p:k").0,
        lua_err(kvdb_guest::set("anon", 1_i64)),
        lua_type(kvdb_guest::list("", ListOptions::default())),
    )
}

fn narrow_prefix() -> String {
    let permissions = kvdb_guest::scope().permissions;
    if let Err(e) = kvdb_guest::set_scope("users:1:", &permissions) {
        return format!("set_scope: {e}\n");
    }
    let mut out = format!("{}\n", kvdb_guest::scope().prefix);
    out += &format!("{}\n", lua_err(kvdb_guest::set("users:1:name", "alice")));
    out += &format!("{}\n", lua_err(kvdb_guest::set("users:2:name", "bob")));
    let (v, e) = lua_get("users:2:other");
    out += &format!("{v} {e}\n");
    out += &format!("{}\n", lua_get("users:1:name").0);
    out += "completed\n";
    out
}

fn narrow_perms() -> String {
    let prefix = kvdb_guest::scope().prefix;
    let mut out = String::new();
    if let Err(e) = kvdb_guest::set_scope(&prefix, &[Permission::Read]) {
        return format!("set_scope: {e}\n");
    }
    out += &format!("{} {}\n", permissions(), kvdb_guest::scope().prefix);
    out += &format!("{}\n", lua_get("k").0);
    out += &format!("{}\n", lua_type(kvdb_guest::set("k", "changed")));
    out += &format!("{}\n", lua_type(kvdb_guest::delete("k")));
    out += &format!(
        "{}\n",
        lua_type(kvdb_guest::list("", ListOptions::default()))
    );
    if let Err(e) = kvdb_guest::set_scope(&prefix, &[Permission::Write, Permission::Delete]) {
        return format!("{out}set_scope: {e}\n");
    }
    out += &format!("{}\n", permissions());
    out += &format!("{}\n", lua_type(kvdb_guest::get("k")));
    out
}

fn plain_get() -> String {
    let (v, e) = lua_get("k");
    format!("{v} {e}\n")
}

/// A new pollable (a handle in the host's table), straight from WASI: the
/// standard library has no use for one.
#[allow(unsafe_code)]
fn pollable() -> i32 {
    // SAFETY: a WASI call with a plain integer argument.
    unsafe { subscribe_duration(1_000_000_000_000) }
}

/// `len` random bytes straight from WASI (the standard library asks for a
/// few at a time), dropped at once.
#[allow(unsafe_code)]
fn random_bytes(len: usize) {
    let mut list = [0usize; 2];
    // SAFETY: the host writes the list's address and length into `list`;
    // it allocated the bytes with the guest's `cabi_realloc` (the global
    // allocator, alignment 1), so they go back to it the same way.
    unsafe {
        get_random_bytes(len as i64, list.as_mut_ptr());
        if list[1] > 0 {
            std::alloc::dealloc(
                list[0] as *mut u8,
                std::alloc::Layout::from_size_align_unchecked(list[1], 1),
            );
        }
    }
}

#[allow(unsafe_code)]
#[link(wasm_import_module = "wasi:random/random@0.2.6")]
unsafe extern "C" {
    #[link_name = "get-random-bytes"]
    fn get_random_bytes(len: i64, list: *mut usize);
}

#[allow(unsafe_code)]
#[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.6")]
unsafe extern "C" {
    #[link_name = "subscribe-duration"]
    fn subscribe_duration(nanoseconds: i64) -> i32;
}

/// One data call of `do=calls`, `[name, args…]`, and its result as a line:
///
/// - `get KEY`, `exists KEY`, `delete KEY`;
/// - `set KEY VALUE [TTL]`;
/// - an argument that can't be read answers `bad argument: …`;
/// - `incr KEY BY` (a float if `BY` has a `.`), `merge KEY JSON`,
///   `patch KEY JSON`, `append KEY TEXT`: the new value;
/// - `list PREFIX [OPTIONS]`, `OPTIONS` comma-separated from `values`,
///   `reverse`, `limit=N`, `start=KEY`, `end=KEY`: the keys (`key=value`
///   with values) separated by spaces;
/// - `token PREFIX PERMISSIONS TTL` (`PERMISSIONS` comma-separated):
///   `token TOKEN EXPIRES_AT`;
/// - `scope PREFIX`: sets the scope's prefix, keeping its permissions;
/// - `whoami`: the scope's prefix and permissions.
fn call(c: &[String]) -> String {
    let arg = |i: usize| c.get(i).map_or("", String::as_str);
    let shown = |r: Result<String, Error>| r.unwrap_or_else(|e| format!("error: {e}"));
    let value = |r: Result<kvdb_guest::Value, Error>| shown(r.map(|v| v.to_string()));
    match arg(0) {
        "get" => shown(kvdb_guest::get(arg(1)).map(|v| v.map_or("nil".into(), |v| v.to_string()))),
        "exists" => shown(kvdb_guest::exists(arg(1)).map(|e| e.to_string())),
        "delete" => shown(kvdb_guest::delete(arg(1)).map(|d| d.to_string())),
        "set" if c.len() < 4 => shown(kvdb_guest::set(arg(1), arg(2)).map(|()| "ok".into())),
        "set" => match arg(3).parse::<u64>() {
            Ok(ttl) => shown(kvdb_guest::set_with_ttl(arg(1), arg(2), ttl).map(|()| "ok".into())),
            Err(_) => format!("bad argument: ttl {:?}", arg(3)),
        },
        "incr" if arg(2).contains('.') => match arg(2).parse::<f64>() {
            Ok(by) => value(kvdb_guest::incr(arg(1), by)),
            Err(_) => format!("bad argument: {:?}", arg(2)),
        },
        "incr" => match arg(2).parse::<i64>() {
            Ok(by) => value(kvdb_guest::incr(arg(1), by)),
            Err(_) => format!("bad argument: {:?}", arg(2)),
        },
        "merge" => value(kvdb_guest::merge(arg(1), arg(2))),
        "patch" => value(kvdb_guest::patch(arg(1), arg(2))),
        "append" => value(kvdb_guest::append(arg(1), arg(2))),
        "list" => {
            let mut options = ListOptions::default();
            for option in arg(2).split(',').filter(|o| !o.is_empty()) {
                options = match option.split_once('=') {
                    None if option == "values" => options.with_values(),
                    None if option == "reverse" => options.reversed(),
                    Some(("limit", n)) => options.with_limit(n.parse().unwrap_or(0)),
                    Some(("start", key)) => options.with_start(key),
                    Some(("end", key)) => options.with_end(key),
                    _ => return format!("unknown list option {option}"),
                };
            }
            shown(kvdb_guest::list(arg(1), options).map(|entries| {
                entries
                    .into_iter()
                    .map(|e| match e.value {
                        Some(v) => format!("{}={v}", e.key),
                        None => e.key,
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            }))
        }
        "token" => {
            let permissions: Result<Vec<Permission>, String> = arg(2)
                .split(',')
                .map(|p| match p {
                    "read" => Ok(Permission::Read),
                    "write" => Ok(Permission::Write),
                    "delete" => Ok(Permission::Delete),
                    "enumerate" => Ok(Permission::Enumerate),
                    other => Err(format!("bad argument: permission {other:?}")),
                })
                .collect();
            match (permissions, arg(3).parse::<u64>()) {
                (Ok(permissions), Ok(ttl)) => shown(
                    kvdb_guest::access_token(arg(1), &permissions, ttl)
                        .map(|t| format!("token {} {}", t.token, t.expires_at)),
                ),
                (Err(bad), _) => bad,
                (_, Err(_)) => format!("bad argument: ttl {:?}", arg(3)),
            }
        }
        "scope" => {
            let permissions = kvdb_guest::scope().permissions;
            shown(kvdb_guest::set_scope(arg(1), &permissions).map(|()| "ok".into()))
        }
        "whoami" => format!("[{}] {}", kvdb_guest::scope().prefix, permissions()),
        other => format!("unknown call {other}"),
    }
}

/// `do=escape`: what the environment, the file system and the network give.
fn escape(port: &str) -> String {
    let env = std::env::vars().count();
    let args = std::env::args().count();
    let cwd =
        std::env::current_dir().map_or_else(|e| format!("error {e}"), |d| d.display().to_string());
    let fs = ["/", ".", "/etc/passwd"]
        .map(|path| match std::fs::read_dir(path) {
            Ok(entries) => format!("{path} lists {}", entries.count()),
            Err(_) => match std::fs::read(path) {
                Ok(bytes) => format!("{path} reads {} bytes", bytes.len()),
                Err(e) => format!("{path} error {}", e.kind()),
            },
        })
        .join(", ");
    let net = match std::net::TcpStream::connect(format!("127.0.0.1:{port}")) {
        Ok(_) => "connected".to_owned(),
        Err(e) => format!("error {}", e.kind()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "env {env}\nargs {args}\ncwd {cwd}\nfs {fs}\nnet {net}\nclock {}\n",
        now > 1_700_000_000
    )
}

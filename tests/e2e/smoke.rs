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

/// A web page on another origin can use the API with the credentials it
/// holds (a key or token it sends itself), as the kvdb.io client does in a
/// browser.
#[test]
fn web_pages_on_other_origins_may_call_the_api_without_the_browsers_credentials() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=s3cret");
    let origin = ("origin", "https://example.com");
    // The preflight of a PUT with a token and a content type.
    let r = s.request(
        "OPTIONS",
        &format!("/{b}/k"),
        &[
            origin,
            ("access-control-request-method", "PUT"),
            (
                "access-control-request-headers",
                "authorization,content-type,if-match,if-none-match,x-request-id",
            ),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    let methods = r.header("access-control-allow-methods").unwrap_or_default();
    for m in ["GET", "PUT", "PATCH", "DELETE", "POST"] {
        assert!(methods.contains(m), "{m} in {methods}");
    }
    let allowed = r.header("access-control-allow-headers").unwrap_or_default();
    // What a page sends: the API's headers, and its own for a script.
    for h in [
        "authorization",
        "content-type",
        "if-match",
        "if-none-match",
        "x-request-id",
    ] {
        assert!(allowed.contains(h), "{h} in {allowed}");
    }
    // Never the browser's own credentials (the editor's Basic login).
    assert_eq!(r.header("access-control-allow-credentials"), None);
    // The actual requests: readable, with their ETag and Link exposed.
    let r = s.request(
        "PUT",
        &format!("/{b}/k"),
        &[origin, ("authorization", "Bearer s3cret")],
        Some(b"v"),
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    let exposed = r
        .header("access-control-expose-headers")
        .unwrap_or_default();
    // Every header readable (a script's own too), and the API's own named
    // for a browser that takes `*` as a name.
    assert!(exposed.starts_with("*,"), "{exposed}");
    for h in ["etag", "link", "location", "retry-after"] {
        assert!(exposed.contains(h), "{h} in {exposed}");
    }
    let r = s.request("GET", &format!("/{b}/k"), &[origin], None);
    assert_eq!((r.status, r.text().as_str()), (200, "v"));
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    // Errors too, so that a page can read what went wrong.
    let r = s.request("GET", &format!("/{b}/missing"), &[origin], None);
    r.assert_problem(404);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    // A client that is no browser (no Origin) gets no CORS headers, and a
    // Vary that keeps caches from handing its answer to a browser.
    let r = s.request("GET", &format!("/{b}/k"), &[], None);
    assert_eq!((r.status, r.text().as_str()), (200, "v"));
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("vary").as_deref(), Some("origin"));
    // An unknown route's 404 too.
    let r = s.request("GET", &format!("/{b}/k/extra"), &[origin], None);
    r.assert_problem(404);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    // Backups are for `kvdb backup`, not for web pages.
    let r = s.request("GET", "/_admin/backup", &[origin], None);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

/// A limit of 0 (every write 413, every script stopped) or past what the
/// runtime can do is refused at start, saying the range (0 was taken; a
/// memory limit over 4 GiB was refused in wasmtime's words, in hex); a
/// negative one is named as a bad value of its flag (clap took `-5` for an
/// unknown option).
#[test]
fn limits_out_of_range_are_refused_at_start() {
    for (flag, value, range) in [
        ("--max-value-bytes", "0", "1.."),
        ("--script-time-ms", "0", "1.."),
        ("--script-instructions", "0", "1.."),
        ("--script-fuel", "0", "1.."),
        ("--script-response-bytes", "0", "1.."),
        ("--script-source-bytes", "0", "1.."),
        ("--script-component-bytes", "0", "1.."),
        ("--script-memory-bytes", "4294967297", "65536..=4294967296"),
        ("--script-memory-bytes", "1000", "65536..=4294967296"),
        ("--script-fuel", "-5", "-5"),
        ("--script-runs", "-1", "-1"),
        ("--read-timeout-secs", "-30", "-30"),
    ] {
        let mut command = crate::harness::kvdb_command();
        command.args([
            "serve",
            "--backend",
            "memory",
            "--listen",
            "127.0.0.1:0",
            flag,
            value,
        ]);
        let out = exited(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(range) && stderr.contains("invalid value"),
            "{flag} {value}: {stderr}"
        );
    }
    // `kvdb backup --since -1` likewise.
    let mut command = crate::harness::kvdb_command();
    command.args(["backup", "--admin-token", "t", "--since", "-1"]);
    let out = exited(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '-1' for '--since"),
        "{stderr}"
    );
}

/// What an operator gets wrong is said plainly: a data directory that is a
/// file (the system's error, twice), a backup `--server` without a scheme
/// (blamed on the connection), a `KVDB_LOG` that is no filter (silently
/// replaced), a word that is no level (read as a module's name, so
/// nothing was logged) or a misspelt module of kvdb; a wrong operator token
/// is logged, without the token.
#[test]
fn operator_mistakes_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("afile");
    std::fs::write(&file, "x").expect("write");
    let mut command = crate::harness::kvdb_command();
    command
        .env_remove("KVDB_BACKEND")
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&file);
    let out = exited(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not a directory"), "{stderr}");
    let mut command = crate::harness::kvdb_command();
    command
        .env("KVDB_LOG", "[[[bad")
        .env_remove("KVDB_SERVER")
        .args(["backup", "--server", "127.0.0.1:1", "--admin-token", "t"]);
    let out = exited(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not a URL") && stderr.contains("--server http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("KVDB_LOG=\"[[[bad\" is not a log filter"),
        "{stderr}"
    );
    // A typo of one of kvdb's modules would log nothing of it.
    let not_ours = |name: &str| {
        format!(
            "note: KVDB_LOG names \"{name}\", which is no module of kvdb, so nothing is logged for it; kvdb's modules are kvdb::auth, "
        )
    };
    for (filter, note) in [
        (
            "verbose",
            Some("note: KVDB_LOG names \"verbose\", which is read as a module's name".to_owned()),
        ),
        ("info,Debug,hyper=debug,kvdb", None),
        ("info,kvdb::script::wasm=debug,kvdb::http", None),
        // Another crate's module path, and a prefix of one of ours (the
        // filter matches targets by their start).
        ("tower_http::trace,kvdb::scr=debug", None),
        ("kvdbx", Some(not_ours("kvdbx"))),
        ("info,kvdb::scrpt=debug", Some(not_ours("kvdb::scrpt"))),
        ("kvdb::scripts=debug", Some(not_ours("kvdb::scripts"))),
    ] {
        let mut command = crate::harness::kvdb_command();
        command
            .env("KVDB_LOG", filter)
            .env_remove("KVDB_SERVER")
            .args(["backup", "--server", "127.0.0.1:1", "--admin-token", "t"]);
        let out = exited(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match note {
            Some(note) => assert!(stderr.contains(&note), "{filter}: {stderr}"),
            None => assert!(!stderr.contains("note: KVDB_LOG"), "{filter}: {stderr}"),
        }
    }
    let log = TestServer::log_while(&["--admin-token", "optoken"], |s| {
        let r = s.request(
            "GET",
            "/_admin/backup",
            &[("authorization", "Bearer guess123")],
            None,
        );
        r.assert_problem(401);
    });
    assert!(log.contains("the operator token given is wrong"), "{log}");
    assert!(
        !log.contains("guess123") && !log.contains("optoken"),
        "{log}"
    );
    // The ready line names the data directory as an absolute path, when
    // it was given as a relative one (a service manager's log).
    let mut child = crate::harness::kvdb_command()
        .current_dir(dir.path())
        .env_remove("KVDB_BACKEND")
        .env("KVDB_LOG", "info")
        .args(["serve", "--listen", "127.0.0.1:0", "--data", "rel-data"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kvdb");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("kvdb is ready") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let ready = rx.recv_timeout(std::time::Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready.expect("a ready line");
    let absolute = std::fs::canonicalize(dir.path().join("rel-data")).expect("made");
    assert!(
        ready.contains(&format!("data={}", absolute.display())),
        "{ready}"
    );
    // The data directory it made and its database are its owner's only:
    // they hold every bucket's keys, as a backup (0600) does (both were
    // world-readable under the usual umask; found by a review).
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("made").permissions())
            & 0o777
    };
    assert_eq!(mode(&absolute), 0o700);
    assert_eq!(mode(&absolute.join("kvdb.redb")), 0o600);
}

/// Runs `command` until it exits, or for 5 seconds (a server that started
/// when it should not have is stopped: the test fails, it does not hang).
fn exited(mut command: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvdb");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("output")
}

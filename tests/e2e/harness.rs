//! The one end-to-end harness: starts the real `kvdb` binary on
//! `127.0.0.1:0` with a temporary data directory and talks HTTP to it.
//!
//! Every server a test starts is stopped when its `TestServer` is dropped.

use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `kvdb serve`.
pub struct TestServer {
    child: Option<Child>,
    base: String,
    data: PathBuf,
    /// Keeps the data directory alive as long as the server (and after a kill,
    /// for a restart); `None` when the caller owns the directory.
    _dir: Option<tempfile::TempDir>,
    args: Vec<String>,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Asserts a problem document with this status and returns its detail.
    #[track_caller]
    pub fn assert_problem(&self, status: u16) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/problem+json"),
            "content-type {ct}"
        );
        let doc = self.json();
        for field in ["type", "title", "status", "detail"] {
            assert!(doc.get(field).is_some(), "problem without {field}: {doc}");
        }
        assert_eq!(doc["status"], status);
        doc["detail"].as_str().unwrap_or_default().to_owned()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

impl TestServer {
    /// A server on a fresh temporary data directory (redb backend).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `serve` arguments.
    pub fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        Self::spawn(
            data,
            Some(dir),
            args.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    /// A server on an existing data directory that the caller keeps.
    pub fn start_on(data: &Path, args: &[&str]) -> Self {
        Self::spawn(
            data.to_owned(),
            None,
            args.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    /// A server with extra `serve` arguments whose log (stderr) the test
    /// reads: it ends once the server is dropped.
    fn start_with_log(args: &[&str], level: &str) -> (Self, std::process::ChildStderr) {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut server = Self::spawn_logging_to(
            data,
            Some(dir),
            args.iter().map(|s| (*s).to_owned()).collect(),
            Stdio::piped(),
            level,
            None,
        );
        let log = server
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("stderr");
        (server, log)
    }

    /// Everything a server started with extra `serve` arguments logs (at
    /// level info) while `use_it` uses it, and until it is stopped.
    pub fn log_while(args: &[&str], use_it: impl FnOnce(&Self)) -> String {
        let (server, mut log) = Self::start_with_log(args, "info");
        // Read as it comes: the pipe must not fill up and block the server.
        let reader = std::thread::spawn(move || {
            let mut logged = String::new();
            std::io::Read::read_to_string(&mut log, &mut logged).expect("read the log");
            logged
        });
        use_it(&server);
        drop(server);
        reader.join().expect("log reader")
    }

    /// Everything a server started with extra `serve` arguments logs before
    /// it is stopped at once.
    pub fn log_of(args: &[&str]) -> String {
        let (server, mut log) = Self::start_with_log(args, "warn");
        drop(server);
        let mut logged = String::new();
        std::io::Read::read_to_string(&mut log, &mut logged).expect("read the log");
        logged
    }

    fn spawn(data: PathBuf, dir: Option<tempfile::TempDir>, args: Vec<String>) -> Self {
        Self::spawn_logging_to(data, dir, args, Stdio::inherit(), "warn", None)
    }

    /// A server (with extra `serve` arguments) on a disk that is full once
    /// a file is `kib` KiB (a write past it fails with `EFBIG`: bash's
    /// `ulimit -f`, `SIGXFSZ` ignored), and its exit status on SIGTERM.
    pub fn on_a_small_disk(
        kib: u64,
        args: &[&str],
        use_it: impl FnOnce(&Self),
    ) -> std::process::ExitStatus {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let server = Self::spawn_logging_to(
            data,
            Some(dir),
            args.iter().map(|s| (*s).to_owned()).collect(),
            // Not the test's own stderr: the file size limit would hold for
            // it too.
            Stdio::null(),
            "warn",
            Some(kib),
        );
        use_it(&server);
        server.terminate()
    }

    fn spawn_logging_to(
        data: PathBuf,
        dir: Option<tempfile::TempDir>,
        args: Vec<String>,
        log: Stdio,
        level: &str,
        file_size_kib: Option<u64>,
    ) -> Self {
        let mut command = match file_size_kib {
            None => Command::new(env!("CARGO_BIN_EXE_kvdb")),
            Some(kib) => {
                let mut bash = Command::new("bash");
                bash.arg("-c")
                    .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_kvdb"));
                bash
            }
        };
        let mut child = command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(&data)
            .args(&args)
            .env("KVDB_LOG", level)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start kvdb");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Self {
            child: Some(child),
            base,
            data,
            _dir: dir,
            args,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Any request: `headers` as pairs, `body` if any.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let result = match body {
            Some(b) => agent().run(builder.body(b.to_vec()).expect("request")),
            None => agent().run(builder.body(()).expect("request")),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            response
                .body_mut()
                .with_config()
                .limit(64 * 1024 * 1024)
                .read_to_vec()
                .expect("read body")
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], None)
    }

    /// Sends `GET path` and hangs up `after` without reading the answer (a
    /// client that gave up on a long script run).
    pub fn get_and_hang_up(&self, path: &str, after: Duration) {
        use std::io::Write;
        let addr = self.base().trim_start_matches("http://").to_owned();
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        std::thread::sleep(after);
    }

    pub fn put(&self, path: &str, body: &str) -> Resp {
        self.request("PUT", path, &[], Some(body.as_bytes()))
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        self.request(
            "POST",
            path,
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(body.as_bytes()),
        )
    }

    pub fn patch(&self, path: &str, body: &str) -> Resp {
        self.request("PATCH", path, &[], Some(body.as_bytes()))
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, &[], None)
    }

    /// Creates a bucket with these form fields (e.g. `secret_key=s`); returns its id.
    pub fn create_bucket(&self, fields: &str) -> String {
        let r = self.post("/", fields);
        assert_eq!(r.status, 201, "create bucket: {}", r.text());
        r.text()
    }

    /// Issues a token with the bucket's secret key; returns it.
    pub fn token(&self, bucket: &str, secret: &str, fields: &str) -> String {
        let r = self.request(
            "POST",
            &format!("/{bucket}/tokens/"),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("authorization", &format!("Bearer {secret}")),
            ],
            Some(fields.as_bytes()),
        );
        assert_eq!(r.status, 200, "token: {}", r.text());
        r.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// SIGKILL: no chance to sync. Returns the data directory's owner so the
    /// data survives for a restart.
    pub fn kill9(mut self) -> Option<tempfile::TempDir> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self._dir.take()
    }

    /// Starts the same server again on the same data directory.
    pub fn restart_after_kill(self) -> Self {
        let data = self.data.clone();
        let args = self.args.clone();
        let dir = self.kill9();
        Self::spawn(data, dir, args)
    }

    /// [`TestServer::restart_after_kill`], doing `meanwhile` to the data
    /// directory while no server runs.
    pub fn restart_after_kill_with(self, meanwhile: impl FnOnce(&Path)) -> Self {
        let data = self.data.clone();
        let args = self.args.clone();
        let dir = self.kill9();
        meanwhile(&data);
        Self::spawn(data, dir, args)
    }

    /// SIGTERM, and the exit status it ended with.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        child.wait().expect("wait")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `kvdb` binary, for tests of other subcommands.
pub fn kvdb_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvdb"));
    c.env("KVDB_LOG", "warn");
    c
}

impl TestServer {
    /// Like [`TestServer::start_on`], but a server that does not come up (it
    /// exits, or its first line is not the listening line) is an `Err` with
    /// what it printed and how it ended, instead of a panic.
    pub fn try_start_on(data: &Path, args: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvdb"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(data)
            .args(args)
            .env("KVDB_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kvdb");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        match line.trim().strip_prefix("listening on ") {
            Some(base) => Ok(Self {
                child: Some(child),
                base: base.to_owned(),
                data: data.to_owned(),
                _dir: None,
                args: args.iter().map(|s| (*s).to_owned()).collect(),
            }),
            None => {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                Err(format!("first line {line:?}, {status}"))
            }
        }
    }
}

/// An `Authorization: Basic` value for this user name and password.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Runs `node SCRIPT ARGS…` in `dir` and returns its output; panics with the
/// output if it fails or does not end within `timeout` (then it is killed).
pub fn run_node(dir: &str, script: &str, args: &[&str], timeout: Duration) -> String {
    let stdout = tempfile::tempfile().expect("temp file");
    let stderr = tempfile::tempfile().expect("temp file");
    let mut child = Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("clone"))
        .stderr(stderr.try_clone().expect("clone"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start node ({e}): install Node.js, then run ./test.sh"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = format!(
        "--- stdout\n{}--- stderr\n{}",
        read_all(stdout),
        read_all(stderr)
    );
    match status {
        Some(status) if status.success() => output,
        Some(status) => panic!("node {script} failed ({status}):\n{output}"),
        None => panic!("node {script} did not end within {timeout:?}:\n{output}"),
    }
}

/// Reads what a child wrote to a temporary file.
fn read_all(mut file: std::fs::File) -> String {
    let mut text = String::new();
    file.rewind().expect("rewind");
    file.read_to_string(&mut text).expect("read output");
    text
}

/// Asserts a script run refused for want of a place among the runs in
/// flight: 503 `script-busy` with `Retry-After: 1`, its detail holding
/// `detail_has`.
#[track_caller]
pub fn assert_script_busy(r: &Resp, detail_has: &str) {
    assert_eq!(r.status, 503, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["type"], "urn:kvdb:problem:script-busy", "{doc}");
    assert!(
        doc["detail"]
            .as_str()
            .is_some_and(|d| d.contains(detail_has)),
        "{doc}"
    );
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
}

/// What a script's log must look like after it logged "one\nFORGED log
/// line" and then far more than its budget: the newline escaped (no line of
/// its own), one notice that the rest is dropped, and the whole bounded.
pub fn assert_log_escaped_and_bounded(log: &str) {
    assert!(
        log.contains("one\\nFORGED log line"),
        "escaped in one line: {log:.3000}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "no forged line"
    );
    assert!(log.contains("the rest of this run's log is dropped"));
    assert!(log.len() < 200_000, "the log holds {} bytes", log.len());
}

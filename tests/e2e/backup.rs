//! Online backups (`kvdb backup`, full and incremental) and `kvdb restore`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Resp, TestServer, kvdb_command};

const OP: &str = "optoken";
const PNG: &[u8] = &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 1, 0xff];

fn as_(s: &TestServer, method: &str, path: &str, credential: &str, body: Option<&[u8]>) -> Resp {
    let auth = format!("Bearer {credential}");
    s.request(method, path, &[("authorization", auth.as_str())], body)
}

fn form(s: &TestServer, method: &str, path: &str, credential: &str, body: &str) -> Resp {
    let auth = format!("Bearer {credential}");
    s.request(
        method,
        path,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Some(body.as_bytes()),
    )
}

fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `kvdb backup` against the server; returns the printed version.
fn backup(s: &TestServer, since: u64, file: &Path) -> u64 {
    let out = backup_cmd(s, OP, since, file);
    assert!(
        out.status.success(),
        "kvdb backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let version = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("version "))
        .unwrap_or_else(|| panic!("no `version N` line in {stdout:?}"))
        .parse()
        .expect("version number");
    assert!(file.exists(), "no backup file written");
    version
}

/// `GET /_admin/backup?since=N` with the operator token (no `since` with
/// `None`).
fn operator_backup(s: &TestServer, since: Option<u64>) -> Resp {
    let path = since.map_or_else(
        || "/_admin/backup".to_owned(),
        |n| format!("/_admin/backup?since={n}"),
    );
    s.request("GET", &path, &[("authorization", "Bearer optoken")], None)
}

fn backup_cmd(s: &TestServer, token: &str, since: u64, file: &Path) -> Output {
    kvdb_command()
        .env_remove("KVDB_ADMIN_TOKEN")
        .env_remove("KVDB_SERVER")
        .arg("backup")
        .arg("--server")
        .arg(s.base())
        .arg("--admin-token")
        .arg(token)
        .arg("--since")
        .arg(since.to_string())
        .arg("-o")
        .arg(file)
        .output()
        .expect("run kvdb backup")
}

fn restore(data: &Path, files: &[&Path]) -> Output {
    kvdb_command()
        .env_remove("KVDB_DATA")
        .env_remove("KVDB_BACKEND")
        .arg("restore")
        .arg("--data")
        .arg(data)
        .args(files)
        .output()
        .expect("run kvdb restore")
}

#[track_caller]
fn restore_ok(data: &Path, files: &[&Path]) {
    let out = restore(data, files);
    assert!(
        out.status.success(),
        "kvdb restore {files:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[track_caller]
fn restore_fails(data: &Path, files: &[&Path]) -> String {
    let out = restore(data, files);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "kvdb restore {files:?} should fail; stderr: {stderr}"
    );
    assert!(!stderr.trim().is_empty(), "a failed restore says why");
    stderr
}

/// Everything a client can observe of these buckets, read with each one's
/// credential (`None`: anonymous).
fn snapshot(s: &TestServer, buckets: &[(&str, Option<&str>)]) -> Value {
    let mut all = Vec::new();
    for (b, cred) in buckets {
        let call = |method: &str, path: &str| match cred {
            Some(c) => as_(s, method, path, c, None),
            None => s.request(method, path, &[], None),
        };
        let head = s.request("HEAD", &format!("/{b}"), &[], None).status;
        let policy = call("GET", &format!("/{b}"));
        let policy = if policy.status == 200 {
            policy.json()
        } else {
            json!(policy.status)
        };
        let listing = call("GET", &format!("/{b}/?format=json&values=true"));
        let listing = if listing.status == 200 {
            listing.json()
        } else {
            json!(listing.status)
        };
        let text_listing = call("GET", &format!("/{b}/?values=true")).text();
        let mut values = Vec::new();
        if let Some(entries) = listing.as_array() {
            for entry in entries {
                let key = entry[0].as_str().expect("key");
                let r = call("GET", &format!("/{b}/{}", encode_key(key)));
                values.push(json!({
                    "key": key,
                    "status": r.status,
                    "content_type": r.header("content-type"),
                    "body": r.body,
                }));
            }
        }
        all.push(json!({
            "bucket": b,
            "head": head,
            "policy": policy,
            "listing": listing,
            "text_listing": text_listing,
            "values": values,
        }));
    }
    Value::Array(all)
}

struct Fixture {
    live: TestServer,
    a: String,
    b: String,
    open: String,
    token_a: String,
    _dir: tempfile::TempDir,
    files: PathBuf,
}

impl Fixture {
    fn file(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }

    fn fresh_dir(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }

    fn buckets(&self) -> Vec<(&str, Option<&str>)> {
        vec![
            (self.a.as_str(), Some("sa")),
            (self.b.as_str(), Some("sb")),
            (self.open.as_str(), None),
        ]
    }
}

/// A server with `--admin-token` and two buckets with a bit of everything
/// (plus one without a secret key).
fn fixture() -> Fixture {
    let live = TestServer::start_with(&["--admin-token", OP]);
    let dir = tempfile::tempdir().expect("temp dir");
    let a = live.create_bucket(
        "secret_key=sa&read_key=ra&write_key=wa&email=a%40example.com&default_ttl=0",
    );
    let b = live.create_bucket("secret_key=sb&default_ttl=7200");
    let open = live.create_bucket("");
    let put = |b: &str, key: &str, ct: Option<&str>, body: &[u8]| {
        let mut headers = vec![("authorization", "Bearer sa")];
        if let Some(ct) = ct {
            headers.push(("content-type", ct));
        }
        let r = live.request("PUT", &format!("/{b}/{key}"), &headers, Some(body));
        assert_eq!(r.status, 204, "PUT {key}: {}", r.text());
    };
    put(&a, "int", None, b"42");
    put(&a, "neg", None, b"-7");
    put(&a, "float", None, b"1.5");
    put(
        &a,
        "json",
        Some("application/json"),
        br#"{"a":[1,2,{"b":null}]}"#,
    );
    put(&a, "text", Some("text/plain"), b"hello\nworld");
    put(&a, "image", Some("image/png"), PNG);
    put(&a, "csv", Some("text/csv; charset=utf-8"), b"a,b\n1,2\n");
    put(&a, "with%2Fslash", None, b"slashed");
    put(&a, "cl%C3%A9", None, b"unicode key");
    put(&a, "ttl?ttl=3600", None, b"expires later");
    for _ in 0..5 {
        let r = as_(&live, "PATCH", &format!("/{a}/counter"), "wa", Some(b"+1"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = live.request(
        "PATCH",
        &format!("/{a}/json"),
        &[
            ("authorization", "Bearer wa"),
            ("content-type", "application/merge-patch+json"),
        ],
        Some(br#"{"c":"merged"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Bucket b: open reading and writing, a default ttl.
    assert_eq!(live.put(&format!("/{b}/x"), "1").status, 204);
    assert_eq!(live.put(&format!("/{b}/y"), "[1,2,3]").status, 204);
    assert_eq!(live.put(&format!("/{open}/o"), "open").status, 204);
    let token_a = live.token(&a, "sa", "prefix=cou&permissions=read");
    let files = dir.path().to_owned();
    Fixture {
        live,
        a,
        b,
        open,
        token_a,
        _dir: dir,
        files,
    }
}

#[test]
fn full_backup_restores_into_a_fresh_server_identically() {
    let f = fixture();
    let file = f.file("full.kvdb");
    let version = backup(&f.live, 0, &file);
    assert!(version > 0, "version {version}");
    let before = snapshot(&f.live, &f.buckets());

    let data = f.fresh_dir("restored");
    restore_ok(&data, &[&file]);
    let restored = TestServer::start_on(&data, &[]);
    assert_eq!(snapshot(&restored, &f.buckets()), before);

    // Spot checks of what the snapshot compares.
    let a = &f.a;
    let r = as_(&restored, "GET", &format!("/{a}/image"), "ra", None);
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    assert_eq!(r.body, PNG);
    let r = as_(&restored, "GET", &format!("/{a}/json"), "ra", None);
    assert_eq!(r.json(), json!({"a": [1, 2, {"b": null}], "c": "merged"}));
    assert_eq!(
        as_(&restored, "GET", &format!("/{a}/counter"), "ra", None).text(),
        "5"
    );
    // Policies and keys hold on the restored server.
    restored.get(&format!("/{a}/int")).assert_problem(401);
    as_(&restored, "PUT", &format!("/{a}/int"), "ra", Some(b"1")).assert_problem(403);
    assert_eq!(
        as_(&restored, "PATCH", &format!("/{a}/int"), "wa", Some(b"+1")).text(),
        "43"
    );
    let policy = as_(&restored, "GET", &format!("/{a}"), "sa", None).json();
    assert_eq!(policy["email"], "a@example.com");
    assert_eq!(policy["read_key"], "ra");
    // A token issued by the live server works on the restored one (the
    // signing key came along), within its prefix only.
    let t = &f.token_a;
    assert_eq!(
        as_(&restored, "GET", &format!("/{a}/counter"), t, None).text(),
        "5"
    );
    as_(&restored, "GET", &format!("/{a}/int"), t, None).assert_problem(403);
    // The bucket's default ttl still applies to new writes.
    assert_eq!(
        as_(&restored, "GET", &format!("/{}", f.b), "sb", None).json()["default_ttl"],
        7200
    );
}

#[test]
fn restored_keys_keep_their_expiry() {
    let live = TestServer::start_with(&["--admin-token", OP]);
    let dir = tempfile::tempdir().expect("temp dir");
    let b = live.create_bucket("secret_key=sk");
    let written = Instant::now();
    assert_eq!(live.put(&format!("/{b}/brief?ttl=2"), "x").status, 204);
    assert_eq!(live.put(&format!("/{b}/stays"), "y").status, 204);
    let file = dir.path().join("full.kvdb");
    backup(&live, 0, &file);
    let data = dir.path().join("restored");
    restore_ok(&data, &[&file]);
    let restored = TestServer::start_on(&data, &[]);
    let wait = Duration::from_millis(3500).saturating_sub(written.elapsed());
    std::thread::sleep(wait);
    assert_eq!(restored.get(&format!("/{b}/brief")).status, 404);
    assert_eq!(restored.get(&format!("/{b}/stays")).text(), "y");
}

#[test]
fn backup_streams_over_http_with_version_headers() {
    let f = fixture();
    let r = operator_backup(&f.live, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let version: u64 = r
        .header("x-kvdb-backup-version")
        .expect("version header")
        .parse()
        .expect("number");
    assert_eq!(r.header("x-kvdb-backup-since").as_deref(), Some("0"));
    assert!(version > 0);
    assert!(!r.body.is_empty());
    let r = operator_backup(&f.live, Some(version));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-kvdb-backup-since").as_deref(),
        Some(version.to_string().as_str())
    );
}

#[test]
fn a_since_beyond_the_store_is_a_conflict_that_says_what_to_do() {
    let f = fixture();
    let r = operator_backup(&f.live, None);
    let version: u64 = r
        .header("x-kvdb-backup-version")
        .expect("version header")
        .parse()
        .expect("number");
    let ahead = version + 1000;
    let r = operator_backup(&f.live, Some(ahead));
    let detail = r.assert_problem(409);
    for part in [
        format!("since version {ahead}"),
        format!("only reaches version {version}"),
        "take a full backup (since 0)".to_owned(),
    ] {
        assert!(detail.contains(&part), "{part:?} not in {detail:?}");
    }

    // The command says the same and writes no file.
    let file = f.file("ahead.kvdb");
    let out = backup_cmd(&f.live, OP, ahead, &file);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("409") && stderr.contains("take a full backup"),
        "stderr: {stderr}"
    );
    assert!(!file.exists(), "a refused backup leaves no file");

    // Nothing changed: a backup from the real version still works.
    let r = operator_backup(&f.live, Some(version));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn an_empty_operator_token_is_named_as_the_problem() {
    let f = fixture();
    // The command refuses before it asks the server (an unset variable).
    let file = f.file("empty-token.kvdb");
    let out = backup_cmd(&f.live, "", 0, &file);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--admin-token (KVDB_ADMIN_TOKEN) is empty"),
        "stderr: {stderr}"
    );
    assert!(!file.exists());

    // A server started with an empty token says that its operator routes
    // stay off.
    let logged = TestServer::log_of(&["--admin-token", ""]);
    assert!(
        logged.contains("--admin-token (KVDB_ADMIN_TOKEN) is empty")
            && logged.contains("stay disabled"),
        "log: {logged}"
    );
}

/// After the full backup: writes, a delete, a bucket deletion, a new bucket,
/// a policy change.
fn change_after_full_backup(f: &Fixture) -> String {
    let (live, a) = (&f.live, &f.a);
    assert_eq!(
        as_(live, "PUT", &format!("/{a}/int"), "wa", Some(b"100")).status,
        204
    );
    assert_eq!(
        as_(live, "PUT", &format!("/{a}/added"), "wa", Some(b"new")).status,
        204
    );
    assert_eq!(
        as_(live, "PATCH", &format!("/{a}/counter"), "wa", Some(b"+10")).text(),
        "15"
    );
    assert_eq!(
        as_(live, "DELETE", &format!("/{a}/text"), "wa", None).status,
        204
    );
    let r = form(live, "PATCH", &format!("/{a}"), "sa", "read_key=ra2");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        as_(live, "DELETE", &format!("/{}", f.b), "sb", None).status,
        204
    );
    let c = live.create_bucket("secret_key=sc");
    assert_eq!(live.put(&format!("/{c}/hello"), "world").status, 204);
    c
}

#[test]
fn incremental_backup_chain_restores_to_the_live_state() {
    let f = fixture();
    let full = f.file("full.kvdb");
    let v1 = backup(&f.live, 0, &full);
    let c = change_after_full_backup(&f);
    let incr = f.file("incr.kvdb");
    let v2 = backup(&f.live, v1, &incr);
    assert!(v2 > v1, "{v2} > {v1}");

    let mut buckets = f.buckets();
    buckets.push((c.as_str(), Some("sc")));
    let live = snapshot(&f.live, &buckets);

    // One restore command with the whole chain.
    let data = f.fresh_dir("chain");
    restore_ok(&data, &[&full, &incr]);
    let restored = TestServer::start_on(&data, &[]);
    assert_eq!(snapshot(&restored, &buckets), live);
    let a = &f.a;
    assert_eq!(
        as_(&restored, "GET", &format!("/{a}/text"), "sa", None).status,
        404
    );
    assert_eq!(
        restored
            .request("HEAD", &format!("/{}", f.b), &[], None)
            .status,
        404
    );
    assert_eq!(restored.get(&format!("/{}/x", f.b)).status, 404);
    assert_eq!(restored.get(&format!("/{c}/hello")).text(), "world");
    as_(&restored, "GET", &format!("/{a}/int"), "ra", None).assert_problem(401);
    assert_eq!(
        as_(&restored, "GET", &format!("/{a}/int"), "ra2", None).text(),
        "100"
    );
    drop(restored);

    // The same chain, one link per command.
    let data = f.fresh_dir("stepwise");
    restore_ok(&data, &[&full]);
    restore_ok(&data, &[&incr]);
    let restored = TestServer::start_on(&data, &["--admin-token", OP]);
    assert_eq!(snapshot(&restored, &buckets), live);
    // The restore kept no record of the deletes it applied: a backup of the
    // restored server from before its restored version would miss them
    // (`text` would come back), so it is refused; from that version on, it
    // works.
    let r = operator_backup(&restored, Some(v1));
    r.assert_problem(409);
    assert!(r.text().contains("full backup"), "{}", r.text());
    assert_eq!(operator_backup(&restored, Some(v2)).status, 200);
}

#[test]
fn an_empty_increment_restores_too() {
    let f = fixture();
    let full = f.file("full.kvdb");
    let v1 = backup(&f.live, 0, &full);
    let incr = f.file("incr.kvdb");
    let v2 = backup(&f.live, v1, &incr);
    assert!(v2 >= v1);
    let data = f.fresh_dir("restored");
    restore_ok(&data, &[&full, &incr]);
    let restored = TestServer::start_on(&data, &[]);
    assert_eq!(
        snapshot(&restored, &f.buckets()),
        snapshot(&f.live, &f.buckets())
    );
}

#[test]
fn restoring_an_increment_out_of_order_fails() {
    let f = fixture();
    let full = f.file("full.kvdb");
    let v1 = backup(&f.live, 0, &full);
    assert_eq!(f.live.put(&format!("/{}/x", f.b), "2").status, 204);
    let incr1 = f.file("incr1.kvdb");
    let v2 = backup(&f.live, v1, &incr1);
    assert_eq!(f.live.put(&format!("/{}/x", f.b), "3").status, 204);
    let incr2 = f.file("incr2.kvdb");
    backup(&f.live, v2, &incr2);

    // An increment without its base: refused before the data directory
    // is created or written.
    let no_base = f.fresh_dir("no-base");
    let err = restore_fails(&no_base, &[&incr1]);
    assert!(
        err.contains("incr1.kvdb is an increment") && err.contains("restore the full backup first"),
        "{err}"
    );
    assert!(!no_base.join("kvdb.redb").exists(), "nothing written");
    // The full backup after its increment: it comes first.
    let err = restore_fails(&no_base, &[&incr1, &full]);
    assert!(
        err.contains("full.kvdb is a full backup, and full backups come first"),
        "{err}"
    );
    assert!(!no_base.join("kvdb.redb").exists(), "nothing written");
    restore_ok(&no_base, &[&full, &incr1]);
    // A gap in the chain, and links in the wrong order: refused before
    // anything is restored, naming the files and what to do.
    let gap = f.fresh_dir("gap");
    let err = restore_fails(&gap, &[&full, &incr2]);
    assert!(
        err.contains("incr2.kvdb does not continue") && err.contains("a backup is missing"),
        "{err}"
    );
    let swapped = f.fresh_dir("swapped");
    let err = restore_fails(&swapped, &[&full, &incr2, &incr1]);
    assert!(err.contains("incr2.kvdb does not continue"), "{err}");
    for untouched in [&gap, &swapped] {
        restore_ok(untouched, &[&full, &incr1, &incr2]);
    }
    // The same increment twice.
    let data = f.fresh_dir("twice");
    restore_ok(&data, &[&full, &incr1]);
    let err = restore_fails(&data, &[&incr1]);
    assert!(
        err.contains(&format!("kvdb backup --since {v2}")),
        "says how to take the increment that follows: {err}"
    );
    // What was restored before the refusal is intact and continues the chain.
    restore_ok(&data, &[&incr2]);
    let restored = TestServer::start_on(&data, &[]);
    assert_eq!(restored.get(&format!("/{}/x", f.b)).text(), "3");
    assert_eq!(
        snapshot(&restored, &f.buckets()),
        snapshot(&f.live, &f.buckets())
    );
}

/// A server restored from a backup is a server of its own: an increment
/// taken from it, with the `--since` the original server's chain had come
/// to, does not continue that chain (found by a review: the chain restored
/// to data neither server held); one from the version its restore ended at
/// does.
#[test]
fn an_increment_of_a_restored_server_does_not_continue_the_original_chain() {
    let f = fixture();
    let full = f.file("full.kvdb");
    let v1 = backup(&f.live, 0, &full);
    assert_eq!(f.live.put(&format!("/{}/x", f.b), "2").status, 204);
    let incr = f.file("incr.kvdb");
    let v2 = backup(&f.live, v1, &incr);
    // Disaster: the server comes back from the full backup alone, and the
    // old cron job goes on with the `--since` it had come to.
    let copy_dir = f.fresh_dir("copy");
    restore_ok(&copy_dir, &[&full]);
    let copy = TestServer::start_on(&copy_dir, &["--admin-token", OP]);
    assert_eq!(copy.put(&format!("/{}/x", f.b), "copy").status, 204);
    let foreign = f.file("foreign.kvdb");
    backup(&copy, v2, &foreign);
    // Named before anything is written, in one command...
    let data = f.fresh_dir("chain");
    let err = restore_fails(&data, &[&full, &incr, &foreign]);
    assert!(
        err.contains("foreign.kvdb was taken from another server than")
            && err.contains("incr.kvdb"),
        "{err}"
    );
    assert!(!data.join("kvdb.redb").exists(), "nothing written");
    // ... and by the data directory, one file at a time.
    restore_ok(&data, &[&full, &incr]);
    let err = restore_fails(&data, &[&foreign]);
    assert!(err.contains("another server"), "{err}");
    let restored = TestServer::start_on(&data, &[]);
    assert_eq!(
        snapshot(&restored, &f.buckets()),
        snapshot(&f.live, &f.buckets()),
        "the chain as it was"
    );
    // What the README says to do after a restore: the restored server's
    // increments from the version `kvdb restore` printed continue the
    // chain it was restored from.
    let own = f.file("own.kvdb");
    backup(&copy, v1, &own);
    let dr = f.fresh_dir("dr");
    restore_ok(&dr, &[&full, &own]);
    let served = TestServer::start_on(&dr, &[]);
    assert_eq!(
        snapshot(&served, &f.buckets()),
        snapshot(&copy, &f.buckets())
    );
}

#[test]
fn restoring_a_full_backup_into_a_non_empty_dir_fails() {
    let f = fixture();
    let full = f.file("full.kvdb");
    backup(&f.live, 0, &full);

    // A directory a server has used.
    let used = f.fresh_dir("used");
    let other = TestServer::start_on(&used, &[]);
    let mine = other.create_bucket("secret_key=mine");
    assert_eq!(other.put(&format!("/{mine}/k"), "mine").status, 204);
    assert!(other.terminate().success());
    restore_fails(&used, &[&full]);
    let other = TestServer::start_on(&used, &[]);
    // While a server holds the directory, the restore says so.
    let err = restore_fails(&used, &[&full]);
    assert!(
        err.contains("in use by another process") && err.contains("stop it"),
        "{err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
    assert_eq!(other.get(&format!("/{mine}/k")).text(), "mine");
    assert_eq!(
        other
            .request("HEAD", &format!("/{}", f.a), &[], None)
            .status,
        404,
        "nothing of the backup was mixed in"
    );
    drop(other);

    // A directory a full backup was already restored into.
    let data = f.fresh_dir("twice");
    restore_ok(&data, &[&full]);
    let err = restore_fails(&data, &[&full]);
    assert!(err.contains("restore into a new directory"), "{err}");
}

#[test]
fn restoring_into_the_memory_backend_is_refused_and_writes_nothing() {
    let f = fixture();
    let full = f.file("full.kvdb");
    backup(&f.live, 0, &full);
    let data = f.fresh_dir("memory");
    let out = kvdb_command()
        .env("KVDB_BACKEND", "memory")
        .env_remove("KVDB_DATA")
        .arg("restore")
        .arg("--data")
        .arg(&data)
        .arg(&full)
        .output()
        .expect("run kvdb restore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--backend redb"), "{stderr}");
    assert!(!data.exists(), "nothing written");
    // The same restore into the default backend works.
    restore_ok(&data, &[&full]);
}

/// The operator token: refused missing or wrong, with a Bearer challenge
/// only (a Basic one offered a login no operator route takes); the scheme's
/// name in any case (`bearer TOKEN` was refused as missing).
#[test]
fn backup_needs_the_operator_token() {
    let f = fixture();
    let r = f.live.request("GET", "/_admin/backup", &[], None);
    r.assert_problem(401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"kvdb operator\"")
    );
    let r = f.live.request(
        "GET",
        "/_admin/backup",
        &[("authorization", "Bearer wrong")],
        None,
    );
    r.assert_problem(401);
    assert!(
        r.text().contains("the operator token is wrong"),
        "{}",
        r.text()
    );
    for scheme in ["bearer", "BEARER"] {
        let auth = format!("{scheme} {OP}");
        let r = f
            .live
            .request("GET", "/_admin/backup", &[("authorization", &auth)], None);
        assert_eq!(r.status, 200, "{auth}: {}", r.text());
    }
    // A bucket's secret key is not the operator token.
    f.live
        .request(
            "GET",
            "/_admin/backup",
            &[("authorization", "Bearer sa")],
            None,
        )
        .assert_problem(401);

    // A backup is readable by its owner only: it holds the buckets' keys.
    let kept = f.file("kept.kvdb");
    // Also over a world-readable `.partial` an earlier run left behind.
    let mut partial = kept.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, "old").expect("stale partial");
    std::fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    backup(&f.live, 0, &kept);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kept).expect("backup file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let file = f.file("refused.kvdb");
    let out = backup_cmd(&f.live, "wrong", 0, &file);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "stderr: {stderr}");
    assert!(!file.exists(), "a refused backup leaves no file");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("version"),
        "no version printed"
    );

    // No token at all: the command refuses to run.
    let out = kvdb_command()
        .env_remove("KVDB_ADMIN_TOKEN")
        .arg("backup")
        .arg("--server")
        .arg(f.live.base())
        .arg("-o")
        .arg(&file)
        .output()
        .expect("run kvdb backup");
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
    assert!(!file.exists());
}

#[test]
fn backup_is_forbidden_when_the_server_has_no_admin_token() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    assert_eq!(s.put(&format!("/{b}/k"), "v").status, 204);
    for auth in ["Bearer optoken", "Bearer ", "Bearer sk"] {
        s.request("GET", "/_admin/backup", &[("authorization", auth)], None)
            .assert_problem(403);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("b.kvdb");
    let out = backup_cmd(&s, OP, 0, &file);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file.exists());
}

#[test]
fn truncated_backup_is_refused() {
    // Enough buckets and keys that a restore has to work in several batches.
    let live = TestServer::start_with(&["--admin-token", OP, "--durability", "relaxed"]);
    let buckets: Vec<String> = (0..12)
        .map(|_| live.create_bucket("secret_key=sk"))
        .collect();
    std::thread::scope(|scope| {
        for chunk in buckets.chunks(2) {
            let live = &live;
            scope.spawn(move || {
                for b in chunk {
                    for i in 0..250 {
                        let r = live.put(&format!("/{b}/k{i:04}"), &i.to_string());
                        assert_eq!(r.status, 204);
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("full.kvdb");
    let v1 = backup(&live, 0, &file);
    assert_eq!(live.put(&format!("/{}/later", buckets[0]), "1").status, 204);
    let incr = dir.path().join("incr.kvdb");
    backup(&live, v1, &incr);
    let bytes = std::fs::read(&file).expect("backup");
    let incr_bytes = std::fs::read(&incr).expect("increment");

    let mut partial = Vec::new();
    for (name, cut) in [
        ("header", 5),
        ("half", bytes.len() / 2),
        ("most", bytes.len() * 9 / 10),
        ("last-byte", bytes.len() - 1),
    ] {
        let truncated = dir.path().join(format!("{name}.kvdb"));
        std::fs::write(&truncated, &bytes[..cut]).expect("write");
        let data = dir.path().join(format!("data-{name}"));
        restore_fails(&data, &[&truncated]);
        partial.extend(served_after_failed_restore(&data, &buckets, name));
    }

    // A truncated increment after a good full backup: the full one stays.
    let truncated = dir.path().join("incr-cut.kvdb");
    std::fs::write(&truncated, &incr_bytes[..incr_bytes.len() - 1]).expect("write");
    let data = dir.path().join("data-incr");
    restore_ok(&data, &[&file]);
    restore_fails(&data, &[&truncated]);
    let restored = TestServer::start_on(&data, &[]);
    let last = buckets.last().expect("buckets");
    assert_eq!(restored.get(&format!("/{last}/k0249")).text(), "249");
    assert_eq!(restored.get(&format!("/{}/later", buckets[0])).status, 404);
    assert!(partial.is_empty(), "{}", partial.join("; "));
}

/// After a failed restore the directory is either refused by the server or
/// serves nothing of the backup, never a part of it as if it were whole: what
/// it serves anyway, described.
fn served_after_failed_restore(data: &Path, buckets: &[String], case: &str) -> Option<String> {
    let s = TestServer::try_start_on(data, &[]).ok()?;
    let served = buckets
        .iter()
        .filter(|b| s.request("HEAD", &format!("/{b}"), &[], None).status != 404)
        .count();
    (served > 0).then(|| {
        format!(
            "{case}: after the failed restore a server on the directory serves {served} of {} buckets",
            buckets.len()
        )
    })
}

/// `--output` naming a pipe or a device writes into it as it is: the rename
/// that keeps a half-written backup from looking whole would replace it
/// with a regular file (run as root, `--output /dev/null` replaced the
/// system's /dev/null). And `FILE.partial` is the temporary name, so a
/// `b.partial` of the user's next to `b.kvdb` is left alone.
#[test]
fn backup_into_a_pipe_leaves_it_a_pipe_and_a_users_partial_file_alone() {
    use std::os::unix::fs::FileTypeExt;
    let s = TestServer::start_with(&["--admin-token", OP]);
    let b = s.create_bucket("secret_key=sk");
    assert_eq!(s.put(&format!("/{b}/k"), "v").status, 204);
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).expect("read the pipe"))
    };
    let out = backup_cmd(&s, OP, 0, &fifo);
    // (Had the pipe been replaced, its reader would wait for ever: it is
    // left behind, and ends with the test process.)
    let kind = std::fs::metadata(&fifo).expect("the pipe").file_type();
    assert!(kind.is_fifo(), "the pipe was replaced: {kind:?}");
    if !out.status.success() {
        // Let the reader see the end before failing.
        let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
    }
    let through = reader.join().expect("reader");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What went through the pipe is a backup.
    let file = dir.path().join("b.kvdb");
    std::fs::write(&file, &through).expect("write");
    let restored = restore(&dir.path().join("restored"), &[&file]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    // The user's own b.partial stays as it was.
    let mine = dir.path().join("b.partial");
    std::fs::write(&mine, "mine").expect("write");
    let out = backup_cmd(&s, OP, 0, &file);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&mine).expect("read"), "mine");
    assert!(!dir.path().join("b.kvdb.partial").exists());
}

/// `kvdb backup` with its standard output redirected to `file` (and `args`
/// after the common ones).
fn backup_to_stdout(s: &TestServer, file: &Path, args: &[&str]) -> Output {
    let out = std::fs::File::create(file).expect("create");
    let child = kvdb_command()
        .env_remove("KVDB_ADMIN_TOKEN")
        .env_remove("KVDB_SERVER")
        .args(["backup", "--server", s.base(), "--admin-token", OP])
        .args(args)
        .stdout(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kvdb backup");
    child.wait_with_output().expect("wait")
}

#[track_caller]
fn assert_symlink(path: &Path) {
    let kind = std::fs::symlink_metadata(path).expect("link").file_type();
    assert!(kind.is_symlink(), "{} is no longer a link", path.display());
}

/// Found by a review: `--output` naming the command's own standard output
/// wrote the backup to a new file in its place (as root, `/dev/stdout` of
/// the machine), and the `version` line into the redirected output; a
/// symbolic link was replaced by a regular file and its target left empty.
#[test]
fn backup_into_its_own_stdout_or_a_symbolic_link_writes_through_it() {
    let s = TestServer::start_with(&["--admin-token", OP]);
    let b = s.create_bucket("secret_key=sk");
    assert_eq!(s.put(&format!("/{b}/k"), "v").status, 204);
    let dir = tempfile::tempdir().expect("temp dir");
    // `/proc/self/fd/1` rather than `/dev/stdout`: the old code's rename
    // can't replace it, so this test can't harm the machine it runs on.
    let redirected = dir.path().join("redirected.kvdb");
    let out = backup_to_stdout(&s, &redirected, &["-o", "/proc/self/fd/1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    restore_ok(&dir.path().join("from-stdout"), &[&redirected]);
    // A symbolic link stays one, and its target holds the backup.
    let target = dir.path().join("target.kvdb");
    std::fs::write(&target, "old contents, longer than nothing").expect("write");
    let link = dir.path().join("link.kvdb");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    backup(&s, 0, &link);
    assert_symlink(&link);
    restore_ok(&dir.path().join("from-link"), &[&target]);
    // A link whose target does not exist yet makes it.
    let later = dir.path().join("later.kvdb");
    let dangling = dir.path().join("dangling.kvdb");
    std::os::unix::fs::symlink(&later, &dangling).expect("symlink");
    backup(&s, 0, &dangling);
    assert_symlink(&dangling);
    restore_ok(&dir.path().join("from-later"), &[&later]);
}

/// Found by a review: two backups in one file (`cat full inc > f`)
/// restored the first and dropped the rest without a word; and a restore
/// from a pipe called the good backup in it corrupt (it is read twice).
#[test]
fn a_restore_refuses_two_backups_in_one_file_and_a_pipe() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let full = dir.path().join("full.kvdb");
    let v = backup(&f.live, 0, &full);
    change_after_full_backup(&f);
    let inc = dir.path().join("inc.kvdb");
    backup(&f.live, v, &inc);
    let both = dir.path().join("both.kvdb");
    let mut joined = std::fs::read(&full).expect("read");
    joined.extend(std::fs::read(&inc).expect("read"));
    std::fs::write(&both, joined).expect("write");
    let data = dir.path().join("restored");
    let err = restore_fails(&data, &[&both]);
    assert!(err.contains("a file holds one backup"), "{err}");
    let mut child = kvdb_command()
        .env_remove("KVDB_DATA")
        .env_remove("KVDB_BACKEND")
        .args(["restore", "--data"])
        .arg(&data)
        .arg("/dev/stdin")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kvdb restore");
    let mut stdin = child.stdin.take().expect("stdin");
    let bytes = std::fs::read(&full).expect("read");
    // A refusal may close the pipe before it is all written.
    let writer = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, &bytes);
    });
    let piped = child.wait_with_output().expect("wait");
    writer.join().expect("writer");
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!piped.status.success());
    assert!(err.contains("not a regular file"), "{err}");
    assert!(!data.exists(), "nothing written");
    restore_ok(&data, &[&full, &inc]);
}

/// Found by a review: a token given to `serve` with a space around it could
/// never match, as the token a request presents is trimmed.
#[test]
fn an_operator_token_with_spaces_around_it_works_as_without() {
    let s = TestServer::start_with(&["--admin-token", " spaced "]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("b.kvdb");
    for token in ["spaced", " spaced "] {
        let out = backup_cmd(&s, token, 0, &file);
        assert!(
            out.status.success(),
            "{token:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Serves one `GET /_admin/backup` on 127.0.0.1 as a proxy might pass on a
/// backup cut off midway: the headers of a real one (version `version`),
/// then `body` (written as one chunk with `chunked`, else delimited by the
/// connection's close), and the connection closes. Returns the server's
/// URL and the thread to join.
fn serve_cut_off(
    version: u64,
    body: Vec<u8>,
    chunked: bool,
) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let served = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        // The whole request (it has no body): closing with unread bytes
        // would reset the connection instead.
        let mut request = Vec::new();
        let mut byte = [0; 1];
        while !request.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).expect("the request");
            request.push(byte[0]);
        }
        let framing = if chunked {
            "transfer-encoding: chunked"
        } else {
            "connection: close"
        };
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.kvdb.backup\r\nx-kvdb-backup-version: {version}\r\nx-kvdb-backup-since: 0\r\n{framing}\r\n\r\n"
        )
        .expect("headers");
        if chunked {
            // One chunk, and never the last (empty) one.
            write!(conn, "{:x}\r\n", body.len()).expect("chunk size");
            conn.write_all(&body).expect("chunk");
            conn.write_all(b"\r\n").expect("chunk end");
        } else {
            conn.write_all(&body).expect("body");
        }
        let _ = conn.shutdown(std::net::Shutdown::Write);
    });
    (url, served)
}

/// Found by a review: a backup whose body ended early without a transport
/// error (delimited by the connection's close, as through a proxy, or a
/// server whose backup task died) was called complete, renamed into place
/// and its version printed; and one whose transfer broke left
/// `FILE.partial` behind without a word. Now each is refused, says to run
/// the backup again, and leaves neither file; to a pipe, it fails too.
#[test]
fn a_backup_cut_off_midway_is_refused_and_leaves_no_file() {
    let s = TestServer::start_with(&["--admin-token", OP]);
    let b = s.create_bucket("secret_key=sk");
    for i in 0..50 {
        assert_eq!(s.put(&format!("/{b}/k{i}"), "some value").status, 204);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let whole = dir.path().join("whole.kvdb");
    let version = backup(&s, 0, &whole);
    let bytes = std::fs::read(&whole).expect("backup");
    let half = bytes[..bytes.len() / 2].to_vec();
    let run = |url: &str, output: Option<&Path>| {
        let mut command = kvdb_command();
        command
            .env_remove("KVDB_ADMIN_TOKEN")
            .env_remove("KVDB_SERVER")
            .args(["backup", "--server", url, "--admin-token", OP]);
        if let Some(file) = output {
            command.arg("-o").arg(file);
        }
        command.output().expect("run kvdb backup")
    };
    for chunked in [false, true] {
        let (url, served) = serve_cut_off(version, half.clone(), chunked);
        let file = dir.path().join(format!("cut-{chunked}.kvdb"));
        let out = run(&url, Some(&file));
        served.join().expect("the fake server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "chunked {chunked}: {stderr}");
        assert!(
            stderr.contains("cut off") && stderr.contains("run the backup again"),
            "chunked {chunked}: {stderr}"
        );
        assert!(!stderr.contains("complete ("), "{stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("version"),
            "no version to continue from"
        );
        assert!(
            !file.exists(),
            "chunked {chunked}: a cut-off backup renamed"
        );
        let partial = dir.path().join(format!("cut-{chunked}.kvdb.partial"));
        assert!(
            !partial.exists(),
            "chunked {chunked}: the incomplete .partial left"
        );
        assert!(stderr.contains("was removed"), "{stderr}");
    }
    // To standard output (a pipe): what went through is incomplete, and
    // the command says so.
    let (url, served) = serve_cut_off(version, half.clone(), false);
    let out = run(&url, None);
    served.join().expect("the fake server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cut off") && stderr.contains("standard output is incomplete"),
        "{stderr}"
    );
    assert_eq!(out.stdout, half, "streamed as it came");
    // A whole backup under a header that names another version: the
    // version printed is the one the file holds (found by a review).
    let (url, served) = serve_cut_off(version + 7, bytes.clone(), false);
    let file = dir.path().join("whole-again.kvdb");
    let out = run(&url, Some(&file));
    served.join().expect("the fake server");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("version {version}")
    );
}

//! What is acknowledged stays: across `kill -9`, SIGTERM, and with the
//! other backends and durability modes.

use serde_json::json;

use crate::harness::TestServer;

const THREADS: usize = 8;
const PER_THREAD: usize = 40;

#[test]
fn acknowledged_writes_survive_kill_9() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    for i in 0..200 {
        let r = s.put(&format!("/{b}/seq-{i:03}"), &format!("value {i}"));
        assert_eq!(r.status, 204, "PUT seq-{i}: {}", r.text());
        let r = s.patch(&format!("/{b}/seq-counter"), "+1");
        assert_eq!(r.status, 200, "PATCH: {}", r.text());
    }
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (s, b) = (&s, &b);
            scope.spawn(move || {
                for i in 0..PER_THREAD {
                    let r = s.put(&format!("/{b}/t{t}-{i:03}"), &format!("{t}:{i}"));
                    assert_eq!(r.status, 204, "{}", r.text());
                    let r = s.patch(&format!("/{b}/shared-counter"), "+1");
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            });
        }
    });

    assert!(s.data_dir().exists(), "the data directory is created");
    let s = s.restart_after_kill();
    for i in 0..200 {
        let r = s.get(&format!("/{b}/seq-{i:03}"));
        assert_eq!(
            (r.status, r.text()),
            (200, format!("value {i}")),
            "seq-{i} after kill -9"
        );
    }
    assert_eq!(s.get(&format!("/{b}/seq-counter")).text(), "200");
    for t in 0..THREADS {
        for i in 0..PER_THREAD {
            let r = s.get(&format!("/{b}/t{t}-{i:03}"));
            assert_eq!(
                (r.status, r.text()),
                (200, format!("{t}:{i}")),
                "t{t}-{i} after kill -9"
            );
        }
    }
    assert_eq!(
        s.get(&format!("/{b}/shared-counter")).text(),
        (THREADS * PER_THREAD).to_string()
    );
    let list = s.request(
        "GET",
        &format!("/{b}/?format=json"),
        &[("authorization", "Bearer sk")],
        None,
    );
    let keys = list.json();
    assert_eq!(
        keys.as_array().expect("list").len(),
        200 + 1 + THREADS * PER_THREAD + 1
    );
}

/// `PATCH /bucket` with the secret key and a form body, answered 200.
fn change_policy(s: &TestServer, bucket: &str, secret: &str, fields: &str) {
    let auth = format!("Bearer {secret}");
    let r = s.request(
        "PATCH",
        &format!("/{bucket}"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Some(fields.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// `DELETE /bucket` with the secret key, answered 204.
fn delete_bucket(s: &TestServer, bucket: &str, secret: &str) {
    let auth = format!("Bearer {secret}");
    let r = s.request(
        "DELETE",
        &format!("/{bucket}"),
        &[("authorization", auth.as_str())],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
}

#[test]
fn acknowledged_deletes_and_policy_changes_survive_kill_9() {
    let s = TestServer::start();
    let a = s.create_bucket("secret_key=sa");
    let gone = s.create_bucket("secret_key=sg");
    assert_eq!(s.put(&format!("/{a}/kept"), "1").status, 204);
    assert_eq!(s.put(&format!("/{a}/deleted"), "2").status, 204);
    assert_eq!(s.put(&format!("/{gone}/k"), "3").status, 204);
    let token = s.token(&a, "sa", "permissions=read,write");
    assert_eq!(s.delete(&format!("/{a}/deleted")).status, 204);
    change_policy(&s, &a, "sa", "read_key=rk&default_ttl=0");
    delete_bucket(&s, &gone, "sg");

    let s = s.restart_after_kill();
    assert_eq!(s.get(&format!("/{a}/kept")).status, 401, "read_key lost");
    let auth = [("authorization", "Bearer rk")];
    assert_eq!(
        s.request("GET", &format!("/{a}/kept"), &auth, None).text(),
        "1"
    );
    assert_eq!(
        s.request("GET", &format!("/{a}/deleted"), &auth, None)
            .status,
        404
    );
    let with_token = format!("Bearer {token}");
    assert_eq!(
        s.request(
            "GET",
            &format!("/{a}/kept"),
            &[("authorization", &with_token)],
            None
        )
        .text(),
        "1",
        "a token issued before the crash still works"
    );
    assert_eq!(
        s.request("HEAD", &format!("/{gone}"), &[], None).status,
        404
    );
}

#[test]
fn sigterm_exits_zero_and_the_data_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let s = TestServer::start_on(&data, &[]);
    let b = s.create_bucket("secret_key=sk");
    for i in 0..50 {
        assert_eq!(s.put(&format!("/{b}/k{i:02}"), &i.to_string()).status, 204);
    }
    assert_eq!(s.patch(&format!("/{b}/n"), "+7").text(), "7");
    assert!(s.terminate().success(), "SIGTERM must exit 0");

    let s = TestServer::start_on(&data, &[]);
    for i in 0..50 {
        assert_eq!(s.get(&format!("/{b}/k{i:02}")).text(), i.to_string());
    }
    assert_eq!(s.patch(&format!("/{b}/n"), "+1").text(), "8");
    assert!(s.terminate().success());
}

/// A full disk: writes it refuses are 500s that change nothing, reads go
/// on, and the stop that can't sync says so with a failing exit status
/// (with relaxed durability the writes answered since the last good sync
/// are lost then; it logged the error and exited 0 as if all was well).
#[test]
fn a_stop_whose_last_sync_fails_exits_non_zero() {
    for durability in ["relaxed", "strict"] {
        let status = TestServer::on_a_small_disk(2048, &["--durability", durability], |s| {
            let b = s.create_bucket("");
            let value = "v".repeat(100_000);
            let mut answered = Vec::new();
            for i in 0..60 {
                let r = s.put(&format!("/{b}/k{i}"), &value);
                answered.push(r.status);
                if r.status == 500 {
                    r.assert_problem(500);
                    s.get(&format!("/{b}/k{i}")).assert_problem(404);
                    break;
                }
            }
            assert_eq!(answered.first(), Some(&204), "{durability}: {answered:?}");
            assert_eq!(answered.last(), Some(&500), "{durability}: {answered:?}");
            assert_eq!(s.get(&format!("/{b}/k0")).text().len(), 100_000);
        });
        assert_eq!(status.code(), Some(1), "{durability}: {status:?}");
    }
}

#[test]
fn memory_backend_sets_and_gets() {
    let s = TestServer::start_with(&["--backend", "memory"]);
    let b = s.create_bucket("secret_key=sk");
    assert_eq!(s.put(&format!("/{b}/k"), "v").status, 204);
    assert_eq!(s.get(&format!("/{b}/k")).text(), "v");
    assert_eq!(s.patch(&format!("/{b}/n"), "+3").text(), "3");
    let list = s.request(
        "GET",
        &format!("/{b}/?format=json"),
        &[("authorization", "Bearer sk")],
        None,
    );
    assert_eq!(list.json(), json!(["k", "n"]));
    assert_eq!(s.delete(&format!("/{b}/k")).status, 204);
    assert_eq!(s.get(&format!("/{b}/k")).status, 404);
    assert!(s.terminate().success());
}

/// The memory backend's start-up line says nothing is kept, and names no
/// data directory (it named the default one, as if data were kept there);
/// the redb backend's names its directory.
#[test]
fn the_ready_line_names_a_data_directory_only_when_one_is_used() {
    let ready = |log: &str| {
        log.lines()
            .find(|l| l.contains("kvdb is ready"))
            .unwrap_or_else(|| panic!("no ready line in {log}"))
            .to_owned()
    };
    let memory = ready(&TestServer::log_while(&["--backend", "memory"], |_| {}));
    assert!(!memory.contains("data="), "{memory}");
    assert!(memory.contains("lost when it stops"), "{memory}");
    let redb = ready(&TestServer::log_while(&[], |_| {}));
    assert!(redb.contains("data="), "{redb}");
}

/// With relaxed durability too, a change of what may be done is on disk
/// before it is answered: a crash undid a revocation (a new signing key),
/// a lock-down (a write key), a script and a bucket's deletion, all
/// answered (found by a review). The client writes before them are kept
/// with them.
#[test]
fn relaxed_durability_keeps_answered_policy_script_and_bucket_changes_across_kill_9() {
    let s = TestServer::start_with(&["--durability", "relaxed"]);
    let a = s.create_bucket("secret_key=sa");
    let gone = s.create_bucket("secret_key=sg");
    let token = s.token(&a, "sa", "permissions=read,write");
    assert_eq!(s.put(&format!("/{a}/before"), "1").status, 204);
    let r = s.request(
        "PUT",
        &format!("/{a}/scripts/hello"),
        &[("authorization", "Bearer sa")],
        Some(b"kvdb.say('hello')"),
    );
    assert!(r.status < 300, "{}", r.text());
    change_policy(&s, &a, "sa", "signing_key=rotated-signing-key&write_key=wk");
    delete_bucket(&s, &gone, "sg");

    let s = s.restart_after_kill();
    let with_token = format!("Bearer {token}");
    s.request(
        "PUT",
        &format!("/{a}/k"),
        &[("authorization", &with_token)],
        Some(b"x"),
    )
    .assert_problem(401);
    s.put(&format!("/{a}/k"), "x").assert_problem(401);
    assert_eq!(s.get(&format!("/{a}/scripts/hello")).text(), "hello\n");
    assert_eq!(s.get(&format!("/{a}/before")).text(), "1");
    assert_eq!(
        s.request("HEAD", &format!("/{gone}"), &[], None).status,
        404
    );
}

#[test]
fn relaxed_durability_sets_gets_and_keeps_data_after_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let args = ["--durability", "relaxed"];
    let s = TestServer::start_on(&data, &args);
    let b = s.create_bucket("secret_key=sk");
    for i in 0..100 {
        assert_eq!(
            s.put(&format!("/{b}/k{i:03}"), &format!("v{i}")).status,
            204
        );
    }
    assert_eq!(s.get(&format!("/{b}/k042")).text(), "v42");
    assert!(s.terminate().success(), "SIGTERM must exit 0");

    let s = TestServer::start_on(&data, &args);
    for i in 0..100 {
        let r = s.get(&format!("/{b}/k{i:03}"));
        assert_eq!((r.status, r.text()), (200, format!("v{i}")), "k{i}");
    }
    assert!(s.terminate().success());
}

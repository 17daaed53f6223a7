//! Bucket life cycle: creation, policy, updates, deletion, isolation.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Resp, TestServer};

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const JSON: (&str, &str) = ("content-type", "application/json");

fn as_(s: &TestServer, method: &str, path: &str, credential: &str, body: Option<&str>) -> Resp {
    let auth = format!("Bearer {credential}");
    s.request(
        method,
        path,
        &[("authorization", auth.as_str())],
        body.map(str::as_bytes),
    )
}

/// `PATCH /:bucket` with a form body and the given credential.
fn patch_policy(s: &TestServer, b: &str, credential: &str, form: &str) -> Resp {
    let auth = format!("Bearer {credential}");
    s.request(
        "PATCH",
        &format!("/{b}"),
        &[("authorization", auth.as_str()), FORM],
        Some(form.as_bytes()),
    )
}

fn policy(s: &TestServer, b: &str, secret: &str) -> serde_json::Value {
    let r = as_(s, "GET", &format!("/{b}"), secret, None);
    assert_eq!(r.status, 200, "GET /{b}: {}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "policy content type"
    );
    r.json()
}

#[test]
fn create_bucket_with_form_fields_answers_201_and_a_text_id() {
    let s = TestServer::start();
    let r = s.post(
        "/",
        "secret_key=sk&read_key=rk&write_key=wk&default_ttl=100&email=ops%40example.com",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{:?}",
        r.header("content-type")
    );
    let b = r.text();
    assert_eq!(b.len(), 22, "{b:?}");
    assert!(b.chars().all(|c| c.is_ascii_alphanumeric()), "{b:?}");
    let p = policy(&s, &b, "sk");
    assert_eq!(p["bucket"], b.as_str());
    assert_eq!(p["secret_key"], "sk");
    assert_eq!(p["read_key"], "rk");
    assert_eq!(p["write_key"], "wk");
    assert_eq!(p["default_ttl"], 100);
    assert_eq!(p["email"], "ops@example.com");
    assert!(p["created_at"].is_i64(), "created_at in Unix seconds: {p}");
    assert!(p.get("signing_key").is_none(), "signing_key leaked: {p}");
}

#[test]
fn create_bucket_with_a_json_body() {
    let s = TestServer::start();
    let r = s.request(
        "POST",
        "/",
        &[JSON],
        Some(br#"{"secret_key":"sk","read_key":"rk","default_ttl":5}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.text();
    let p = policy(&s, &b, "sk");
    assert_eq!(p["read_key"], "rk");
    assert_eq!(p["default_ttl"], 5);
    assert!(p["write_key"].is_null(), "{p}");
    assert_eq!(s.request("GET", &format!("/{b}/k"), &[], None).status, 401);
}

#[test]
fn create_bucket_answers_json_when_asked() {
    let s = TestServer::start();
    let r = s.request(
        "POST",
        "/",
        &[FORM, ("accept", "application/json")],
        Some(b"secret_key=sk"),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    let doc = r.json();
    let b = doc["bucket"].as_str().expect("bucket").to_owned();
    assert_eq!(b.len(), 22);
    assert_eq!(s.request("HEAD", &format!("/{b}"), &[], None).status, 200);
    assert_eq!(policy(&s, &b, "sk")["bucket"], b.as_str());
}

#[test]
fn bucket_ids_are_unique() {
    let s = TestServer::start();
    let ids: HashSet<String> = (0..20).map(|_| s.create_bucket("")).collect();
    assert_eq!(ids.len(), 20);
}

#[test]
fn head_bucket_is_200_or_404_without_credentials() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk&write_key=wk");
    let r = s.request("HEAD", &format!("/{b}"), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(
        s.request("HEAD", "/AAAAAAAAAAAAAAAAAAAAAA", &[], None)
            .status,
        404
    );
    assert_eq!(s.request("HEAD", "/zzz", &[], None).status, 404);
    // Not UTF-8 once decoded: no bucket id either (it was axum's 400).
    assert_eq!(s.request("HEAD", "/%FF", &[], None).status, 404);
    // A percent-encoded id is the id.
    let encoded = format!("/%{:02X}{}", b.as_bytes()[0], &b[1..]);
    assert_eq!(s.request("HEAD", &encoded, &[], None).status, 200);
}

#[test]
fn policy_needs_the_secret_key_and_never_shows_the_signing_key() {
    let s = TestServer::start();
    let b =
        s.create_bucket("secret_key=sk&read_key=rk&write_key=wk&signing_key=sig-0123456789abcdef");
    let path = format!("/{b}");
    s.request("GET", &path, &[], None).assert_problem(401);
    as_(&s, "GET", &path, "rk", None).assert_problem(403);
    as_(&s, "GET", &path, "wk", None).assert_problem(403);
    as_(&s, "GET", &path, "nope", None).assert_problem(401);
    let p = policy(&s, &b, "sk");
    for field in [
        "bucket",
        "secret_key",
        "read_key",
        "write_key",
        "default_ttl",
        "email",
        "created_at",
    ] {
        assert!(p.get(field).is_some(), "policy without {field}: {p}");
    }
    assert!(p.get("signing_key").is_none(), "{p}");
    assert!(!p.to_string().contains("\"sig\""), "{p}");
}

#[test]
fn patch_policy_updates_fields_and_answers_the_new_policy() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk");
    as_(&s, "PUT", &format!("/{b}/k"), "sk", Some("v"));
    let r = patch_policy(
        &s,
        &b,
        "sk",
        "read_key=rk2&write_key=wk2&default_ttl=60&email=a%40b.c",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    assert_eq!(p["read_key"], "rk2");
    assert_eq!(p["write_key"], "wk2");
    assert_eq!(p["default_ttl"], 60);
    assert_eq!(p["email"], "a@b.c");
    assert!(p.get("signing_key").is_none());
    assert_eq!(policy(&s, &b, "sk"), p);
    as_(&s, "GET", &format!("/{b}/k"), "rk", None).assert_problem(401);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk2", None).text(), "v");
    as_(&s, "PUT", &format!("/{b}/k"), "rk2", Some("x")).assert_problem(403);
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/k"), "wk2", Some("x")).status,
        204
    );
}

#[test]
fn patch_policy_takes_a_json_body() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    let r = s.request(
        "PATCH",
        &format!("/{b}"),
        &[("authorization", "Bearer sk"), JSON],
        Some(br#"{"read_key":"rk","default_ttl":30}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["read_key"], "rk");
    assert_eq!(r.json()["default_ttl"], 30);
    assert_eq!(s.request("GET", &format!("/{b}/k"), &[], None).status, 401);
}

#[test]
fn patch_with_an_empty_string_unsets_read_and_write_keys() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk&write_key=wk");
    as_(&s, "PUT", &format!("/{b}/k"), "sk", Some("v"));
    assert_eq!(s.get(&format!("/{b}/k")).status, 401);
    let r = patch_policy(&s, &b, "sk", "read_key=&write_key=");
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    assert!(p["read_key"].is_null(), "read_key still set: {p}");
    assert!(p["write_key"].is_null(), "write_key still set: {p}");
    let got = s.get(&format!("/{b}/k"));
    assert_eq!((got.status, got.text().as_str()), (200, "v"));
    assert_eq!(s.put(&format!("/{b}/k"), "anyone").status, 204);
    assert_eq!(s.get(&format!("/{b}/k")).text(), "anyone");
}

#[test]
fn patch_cannot_unset_the_secret_key() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    patch_policy(&s, &b, "sk", "secret_key=").assert_problem(400);
    assert_eq!(policy(&s, &b, "sk")["secret_key"], "sk");
}

/// Found by a review: `read_key=a%0Ab` was taken, a key that only `?key=`
/// could present (`Authorization: Bearer` can't carry a line break).
#[test]
fn keys_a_header_cannot_carry_are_400_and_change_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    for form in ["read_key=a%0Ab", "write_key=%00", "secret_key=sk2%20"] {
        let detail = patch_policy(&s, &b, "sk", form).assert_problem(400);
        assert!(
            detail.contains(
                "has a control character (a tab, a line break…) or starts or ends with white space"
            ),
            "{detail}"
        );
    }
    let p = policy(&s, &b, "sk");
    assert_eq!(
        (&p["secret_key"], &p["read_key"], &p["write_key"]),
        (&json!("sk"), &json!(null), &json!(null))
    );
    let r = s.request("POST", "/", &[FORM], Some(b"secret_key=%09sk"));
    r.assert_problem(400);
    // A form's `+` is a space: the message says how to write one.
    let detail = patch_policy(&s, &b, "sk", "read_key=+abc").assert_problem(400);
    assert!(detail.contains("write a literal + as %2B"), "{detail}");
}

#[test]
fn patch_can_change_the_secret_key() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    let r = patch_policy(&s, &b, "sk", "secret_key=sk2");
    assert_eq!(r.status, 200, "{}", r.text());
    as_(&s, "GET", &format!("/{b}"), "sk", None).assert_problem(401);
    assert_eq!(policy(&s, &b, "sk2")["secret_key"], "sk2");
}

#[test]
fn patch_with_an_unknown_field_is_400_and_changes_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk");
    let before = policy(&s, &b, "sk");
    patch_policy(&s, &b, "sk", "read_key=changed&colour=blue").assert_problem(400);
    let r = s.request(
        "PATCH",
        &format!("/{b}"),
        &[("authorization", "Bearer sk"), JSON],
        Some(br#"{"read_key":"changed","colour":"blue"}"#),
    );
    r.assert_problem(400);
    assert_eq!(policy(&s, &b, "sk"), before);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).status, 404);
    as_(&s, "GET", &format!("/{b}/k"), "changed", None).assert_problem(401);
}

#[test]
fn patch_with_a_bad_default_ttl_is_400_and_changes_nothing() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&default_ttl=10");
    patch_policy(&s, &b, "sk", "default_ttl=abc").assert_problem(400);
    patch_policy(&s, &b, "sk", "default_ttl=-1").assert_problem(400);
    assert_eq!(policy(&s, &b, "sk")["default_ttl"], 10);
}

#[test]
fn patch_policy_needs_the_secret_key() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk&write_key=wk");
    let r = s.request("PATCH", &format!("/{b}"), &[FORM], Some(b"read_key="));
    r.assert_problem(401);
    patch_policy(&s, &b, "wk", "read_key=").assert_problem(403);
    patch_policy(&s, &b, "rk", "read_key=").assert_problem(403);
    assert_eq!(policy(&s, &b, "sk")["read_key"], "rk");
}

#[test]
fn default_ttl_applies_to_keys_written_without_a_ttl() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    let r = patch_policy(&s, &b, "sk", "default_ttl=1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.put(&format!("/{b}/short"), "x").status, 204);
    assert_eq!(s.put(&format!("/{b}/kept?ttl=0"), "y").status, 204);
    assert_eq!(s.put(&format!("/{b}/longer?ttl=3600"), "z").status, 204);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(s.get(&format!("/{b}/short")).status, 404);
    assert_eq!(s.get(&format!("/{b}/kept")).text(), "y");
    assert_eq!(s.get(&format!("/{b}/longer")).text(), "z");
    let list = as_(&s, "GET", &format!("/{b}/?format=json"), "sk", None);
    assert_eq!(list.json(), json!(["kept", "longer"]));
}

#[test]
fn bucket_without_secret_key_has_no_admin_forever() {
    let s = TestServer::start();
    let b = s.create_bucket("read_key=rk&write_key=wk");
    as_(&s, "PUT", &format!("/{b}/k"), "wk", Some("v"));
    for cred in [None, Some("rk"), Some("wk")] {
        let headers: Vec<(&str, String)> = cred
            .map(|c| vec![("authorization", format!("Bearer {c}"))])
            .unwrap_or_default();
        let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s.request("GET", &format!("/{b}"), &h, None)
            .assert_problem(403);
        s.request("DELETE", &format!("/{b}"), &h, None)
            .assert_problem(403);
        s.request("DELETE", &format!("/{b}/"), &h, None)
            .assert_problem(403);
        s.request("POST", &format!("/{b}/tokens/"), &h, Some(b""))
            .assert_problem(403);
        h.push(FORM);
        for body in ["read_key=", "secret_key=mine"] {
            s.request("PATCH", &format!("/{b}"), &h, Some(body.as_bytes()))
                .assert_problem(403);
        }
    }
    // Nothing changed: the bucket is there and its keys still hold.
    assert_eq!(s.request("HEAD", &format!("/{b}"), &[], None).status, 200);
    assert_eq!(s.get(&format!("/{b}/k")).status, 401);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
    // The attempted secret key was not taken: it is a wrong credential.
    as_(&s, "GET", &format!("/{b}"), "mine", None).assert_problem(401);
}

#[track_caller]
fn assert_bucket_gone(s: &TestServer, b: &str, token: &str) {
    for (method, path, cred) in [
        ("HEAD", format!("/{b}"), ""),
        ("GET", format!("/{b}"), "sk"),
        ("PATCH", format!("/{b}"), "sk"),
        ("DELETE", format!("/{b}"), "sk"),
        ("DELETE", format!("/{b}/"), "sk"),
        ("GET", format!("/{b}/"), "sk"),
        ("GET", format!("/{b}/?format=json"), ""),
        ("GET", format!("/{b}/k"), "sk"),
        ("GET", format!("/{b}/k"), token),
        ("HEAD", format!("/{b}/k"), "sk"),
        ("PUT", format!("/{b}/k"), "sk"),
        ("PUT", format!("/{b}/k"), ""),
        ("PATCH", format!("/{b}/n"), "sk"),
        ("DELETE", format!("/{b}/k"), "sk"),
        ("POST", format!("/{b}/tokens/"), "sk"),
    ] {
        let body = matches!(method, "PUT" | "PATCH").then_some("+1");
        let r = if cred.is_empty() {
            s.request(method, &path, &[], body.map(str::as_bytes))
        } else {
            as_(s, method, &path, cred, body)
        };
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
    }
}

#[test]
fn delete_bucket_answers_204_and_then_every_route_is_404() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    as_(&s, "PUT", &format!("/{b}/k"), "sk", Some("v"));
    let token = s.token(&b, "sk", "permissions=read");
    let r = as_(&s, "DELETE", &format!("/{b}"), "sk", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_bucket_gone(&s, &b, &token);
}

#[test]
fn delete_bucket_with_a_trailing_slash_answers_204_too() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    as_(&s, "PUT", &format!("/{b}/k"), "sk", Some("v"));
    let token = s.token(&b, "sk", "permissions=read");
    let r = as_(&s, "DELETE", &format!("/{b}/"), "sk", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_bucket_gone(&s, &b, &token);
}

#[test]
fn delete_bucket_needs_the_secret_key() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&write_key=wk");
    as_(&s, "PUT", &format!("/{b}/k"), "sk", Some("v"));
    s.delete(&format!("/{b}")).assert_problem(401);
    as_(&s, "DELETE", &format!("/{b}"), "wk", None).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}/"), "wk", None).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}"), "nope", None).assert_problem(401);
    assert_eq!(s.get(&format!("/{b}/k")).text(), "v");
}

#[test]
fn deleting_one_bucket_leaves_another_intact() {
    let s = TestServer::start();
    let a = s.create_bucket("secret_key=sa");
    let b = s.create_bucket("secret_key=sb");
    for k in ["k1", "k2", "k3"] {
        assert_eq!(s.put(&format!("/{a}/{k}"), &format!("a-{k}")).status, 204);
        assert_eq!(s.put(&format!("/{b}/{k}"), &format!("b-{k}")).status, 204);
    }
    assert_eq!(as_(&s, "DELETE", &format!("/{a}"), "sa", None).status, 204);
    assert_eq!(s.request("HEAD", &format!("/{a}"), &[], None).status, 404);
    assert_eq!(s.request("HEAD", &format!("/{b}"), &[], None).status, 200);
    for k in ["k1", "k2", "k3"] {
        assert_eq!(s.get(&format!("/{b}/{k}")).text(), format!("b-{k}"));
    }
    let list = as_(&s, "GET", &format!("/{b}/?format=json"), "sb", None);
    assert_eq!(list.json(), json!(["k1", "k2", "k3"]));
    assert_eq!(policy(&s, &b, "sb")["secret_key"], "sb");
}

#[test]
fn two_buckets_never_see_each_others_keys() {
    let s = TestServer::start();
    let a = s.create_bucket("secret_key=sa");
    let b = s.create_bucket("secret_key=sb");
    assert_eq!(s.put(&format!("/{a}/shared"), "from-a").status, 204);
    assert_eq!(s.put(&format!("/{a}/only-a"), "1").status, 204);
    assert_eq!(s.put(&format!("/{b}/shared"), "from-b").status, 204);
    assert_eq!(s.get(&format!("/{a}/shared")).text(), "from-a");
    assert_eq!(s.get(&format!("/{b}/shared")).text(), "from-b");
    assert_eq!(s.get(&format!("/{b}/only-a")).status, 404);
    assert_eq!(
        as_(&s, "GET", &format!("/{a}/?format=json"), "sa", None).json(),
        json!(["only-a", "shared"])
    );
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/?format=json"), "sb", None).json(),
        json!(["shared"])
    );
    // A's secret key is nobody in B.
    as_(&s, "GET", &format!("/{b}/"), "sa", None).assert_problem(401);
    as_(&s, "GET", &format!("/{b}"), "sa", None).assert_problem(401);
    assert_eq!(s.delete(&format!("/{b}/shared")).status, 204);
    assert_eq!(s.get(&format!("/{a}/shared")).text(), "from-a");
    assert_eq!(s.patch(&format!("/{a}/n"), "+5").text(), "5");
    assert_eq!(s.patch(&format!("/{b}/n"), "+1").text(), "1");
}

#[test]
fn create_bucket_with_bad_fields_is_400() {
    let s = TestServer::start();
    for body in ["secret_key=sk&default_ttl=abc", "default_ttl=-1"] {
        s.post("/", body).assert_problem(400);
    }
    s.request("POST", "/", &[JSON], Some(b"{not json"))
        .assert_problem(400);
    s.request("POST", "/", &[JSON], Some(br#"{"default_ttl":"soon"}"#))
        .assert_problem(400);
    // The same bounds as a token's ttl (100 years), the bad value echoed.
    for (body, shown) in [
        ("default_ttl=3153600001", "3153600001"),
        ("default_ttl=18446744073709551615", "18446744073709551615"),
        ("default_ttl=%2B5", "+5"),
    ] {
        let detail = s.post("/", body).assert_problem(400);
        assert!(
            detail.contains("100 years") && detail.contains(shown),
            "{body}: {detail}"
        );
    }
    let r = s.post("/", "default_ttl=3153600000");
    assert_eq!(r.status, 201, "{}", r.text());
}

/// A field given twice (a typo, a script that appends) is refused rather
/// than the last one silently taken: it could set a secret other than the
/// one meant. Form and JSON alike, on creation and on update.
#[test]
fn a_policy_field_given_twice_is_400() {
    let s = TestServer::start();
    let detail = s.post("/", "secret_key=a&secret_key=b").assert_problem(400);
    assert!(detail.contains("\"secret_key\" is given twice"), "{detail}");
    let r = s.request(
        "POST",
        "/",
        &[JSON],
        Some(br#"{"secret_key":"a","read_key":"r","secret_key":"b"}"#),
    );
    assert!(
        r.assert_problem(400).contains("given twice"),
        "{}",
        r.text()
    );
    let b = s.create_bucket("secret_key=sk");
    patch_policy(&s, &b, "sk", "read_key=x&read_key=y").assert_problem(400);
    assert_eq!(patch_policy(&s, &b, "sk", "read_key=x").status, 200);
    let r = s.request(
        "GET",
        &format!("/{b}"),
        &[("authorization", "Bearer sk")],
        None,
    );
    assert_eq!(r.json()["read_key"], "x", "{}", r.text());
}

#[test]
fn create_bucket_with_an_empty_key_is_400_naming_it() {
    // As `curl -d "secret_key=$SECRET"` sends with SECRET unset: a bucket
    // without an admin for ever, or open to anyone, would be a silent trap.
    let s = TestServer::start();
    for (body, field) in [
        ("secret_key=", "secret_key"),
        ("secret_key=s&read_key=", "read_key"),
        ("secret_key=s&write_key=", "write_key"),
        ("secret_key=s&signing_key=", "signing_key"),
    ] {
        let detail = s.post("/", body).assert_problem(400);
        assert!(
            detail.starts_with(&format!("{field} is empty")),
            "{body}: {detail}"
        );
    }
    let detail = s
        .request("POST", "/", &[JSON], Some(br#"{"secret_key":""}"#))
        .assert_problem(400);
    assert!(detail.starts_with("secret_key is empty"), "{detail}");
    // An empty email is no key: accepted.
    assert_eq!(s.post("/", "secret_key=s&email=").status, 201);
}

/// A signing key given shorter than 16 characters is refused, at creation
/// and in an update, saying how to make one (`signing_key=newkey` was
/// taken, and tokens could be forged from any one it signed).
#[test]
fn a_short_signing_key_is_400_saying_how_to_make_one() {
    let s = TestServer::start();
    let detail = s
        .post("/", "secret_key=sk&signing_key=newkey")
        .assert_problem(400);
    assert!(
        detail.contains("signing_key has 6 characters") && detail.contains("openssl rand"),
        "{detail}"
    );
    let b = s.create_bucket("secret_key=sk");
    let token = s.token(&b, "sk", "permissions=read");
    patch_policy(&s, &b, "sk", "signing_key=0123456789abcde").assert_problem(400);
    // Nothing changed: the token still works.
    let auth = format!("Bearer {token}");
    let r = s.request(
        "GET",
        &format!("/{b}/absent"),
        &[("authorization", auth.as_str())],
        None,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // Sixteen will do, and revokes it.
    assert_eq!(
        patch_policy(&s, &b, "sk", "signing_key=0123456789abcdef").status,
        200
    );
    let r = s.request(
        "GET",
        &format!("/{b}/absent"),
        &[("authorization", auth.as_str())],
        None,
    );
    r.assert_problem(401);
}

#[test]
fn form_fields_that_are_not_utf8_are_400_not_replaced() {
    let s = TestServer::start();
    // Creation: nothing is created.
    let detail = s
        .post("/", "secret_key=sk&read_key=%FF")
        .assert_problem(400);
    assert!(
        detail.contains(r#"the value of the form field "read_key" is not valid UTF-8"#),
        "{detail}"
    );
    let b = s.create_bucket("secret_key=sk&read_key=rk");
    // An update: the key stays as it was.
    patch_policy(&s, &b, "sk", "read_key=%FF").assert_problem(400);
    assert_eq!(policy(&s, &b, "sk")["read_key"], "rk");
    // A token request: no token with a replaced prefix.
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[("authorization", "Bearer sk"), FORM],
        Some(b"prefix=%FF&permissions=read"),
    );
    r.assert_problem(400);
    // Raw bytes that are not UTF-8 in a form body.
    let r = s.request(
        "PATCH",
        &format!("/{b}"),
        &[("authorization", "Bearer sk"), FORM],
        Some(b"email=\xff"),
    );
    assert!(r.assert_problem(400).contains("not valid UTF-8"));
}

/// Fields come as a form (also `text/plain`, what a browser's `fetch` sends
/// with a string) or as a JSON object; a body of any other type is a 415
/// that says so, not an error about the fields a form reading made of it.
#[test]
fn fields_of_another_media_type_are_415_and_change_nothing() {
    let s = TestServer::start();
    for ct in ["application/xml", "multipart/form-data; boundary=x"] {
        let r = s.request("POST", "/", &[("content-type", ct)], Some(b"<a/>"));
        let detail = r.assert_problem(415);
        assert!(
            detail.contains("URL-encoded form") && detail.contains(ct),
            "{detail}"
        );
        assert_eq!(r.header("location"), None);
    }
    let r = s.request(
        "POST",
        "/",
        &[("content-type", "text/plain;charset=UTF-8")],
        Some(b"secret_key=sk"),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.text().trim().to_owned();
    let before = policy(&s, &b, "sk");
    let r = s.request(
        "PATCH",
        &format!("/{b}"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "application/xml"),
        ],
        Some(b"read_key=rk"),
    );
    r.assert_problem(415);
    assert_eq!(policy(&s, &b, "sk"), before);
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "multipart/form-data; boundary=x"),
        ],
        Some(b"permissions=write"),
    );
    r.assert_problem(415);
}

//! Credentials, the permission model of bucket keys, and access tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::harness::{Resp, TestServer, basic_auth};

/// A request with `Authorization: Bearer <credential>`.
fn as_(s: &TestServer, method: &str, path: &str, credential: &str, body: Option<&str>) -> Resp {
    typed_as(s, method, path, credential, None, body)
}

/// [`as_`] with a `Content-Type` when one is given.
fn typed_as(
    s: &TestServer,
    method: &str,
    path: &str,
    credential: &str,
    content_type: Option<&str>,
    body: Option<&str>,
) -> Resp {
    let auth = format!("Bearer {credential}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend(content_type.map(|ct| ("content-type", ct)));
    s.request(method, path, &headers, body.map(str::as_bytes))
}

/// A request with no credentials at all.
fn anon(s: &TestServer, method: &str, path: &str, body: Option<&str>) -> Resp {
    s.request(method, path, &[], body.map(str::as_bytes))
}

#[track_caller]
fn assert_unauthorized(r: &Resp) {
    r.assert_problem(401);
    assert!(
        r.header("www-authenticate").is_some(),
        "401 without WWW-Authenticate"
    );
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Changes one character in the middle of the given JWT segment (0 header,
/// 1 payload, 2 signature).
fn tamper(token: &str, segment: usize) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    assert_eq!(parts.len(), 3, "a JWT has three segments: {token}");
    let part = &mut parts[segment];
    let mid = part.len() / 2;
    let old = part.as_bytes()[mid];
    let new = if old == b'A' { 'B' } else { 'A' };
    part.replace_range(mid..=mid, &new.to_string());
    parts.join(".")
}

/// A bucket with every key set, and one value in it.
fn locked_bucket(s: &TestServer) -> String {
    let b = s.create_bucket("secret_key=sk&read_key=rk&write_key=wk");
    assert_eq!(
        as_(s, "PUT", &format!("/{b}/k"), "sk", Some("v")).status,
        204
    );
    b
}

#[test]
fn every_credential_form_is_accepted_for_keys() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let path = format!("/{b}/k");
    assert_unauthorized(&anon(&s, "GET", &path, None));

    let forms: Vec<(String, Vec<(&str, String)>)> = vec![
        (
            path.clone(),
            vec![("authorization", "Bearer rk".to_owned())],
        ),
        (path.clone(), vec![("authorization", basic_auth("rk", ""))]),
        (path.clone(), vec![("authorization", basic_auth("", "rk"))]),
        // A client that insists on a user name: the key as password.
        (
            path.clone(),
            vec![("authorization", basic_auth("api", "rk"))],
        ),
        (format!("{path}?key=rk"), vec![]),
    ];
    for (p, headers) in &forms {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = s.request("GET", p, &headers, None);
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "v"),
            "GET {p} {headers:?}"
        );
    }
    // The same forms with the secret key list the bucket.
    for (p, headers) in [
        (
            format!("/{b}/"),
            vec![("authorization", basic_auth("sk", ""))],
        ),
        (
            format!("/{b}/"),
            vec![("authorization", basic_auth("", "sk"))],
        ),
        (format!("/{b}/?key=sk"), vec![]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = s.request("GET", &p, &headers, None);
        assert_eq!(
            (r.status, r.text().trim()),
            (200, "k"),
            "list {p} {headers:?}"
        );
    }
}

/// An empty `?access_token=` (or `?key=`) is no credential: it does not hide
/// the other parameter.
#[test]
fn an_empty_credential_parameter_does_not_hide_the_other() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=read");
    for query in [
        "access_token=&key=rk".to_owned(),
        format!("key=&access_token={t}"),
    ] {
        let r = s.get(&format!("/{b}/k?{query}"));
        assert_eq!((r.status, r.text().as_str()), (200, "v"), "{query}");
    }
    assert_unauthorized(&s.get(&format!("/{b}/k?access_token=&key=")));
}

#[test]
fn every_credential_form_is_accepted_for_tokens() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=read");
    let path = format!("/{b}/k");
    for (p, headers) in [
        (path.clone(), vec![("authorization", format!("Bearer {t}"))]),
        (path.clone(), vec![("authorization", basic_auth(&t, ""))]),
        (path.clone(), vec![("authorization", basic_auth("", &t))]),
        (format!("{path}?access_token={t}"), vec![]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = s.request("GET", &p, &headers, None);
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "v"),
            "GET {p} {headers:?}"
        );
    }
}

#[test]
fn anonymous_reading_is_open_when_read_key_is_unset() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&write_key=wk");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/k"), "wk", Some("v")).status,
        204
    );
    let r = anon(&s, "GET", &format!("/{b}/k"), None);
    assert_eq!((r.status, r.text().as_str()), (200, "v"));
    assert_eq!(anon(&s, "HEAD", &format!("/{b}/k"), None).status, 200);
    // Writing is not open.
    assert_unauthorized(&anon(&s, "PUT", &format!("/{b}/k"), Some("other")));
    assert_unauthorized(&anon(&s, "DELETE", &format!("/{b}/k"), None));
    assert_eq!(anon(&s, "GET", &format!("/{b}/k"), None).text(), "v");
}

#[test]
fn anonymous_writing_is_open_when_write_key_is_unset() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk");
    assert_eq!(anon(&s, "PUT", &format!("/{b}/k"), Some("v")).status, 204);
    // It counts, but may not read the count: 204, no value.
    assert_eq!(
        anon(&s, "PATCH", &format!("/{b}/n"), Some("+1")).status,
        204
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}/n"), "rk", None).text(), "1");
    assert_unauthorized(&anon(&s, "GET", &format!("/{b}/k"), None));
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
    assert_eq!(anon(&s, "DELETE", &format!("/{b}/k"), None).status, 204);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).status, 404);
}

#[test]
fn bucket_without_any_key_is_open_for_data_but_has_no_admin() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    assert_eq!(anon(&s, "PUT", &format!("/{b}/k"), Some("v")).status, 204);
    assert_eq!(anon(&s, "GET", &format!("/{b}/k"), None).text(), "v");
    let list = anon(&s, "GET", &format!("/{b}/"), None);
    assert_eq!((list.status, list.text().trim()), (200, "k"));
    assert_eq!(anon(&s, "DELETE", &format!("/{b}/k"), None).status, 204);
    anon(&s, "GET", &format!("/{b}"), None).assert_problem(403);
    anon(&s, "POST", &format!("/{b}/tokens/"), Some("")).assert_problem(403);
    let detail = anon(&s, "DELETE", &format!("/{b}"), None).assert_problem(403);
    assert!(detail.contains("it can't be deleted"), "{detail}");
    assert_eq!(anon(&s, "GET", &format!("/{b}/k"), None).status, 404);
    assert_eq!(anon(&s, "PUT", &format!("/{b}/k"), Some("v")).status, 204);
}

#[test]
fn write_key_grants_reading_writing_and_deleting() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = as_(&s, "GET", &format!("/{b}/k"), "wk", None);
    assert_eq!((r.status, r.text().as_str()), (200, "v"));
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/k"), "wk", Some("w")).status,
        204
    );
    assert_eq!(
        as_(&s, "PATCH", &format!("/{b}/n"), "wk", Some("+2")).text(),
        "2"
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "w");
    assert_eq!(
        as_(&s, "DELETE", &format!("/{b}/k"), "wk", None).status,
        204
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).status, 404);
}

#[test]
fn read_key_cannot_write_or_delete() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let detail = as_(&s, "PUT", &format!("/{b}/k"), "rk", Some("x")).assert_problem(403);
    // What would be allowed, as the 401s say what to send.
    assert!(
        detail.contains(
            "which grants read on every key; the write or secret key, or an access token that grants it, may"
        ),
        "{detail}"
    );
    as_(&s, "PUT", &format!("/{b}/new"), "rk", Some("x")).assert_problem(403);
    as_(&s, "PATCH", &format!("/{b}/n"), "rk", Some("+1")).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}/k"), "rk", None).assert_problem(403);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
    assert_eq!(as_(&s, "GET", &format!("/{b}/new"), "rk", None).status, 404);
    assert_eq!(as_(&s, "GET", &format!("/{b}/n"), "rk", None).status, 404);
}

#[test]
fn missing_credentials_where_needed_are_401_with_www_authenticate() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    assert_unauthorized(&anon(&s, "GET", &format!("/{b}/k"), None));
    assert_unauthorized(&anon(&s, "PUT", &format!("/{b}/k"), Some("x")));
    assert_unauthorized(&anon(&s, "PATCH", &format!("/{b}/n"), Some("+1")));
    assert_unauthorized(&anon(&s, "DELETE", &format!("/{b}/k"), None));
    assert_unauthorized(&anon(&s, "GET", &format!("/{b}/"), None));
    assert_unauthorized(&anon(&s, "GET", &format!("/{b}"), None));
    assert_unauthorized(&anon(&s, "POST", &format!("/{b}/tokens/"), Some("")));
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
}

#[test]
fn wrong_key_is_401_with_www_authenticate() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), "nope", None));
    assert_unauthorized(&s.get(&format!("/{b}/k?key=nope")));
    assert_unauthorized(&s.request(
        "GET",
        &format!("/{b}/k"),
        &[("authorization", &basic_auth("nope", ""))],
        None,
    ));
    assert_unauthorized(&as_(&s, "PUT", &format!("/{b}/k"), "nope", Some("x")));
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}"), "nope", None));
    // Keys are compared exactly: no case folding, no prefix match.
    for almost in ["RK", "rk%20", "r", "rkk"] {
        assert_unauthorized(&s.get(&format!("/{b}/k?key={almost}")));
    }
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
}

#[test]
fn basic_with_two_wrong_parts_is_401_and_one_right_part_is_enough() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let path = format!("/{b}/k");
    let r = s.request(
        "GET",
        &path,
        &[("authorization", &basic_auth("nope", "nada"))],
        None,
    );
    assert_unauthorized(&r);
    // Either part may be the key; the user name is tried first.
    for (user, password) in [("rk", "nope"), ("nope", "rk"), ("rk", "sk")] {
        let r = s.request(
            "GET",
            &path,
            &[("authorization", &basic_auth(user, password))],
            None,
        );
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "v"),
            "{user}:{password}"
        );
    }
    // The user name wins when both are keys: the read key can't list.
    let r = s.request(
        "GET",
        &format!("/{b}/"),
        &[("authorization", &basic_auth("rk", "sk"))],
        None,
    );
    r.assert_problem(403);
}

#[test]
fn wrong_key_is_401_even_where_access_is_open() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    assert_eq!(anon(&s, "PUT", &format!("/{b}/k"), Some("v")).status, 204);
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), "nope", None));
    assert_unauthorized(&as_(&s, "PUT", &format!("/{b}/k"), "nope", Some("x")));
    assert_eq!(anon(&s, "GET", &format!("/{b}/k"), None).text(), "v");
}

#[test]
fn listing_needs_the_secret_key_when_one_is_set() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let list = format!("/{b}/");
    assert_unauthorized(&anon(&s, "GET", &list, None));
    as_(&s, "GET", &list, "rk", None).assert_problem(403);
    let detail = as_(&s, "GET", &list, "wk", None).assert_problem(403);
    assert!(
        detail.contains("; the secret key, or an access token that grants it, may"),
        "{detail}"
    );
    let r = as_(&s, "GET", &list, "sk", None);
    assert_eq!((r.status, r.text().trim()), (200, "k"));

    // Listing stays closed with only a secret key (reading and writing open).
    let open = s.create_bucket("secret_key=sk2");
    assert_eq!(
        anon(&s, "PUT", &format!("/{open}/a"), Some("1")).status,
        204
    );
    assert_unauthorized(&anon(&s, "GET", &format!("/{open}/"), None));
    assert_eq!(
        as_(&s, "GET", &format!("/{open}/"), "sk2", None)
            .text()
            .trim(),
        "a"
    );
}

#[test]
fn secret_key_can_do_everything() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "sk", None).text(), "v");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/k2"), "sk", Some("2")).status,
        204
    );
    assert_eq!(
        as_(&s, "DELETE", &format!("/{b}/k"), "sk", None).status,
        204
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}"), "sk", None).status, 200);
    assert_eq!(
        as_(&s, "POST", &format!("/{b}/tokens/"), "sk", Some("")).status,
        200
    );
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/"), "sk", None).text().trim(),
        "k2"
    );
}

#[test]
fn issuing_tokens_needs_the_secret_key() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let path = format!("/{b}/tokens/");
    assert_unauthorized(&anon(&s, "POST", &path, Some("")));
    as_(&s, "POST", &path, "rk", Some("")).assert_problem(403);
    as_(&s, "POST", &path, "wk", Some("")).assert_problem(403);
    assert_unauthorized(&as_(&s, "POST", &path, "nope", Some("")));
}

#[test]
fn prefixed_read_token_reads_only_under_its_prefix() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    for k in ["users:1:x", "users:2:x", "users:10:x"] {
        assert_eq!(
            as_(&s, "PUT", &format!("/{b}/{k}"), "sk", Some(k)).status,
            204
        );
    }
    let t = s.token(&b, "sk", "prefix=users:1:&permissions=read");
    let r = as_(&s, "GET", &format!("/{b}/users:1:x"), &t, None);
    assert_eq!((r.status, r.text().as_str()), (200, "users:1:x"));
    assert_eq!(
        as_(&s, "HEAD", &format!("/{b}/users:1:x"), &t, None).status,
        200
    );
    let detail = as_(&s, "GET", &format!("/{b}/users:2:x"), &t, None).assert_problem(403);
    assert!(
        detail.contains(r#"read on key "users:2:x""#)
            && detail.contains(r#"which grants read on keys starting with "users:1:""#),
        "the refusal says what was asked and what the token grants: {detail}"
    );
    as_(&s, "GET", &format!("/{b}/users:10:x"), &t, None).assert_problem(403);
    as_(&s, "GET", &format!("/{b}/k"), &t, None).assert_problem(403);
    // Reading does not grant writing, even under the prefix.
    as_(&s, "PUT", &format!("/{b}/users:1:x"), &t, Some("w")).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}/users:1:x"), &t, None).assert_problem(403);
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/users:1:x"), "rk", None).text(),
        "users:1:x"
    );
}

#[test]
fn prefixed_write_token_writes_only_under_its_prefix() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "prefix=users:1:&permissions=read,write,delete");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/users:1:a"), &t, Some("1")).status,
        204
    );
    assert_eq!(
        as_(&s, "PATCH", &format!("/{b}/users:1:a"), &t, Some("+1")).text(),
        "2"
    );
    as_(&s, "PUT", &format!("/{b}/users:2:a"), &t, Some("1")).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}/k"), &t, None).assert_problem(403);
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/users:2:a"), "rk", None).status,
        404
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
    assert_eq!(
        as_(&s, "DELETE", &format!("/{b}/users:1:a"), &t, None).status,
        204
    );
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/users:1:a"), "rk", None).status,
        404
    );
}

#[test]
fn token_listing_is_confined_to_its_prefix() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    for k in ["users:1:a", "users:1:b", "users:2:a", "users:3:a"] {
        assert_eq!(
            as_(&s, "PUT", &format!("/{b}/{k}"), "sk", Some("x")).status,
            204
        );
    }
    let t = s.token(&b, "sk", "prefix=users:1:&permissions=read,enumerate");
    let r = as_(&s, "GET", &format!("/{b}/?format=json"), &t, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!(["users:1:a", "users:1:b"]));
    let r = as_(
        &s,
        "GET",
        &format!("/{b}/?format=json&prefix=users:1:b"),
        &t,
        None,
    );
    assert_eq!(r.json(), json!(["users:1:b"]));
    let r = as_(
        &s,
        "GET",
        &format!("/{b}/?format=json&reverse=true"),
        &t,
        None,
    );
    assert_eq!(r.json(), json!(["users:1:b", "users:1:a"]));
    let r = as_(
        &s,
        "GET",
        &format!("/{b}/?values=true&format=json"),
        &t,
        None,
    );
    assert_eq!(r.json(), json!([["users:1:a", "x"], ["users:1:b", "x"]]));
    // Cursors and bounds outside the prefix never widen the listing.
    for query in [
        "start=a",
        "start=users:0",
        "end=zzz",
        "start=a&end=zzz",
        "reverse=true&start=zzz",
        "reverse=true&end=a",
    ] {
        let r = as_(&s, "GET", &format!("/{b}/?format=json&{query}"), &t, None);
        if r.status == 200 {
            let keys = r.json();
            let keys = keys.as_array().expect("list");
            assert!(
                keys.iter()
                    .all(|k| k.as_str().is_some_and(|k| k.starts_with("users:1:"))),
                "{query}: {keys:?}"
            );
        } else {
            r.assert_problem(403);
        }
    }
}

#[test]
fn token_cannot_list_outside_its_prefix() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    for k in ["users:1:a", "users:2:a"] {
        assert_eq!(
            as_(&s, "PUT", &format!("/{b}/{k}"), "sk", Some("x")).status,
            204
        );
    }
    let t = s.token(&b, "sk", "prefix=users:1:&permissions=read,enumerate");
    as_(&s, "GET", &format!("/{b}/?prefix=users:2:"), &t, None).assert_problem(403);
    // Listing values needs read too: the refusal names values=true.
    let names_only = s.token(&b, "sk", "prefix=users:1:&permissions=enumerate");
    let detail =
        as_(&s, "GET", &format!("/{b}/?values=true"), &names_only, None).assert_problem(403);
    assert!(
        detail.contains(r#"values=true (read on the keys under prefix "users:1:")"#)
            && detail.contains("which grants enumerate on keys starting with")
            // Listing needs enumerate as well, which only the secret key
            // grants (it named the read and write keys).
            && detail.contains("; the secret key, or an access token that grants it, may"),
        "{detail}"
    );
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/"), &names_only, None)
            .text()
            .trim(),
        "users:1:a"
    );
    // A broader prefix either is refused or stays confined: never users:2:.
    let r = as_(
        &s,
        "GET",
        &format!("/{b}/?prefix=users:&format=json"),
        &t,
        None,
    );
    if r.status == 200 {
        assert_eq!(r.json(), json!(["users:1:a"]));
    } else {
        r.assert_problem(403);
    }
}

#[test]
fn token_without_enumerate_cannot_list() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=read");
    let detail = as_(&s, "GET", &format!("/{b}/"), &t, None).assert_problem(403);
    // The refusal names the permission that is missing.
    assert!(
        detail.contains("enumerate (listing keys) under prefix"),
        "{detail}"
    );
}

#[test]
fn write_only_token_cannot_read() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=write");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/w"), &t, Some("1")).status,
        204
    );
    let detail = as_(&s, "GET", &format!("/{b}/w"), &t, None).assert_problem(403);
    // Each key would do (the 403 names those that grant what was refused).
    assert!(
        detail.contains("; the read, write or secret key, or an access token that grants it, may"),
        "{detail}"
    );
    as_(&s, "GET", &format!("/{b}/k"), &t, None).assert_problem(403);
    // Nor delete: delete is its own permission.
    as_(&s, "DELETE", &format!("/{b}/w"), &t, None).assert_problem(403);
    assert_eq!(as_(&s, "GET", &format!("/{b}/w"), "rk", None).text(), "1");
}

#[test]
fn patch_without_read_permission_changes_the_value_but_does_not_answer_it() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    for (key, value) in [("diary", "my private diary"), ("pin", "4242")] {
        assert_eq!(
            as_(&s, "PUT", &format!("/{b}/{key}"), "sk", Some(value)).status,
            204
        );
    }
    assert_eq!(
        as_(
            &s,
            "PUT",
            &format!("/{b}/user"),
            "sk",
            Some(r#"{"ssn":"123"}"#)
        )
        .status,
        204
    );
    let t = s.token(&b, "sk", "permissions=write");
    // Operations that change nothing would otherwise hand the value back.
    // (key, query, content type, body)
    let ops = [
        ("diary", "?op=append", None, ""),
        ("pin", "", None, "+0"),
        ("pin", "?op=max", None, "-1000000"),
        ("user", "", Some("application/merge-patch+json"), "{}"),
    ];
    let auth = format!("Bearer {t}");
    for (key, query, content_type, body) in ops {
        let path = format!("/{b}/{key}{query}");
        let r = typed_as(&s, "PATCH", &path, &t, content_type, Some(body));
        assert_eq!(r.status, 204, "{key}{query} {body}: {}", r.text());
        assert_eq!(r.text(), "", "{key}{query} {body}");
        assert!(r.header("etag").is_some(), "{key}{query}: no ETag");
    }
    // It did change the value: a real increment, seen by a reader.
    let r = as_(&s, "PATCH", &format!("/{b}/pin"), &t, Some("+1"));
    assert_eq!(r.status, 204);
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/pin"), "rk", None).text(),
        "4243"
    );
    // A JSON patch reads the value (a `test`, or a `copy`, `remove`... of a
    // path that may be missing, fails or not on what the document holds):
    // it needs read permission, and with it refused nothing changes.
    for patch in [
        &br#"[{"op":"test","path":"/ssn","value":"123"},{"op":"add","path":"/x","value":1}]"#[..],
        br#"[{"op":"copy","from":"/ssn","path":"/p"},{"op":"remove","path":"/p"}]"#,
        b"[]",
    ] {
        let r = s.request(
            "PATCH",
            &format!("/{b}/user"),
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json-patch+json"),
            ],
            Some(patch),
        );
        let detail = r.assert_problem(403);
        // Write as well: the read key would not do (it was named).
        assert!(
            detail.contains("needs read as well as write")
                && detail
                    .contains("; the write or secret key, or an access token that grants it, may"),
            "{detail}"
        );
    }
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/user"), "rk", None).json(),
        json!({"ssn": "123"})
    );
    // With read permission as well, PATCH answers the new value.
    let rw = s.token(&b, "sk", "permissions=read,write");
    let r = as_(&s, "PATCH", &format!("/{b}/pin"), &rw, Some("+1"));
    assert_eq!((r.status, r.text().as_str()), (200, "4244"));
}

#[test]
fn a_failed_patch_without_read_permission_does_not_describe_the_value() {
    let s = TestServer::start_with(&["--max-value-bytes", "100"]);
    let b = locked_bucket(&s);
    for (key, value, ct) in [
        ("n", "123456789", None),
        ("big", "9223372036854775000", None),
        ("doc", r#"{"a":1}"#, Some("application/json")),
        ("text", "a secret of 28 bytes exactly", None),
    ] {
        let r = typed_as(&s, "PUT", &format!("/{b}/{key}"), "sk", ct, Some(value));
        assert_eq!(r.status, 204);
    }
    let t = s.token(&b, "sk", "permissions=write");
    let auth = format!("Bearer {t}");
    let headers = [("authorization", auth.as_str())];
    // Overflow, adding to JSON, appending to a number: 409, and no word
    // on why (a type, a size).
    for (key, query, body) in [
        ("big", "", "+1000000"),
        ("doc", "", "+1"),
        ("n", "?op=append", "x"),
    ] {
        let r = s.request(
            "PATCH",
            &format!("/{b}/{key}{query}"),
            &headers,
            Some(body.as_bytes()),
        );
        let detail = r.assert_problem(409);
        assert!(detail.contains("says no more"), "{key}{query}: {detail}");
        for telling in ["JSON", "integer", "number", "overflow", "raw"] {
            assert!(!detail.contains(telling), "{key}{query}: {detail}");
        }
    }
    // A result over the size limit: 413, without the size it would have.
    let r = s.request(
        "PATCH",
        &format!("/{b}/text?op=append"),
        &headers,
        Some(&[b'x'; 90]),
    );
    let detail = r.assert_problem(413);
    assert!(!detail.contains("118"), "{detail}");
    // The same failures with read permission say what is wrong.
    let r = as_(&s, "PATCH", &format!("/{b}/doc"), "wk", Some("+1"));
    assert!(r.assert_problem(409).contains("JSON"), "{}", r.text());
    let r = s.request(
        "PATCH",
        &format!("/{b}/text?op=append"),
        &[("authorization", "Bearer wk")],
        Some(&[b'x'; 90]),
    );
    assert!(r.assert_problem(413).contains("118"), "{}", r.text());
    // Nothing changed.
    for (key, value) in [
        ("n", "123456789"),
        ("big", "9223372036854775000"),
        ("text", "a secret of 28 bytes exactly"),
    ] {
        assert_eq!(
            as_(&s, "GET", &format!("/{b}/{key}"), "rk", None).text(),
            value
        );
    }
}

/// Which additions overflow tells how large a number is: with steps of any
/// size, a caller who may write a counter but not read it would find its
/// value in 64 requests of a binary search (adding, then taking back). Such
/// a caller adds at most a million in one request.
#[test]
fn a_caller_that_may_not_read_a_counter_adds_small_steps_only() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/n"), "sk", Some("1234567")).status,
        204
    );
    let t = s.token(&b, "sk", "permissions=write");
    for step in ["+1000000", "-1000000", "+2.5", "-999999.5"] {
        let r = as_(&s, "PATCH", &format!("/{b}/n"), &t, Some(step));
        assert_eq!(r.status, 204, "{step}: {}", r.text());
    }
    for step in [
        "+1000001",
        "-1000001",
        "+9223372036854775000",
        "+1000000.5",
        "-1e300",
    ] {
        let r = as_(&s, "PATCH", &format!("/{b}/n"), &t, Some(step));
        let detail = r.assert_problem(403);
        assert!(
            detail.contains("at most 1000000") && detail.contains("can read"),
            "{step}: {detail}"
        );
    }
    // Nothing of the refused steps was added.
    let now = as_(&s, "GET", &format!("/{b}/n"), "rk", None).text();
    assert_eq!(
        now.parse::<f64>().ok(),
        Some(1234567.0 + 2.5 - 999999.5),
        "{now}"
    );
    // A key outside a token's write permission gets the usual refusal.
    let reader = s.token(&b, "sk", "permissions=read");
    let r = as_(&s, "PATCH", &format!("/{b}/n"), &reader, Some("+1000001"));
    assert!(!r.assert_problem(403).contains("at most"), "{}", r.text());
    // A caller that can read adds any step.
    let rw = s.token(&b, "sk", "permissions=read,write");
    let r = as_(&s, "PATCH", &format!("/{b}/n"), &rw, Some("+1000000000000"));
    assert_eq!(r.status, 200, "{}", r.text());
    // Where writing is open and reading needs a key, a caller without one
    // lacks a credential: 401, as API.md has it, and nothing added.
    let open = s.create_bucket("secret_key=sk&read_key=rk");
    let path = format!("/{open}/n");
    assert_eq!(anon(&s, "PUT", &path, Some("5")).status, 204);
    let r = anon(&s, "PATCH", &path, Some("+1000001"));
    assert_unauthorized(&r);
    let detail = r.assert_problem(401);
    assert!(
        detail.contains("at most 1000000") && detail.contains("without a key"),
        "{detail}"
    );
    assert_eq!(anon(&s, "PATCH", &path, Some("+1")).status, 204);
    assert_eq!(as_(&s, "GET", &path, "rk", None).text(), "6");
}

#[test]
fn delete_is_refused_for_credentials_before_its_headers_are_checked() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = s.request("DELETE", &format!("/{b}/k"), &[("if-match", "nope")], None);
    assert_unauthorized(&r);
    let t = s.token(&b, "sk", "permissions=read");
    let auth = format!("Bearer {t}");
    let r = s.request(
        "DELETE",
        &format!("/{b}/k"),
        &[("authorization", auth.as_str()), ("if-match", "nope")],
        None,
    );
    r.assert_problem(403);
    // With the permission, the malformed header is the complaint.
    let r = s.request(
        "DELETE",
        &format!("/{b}/k"),
        &[("authorization", "Bearer wk"), ("if-match", "nope")],
        None,
    );
    r.assert_problem(400);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
}

/// A credential that may write or delete a key but not read it can't tell
/// from a failed `If-Match` whether the key exists: the 412 says the same
/// for a missing key and a changed one (it said which, an existence test
/// that wrote nothing; found by a review). One that can read is told.
#[test]
fn a_failed_if_match_does_not_tell_a_non_reader_whether_the_key_exists() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let if_match = |method: &str, key: &str, credential: &str| {
        let auth = format!("Bearer {credential}");
        let body = (method == "PUT").then_some(&b"w"[..]);
        s.request(
            method,
            &format!("/{b}/{key}"),
            &[("authorization", auth.as_str()), ("if-match", "\"nope\"")],
            body,
        )
        .assert_problem(412)
    };
    for (method, permission) in [("PUT", "write"), ("DELETE", "delete")] {
        let t = s.token(&b, "sk", &format!("permissions={permission}"));
        let present = if_match(method, "k", &t);
        let absent = if_match(method, "absent", &t);
        assert_eq!(present, absent, "{method} with {permission}");
        assert!(present.contains("is not said"), "{present}");
    }
    // PATCH +1 blind, too.
    let t = s.token(&b, "sk", "permissions=write");
    let auth = format!("Bearer {t}");
    let patch = |key: &str| {
        s.request(
            "PATCH",
            &format!("/{b}/{key}"),
            &[("authorization", auth.as_str()), ("if-match", "\"nope\"")],
            Some(b"+1"),
        )
        .assert_problem(412)
    };
    assert_eq!(patch("k"), patch("absent"));
    // If-Match with If-None-Match: * (never both met), and a DELETE with
    // If-None-Match: * (never deletes): refused alike, key or no key.
    let both = |key: &str| {
        s.request(
            "PUT",
            &format!("/{b}/{key}"),
            &[
                ("authorization", auth.as_str()),
                ("if-match", "*"),
                ("if-none-match", "*"),
            ],
            Some(b"w"),
        )
        .assert_problem(412)
    };
    assert_eq!(both("k"), both("absent"));
    let d = s.token(&b, "sk", "permissions=delete");
    let delete_auth = format!("Bearer {d}");
    let delete_if_absent = |key: &str| {
        s.request(
            "DELETE",
            &format!("/{b}/{key}"),
            &[
                ("authorization", delete_auth.as_str()),
                ("if-none-match", "*"),
            ],
            None,
        )
        .assert_problem(412)
    };
    assert_eq!(delete_if_absent("k"), delete_if_absent("absent"));
    // The write key also reads: it is told why.
    let present = if_match("PUT", "k", "wk");
    let absent = if_match("PUT", "absent", "wk");
    assert!(present.contains("has changed"), "{present}");
    assert!(absent.contains("does not exist"), "{absent}");
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
    as_(&s, "GET", &format!("/{b}/absent"), "rk", None).assert_problem(404);
}

#[test]
fn delete_only_token_deletes_but_cannot_read_or_write() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=delete");
    as_(&s, "GET", &format!("/{b}/k"), &t, None).assert_problem(403);
    as_(&s, "PUT", &format!("/{b}/k"), &t, Some("x")).assert_problem(403);
    assert_eq!(as_(&s, "DELETE", &format!("/{b}/k"), &t, None).status, 204);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).status, 404);
}

#[test]
fn write_only_token_reads_where_the_bucket_leaves_reading_open() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&write_key=wk");
    let t = s.token(&b, "sk", "permissions=write");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/w"), &t, Some("1")).status,
        204
    );
    let r = as_(&s, "GET", &format!("/{b}/w"), &t, None);
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
}

#[test]
fn read_token_writes_where_the_bucket_leaves_writing_open() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk&read_key=rk");
    let t = s.token(&b, "sk", "permissions=read");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/w"), &t, Some("1")).status,
        204
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}/w"), &t, None).text(), "1");
}

#[test]
fn tampered_tokens_are_401() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=read");
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), &t, None).status, 200);
    for segment in [0, 1, 2] {
        let bad = tamper(&t, segment);
        assert_ne!(bad, t);
        assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), &bad, None));
        assert_unauthorized(&s.get(&format!("/{b}/k?access_token={bad}")));
    }
    // A token with its signature cut off, and one "signed" with alg none.
    let unsigned = t.rsplit_once('.').expect("segments").0.to_owned() + ".";
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), &unsigned, None));
    let payload = t.split('.').nth(1).expect("payload");
    let alg_none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), &alg_none, None));
}

#[test]
fn expired_token_is_401() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let short = s.token(&b, "sk", "permissions=read&ttl=1");
    let long = s.token(&b, "sk", "permissions=read&ttl=3600");
    std::thread::sleep(Duration::from_millis(2500));
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), &short, None));
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), &long, None).status, 200);
    // As the password of Basic with a user name, the token's own refusal
    // is the one reported.
    let r = s.request(
        "GET",
        &format!("/{b}/k"),
        &[("authorization", &basic_auth("api", &short))],
        None,
    );
    assert_unauthorized(&r);
    assert!(r.text().contains("expired"), "{}", r.text());
}

#[test]
fn token_of_another_bucket_is_401() {
    let s = TestServer::start();
    let a = locked_bucket(&s);
    let b = locked_bucket(&s);
    let ta = s.token(&a, "sk", "permissions=read,write,delete,enumerate");
    assert_eq!(as_(&s, "GET", &format!("/{a}/k"), &ta, None).status, 200);
    let r = as_(&s, "GET", &format!("/{b}/k"), &ta, None);
    assert_unauthorized(&r);
    assert!(
        r.text().contains("issued for another bucket"),
        "{}",
        r.text()
    );
    assert_unauthorized(&as_(&s, "PUT", &format!("/{b}/k"), &ta, Some("x")));
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/"), &ta, None));
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
}

#[test]
fn changing_the_signing_key_revokes_earlier_tokens() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let before = s.token(&b, "sk", "permissions=read");
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/k"), &before, None).status,
        200
    );
    let r = s.request(
        "PATCH",
        &format!("/{b}"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Some(b"signing_key=a-new-signing-key"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("signing_key").is_none(), "{}", r.text());
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k"), &before, None));
    let after = s.token(&b, "sk", "permissions=read");
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), &after, None).status, 200);
}

#[test]
fn token_request_defaults_to_whole_bucket_read_for_an_hour() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = as_(&s, "POST", &format!("/{b}/tokens/"), "sk", Some(""));
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["prefix"], "");
    assert_eq!(doc["permissions"], json!(["read"]));
    let expires = doc["expires_at"]
        .as_i64()
        .expect("expires_at in Unix seconds");
    assert!(
        (expires - (now() + 3600)).abs() <= 60,
        "expires_at {expires}, now {}",
        now()
    );
    let t = doc["access_token"].as_str().expect("access_token");
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), t, None).text(), "v");
    as_(&s, "PUT", &format!("/{b}/k"), t, Some("x")).assert_problem(403);
}

/// API.md: `permissions` is comma separated, or a JSON list, in a form or
/// a JSON body.
#[test]
fn token_request_takes_a_json_permission_list_in_a_form_too() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let ask = |form: &str| as_(&s, "POST", &format!("/{b}/tokens/"), "sk", Some(form));
    let r = ask(r#"permissions=["read","write"]"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let granted = r.json()["permissions"].clone();
    for p in ["read", "write"] {
        assert!(
            granted.as_array().is_some_and(|a| a.contains(&json!(p))),
            "{granted}"
        );
    }
    let r = ask(r#"permissions=["read","write""#);
    assert!(r.assert_problem(400).contains("not JSON"), "{}", r.text());
    let r = ask("permissions=read&permissions=write");
    assert!(
        r.assert_problem(400).contains("given twice"),
        "{}",
        r.text()
    );
}

#[test]
fn token_request_takes_a_json_body_with_a_permission_list() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "application/json"),
        ],
        Some(br#"{"prefix":"a:","permissions":["read","write"],"ttl":60}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["prefix"], "a:");
    let mut perms: Vec<String> = doc["permissions"]
        .as_array()
        .expect("permissions list")
        .iter()
        .map(|p| p.as_str().expect("string").to_owned())
        .collect();
    perms.sort();
    assert_eq!(perms, ["read", "write"]);
    let expires = doc["expires_at"].as_i64().expect("expires_at");
    assert!((expires - (now() + 60)).abs() <= 30, "expires_at {expires}");
    let t = doc["access_token"].as_str().expect("access_token");
    assert_eq!(
        as_(&s, "PUT", &format!("/{b}/a:x"), t, Some("1")).status,
        204
    );
    assert_eq!(as_(&s, "GET", &format!("/{b}/a:x"), t, None).text(), "1");
    as_(&s, "PUT", &format!("/{b}/b:x"), t, Some("1")).assert_problem(403);
}

#[test]
fn token_request_takes_a_comma_separated_permission_list() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Some(b"permissions=read,enumerate&prefix=p"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut perms: Vec<String> = r.json()["permissions"]
        .as_array()
        .expect("permissions list")
        .iter()
        .map(|p| p.as_str().expect("string").to_owned())
        .collect();
    perms.sort();
    assert_eq!(perms, ["enumerate", "read"]);
    assert_eq!(r.json()["prefix"], "p");
}

#[test]
fn bad_token_requests_are_400() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let form = |body: &str| {
        s.request(
            "POST",
            &format!("/{b}/tokens/"),
            &[
                ("authorization", "Bearer sk"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            Some(body.as_bytes()),
        )
    };
    for body in [
        "permissions=read,fly",
        "permissions=admin",
        "colour=blue",
        "ttl=0",
        "ttl=abc",
        "ttl=-5",
        // Over 100 years (found by a review: no bound at all).
        "ttl=3153600001",
        "ttl=18446744073709551615",
    ] {
        let r = form(body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        r.assert_problem(400);
    }
    // The message says what a ttl may be, and what was sent.
    let detail = form("ttl=abc").json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        detail.contains("digits only") && detail.contains("3153600000") && detail.contains("abc"),
        "{detail}"
    );
    let r = form("ttl=3153600000");
    assert_eq!(r.status, 200, "100 years: {}", r.text());
    for body in [
        r#"{"permissions":["read","fly"]}"#,
        r#"{"colour":"blue"}"#,
        r#"{"ttl":0}"#,
        r#"{"ttl":"abc"}"#,
        "{not json",
    ] {
        let r = s.request(
            "POST",
            &format!("/{b}/tokens/"),
            &[
                ("authorization", "Bearer sk"),
                ("content-type", "application/json"),
            ],
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        r.assert_problem(400);
    }
    // A field of the wrong type says what it takes (it said only "has the
    // wrong type"; found by a review).
    for (body, says) in [
        (r#"{"prefix":null}"#, "prefix must be a string"),
        (r#"{"prefix":5}"#, "not 5"),
        (
            r#"{"permissions":{"read":true}}"#,
            "permissions must be names separated by commas (\"read,write\") or a list of them",
        ),
    ] {
        let detail = s
            .request(
                "POST",
                &format!("/{b}/tokens/"),
                &[
                    ("authorization", "Bearer sk"),
                    ("content-type", "application/json"),
                ],
                Some(body.as_bytes()),
            )
            .assert_problem(400);
        assert!(detail.contains(says), "{body}: {detail}");
    }
}

#[test]
fn token_cannot_do_admin_things() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let t = s.token(&b, "sk", "permissions=read,write,delete,enumerate");
    let detail = as_(&s, "GET", &format!("/{b}"), &t, None).assert_problem(403);
    // The refusal says what would do: the secret key, never a token.
    assert!(
        detail.contains("needs the bucket's secret key (access tokens never grant it)")
            && detail.contains("curl -u SECRET:"),
        "{detail}"
    );
    let detail = anon(&s, "GET", &format!("/{b}"), None).assert_problem(401);
    assert!(
        detail.contains("needs the bucket's secret key") && !detail.contains("access token for"),
        "{detail}"
    );
    as_(&s, "PATCH", &format!("/{b}"), &t, Some("read_key=")).assert_problem(403);
    as_(&s, "POST", &format!("/{b}/tokens/"), &t, Some("")).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}"), &t, None).assert_problem(403);
    as_(&s, "DELETE", &format!("/{b}/"), &t, None).assert_problem(403);
    // Nothing changed: the bucket is there, reading still needs a key.
    assert_eq!(anon(&s, "HEAD", &format!("/{b}"), None).status, 200);
    assert_unauthorized(&anon(&s, "GET", &format!("/{b}/k"), None));
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), &t, None).text(), "v");
}

#[test]
fn unknown_bucket_is_404_whatever_the_credentials() {
    let s = TestServer::start();
    let real = locked_bucket(&s);
    let token = s.token(&real, "sk", "permissions=read,write,enumerate");
    for bucket in ["AAAAAAAAAAAAAAAAAAAAAA", "not-a-bucket-id"] {
        for (method, path) in [
            ("GET", format!("/{bucket}/k")),
            ("HEAD", format!("/{bucket}/k")),
            ("PUT", format!("/{bucket}/k")),
            ("DELETE", format!("/{bucket}/k")),
            ("GET", format!("/{bucket}/")),
            ("GET", format!("/{bucket}")),
            ("PATCH", format!("/{bucket}")),
            ("DELETE", format!("/{bucket}")),
            ("POST", format!("/{bucket}/tokens/")),
        ] {
            let body = if method == "PUT" || method == "PATCH" {
                Some("x")
            } else {
                None
            };
            for cred in [None, Some("sk"), Some("nope"), Some(token.as_str())] {
                let r = match cred {
                    None => anon(&s, method, &path, body),
                    Some(c) => as_(&s, method, &path, c, body),
                };
                assert_eq!(r.status, 404, "{method} {path} with {cred:?}: {}", r.text());
                if method != "HEAD" {
                    r.assert_problem(404);
                }
            }
        }
    }
    assert_eq!(
        anon(&s, "HEAD", "/AAAAAAAAAAAAAAAAAAAAAA", None).status,
        404
    );
}

#[test]
fn token_request_takes_a_comma_separated_string_in_json_too() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = s.request(
        "POST",
        &format!("/{b}/tokens/"),
        &[
            ("authorization", "Bearer sk"),
            ("content-type", "application/json"),
        ],
        Some(br#"{"permissions":"read,delete"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned();
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), &t, None).text(), "v");
    as_(&s, "PUT", &format!("/{b}/k"), &t, Some("x")).assert_problem(403);
    assert_eq!(as_(&s, "DELETE", &format!("/{b}/k"), &t, None).status, 204);
}

#[test]
fn credentials_are_checked_before_the_request_is() {
    // A client without the right key learns that first: not that its ttl,
    // body or form was wrong, and the server does not read a body it would
    // refuse anyway.
    let s = TestServer::start_with(&["--max-value-bytes", "100"]);
    let b = locked_bucket(&s);
    let big = "x".repeat(1000);
    for (method, path, body) in [
        ("PUT", format!("/{b}/k?ttl=soon"), "v"),
        ("PUT", format!("/{b}/k"), big.as_str()),
        ("PATCH", format!("/{b}/k"), "not an operation"),
        ("PATCH", format!("/{b}/k?ttl=-1"), "+1"),
        ("POST", format!("/{b}/tokens/"), "permissions=everything"),
        ("PATCH", format!("/{b}"), "default_ttl=never"),
    ] {
        let r = anon(&s, method, &path, Some(body));
        assert_unauthorized(&r);
        // A key that may read but not write: 403, not 400 or 413.
        as_(&s, method, &path, "rk", Some(body)).assert_problem(403);
    }
    // The right key gets the complaint about the request.
    as_(&s, "PUT", &format!("/{b}/k?ttl=soon"), "wk", Some("v")).assert_problem(400);
    as_(&s, "PUT", &format!("/{b}/k"), "wk", Some(&big)).assert_problem(413);
    as_(
        &s,
        "POST",
        &format!("/{b}/tokens/"),
        "sk",
        Some("permissions=everything"),
    )
    .assert_problem(400);
    assert_eq!(as_(&s, "GET", &format!("/{b}/k"), "rk", None).text(), "v");
}

/// A request as a browser sends it: with the Basic login it remembers for
/// this server, and the `Sec-Fetch-*` / `Origin` headers that say which
/// site started it.
fn from_browser(
    s: &TestServer,
    method: &str,
    path: &str,
    login: &str,
    site: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let auth = basic_auth(login, "");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(site);
    s.request(method, path, &headers, body.map(str::as_bytes))
}

/// Uploads script `name`, which answers the value of `k` or why it can't.
fn install_reader(s: &TestServer, b: &str, name: &str) {
    let r = s.request(
        "PUT",
        &format!("/{b}/scripts/{name}"),
        &[("authorization", "Bearer sk")],
        Some(br#"local v, err = kvdb.get("k") kvdb.say(v or err)"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

const CROSS_SITE_FORM: &[(&str, &str)] = &[
    ("sec-fetch-site", "cross-site"),
    ("sec-fetch-mode", "navigate"),
    ("content-type", "text/plain"),
];

/// Found by a review: a browser that logged in to a bucket's script editor
/// sends that key with requests other sites start (a form, a link), so any
/// site could write the bucket's keys or run its scripts as its admin.
#[test]
fn a_remembered_basic_login_does_not_act_for_another_site() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let path = format!("/{b}/k");
    for site in [
        CROSS_SITE_FORM,
        &[
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "no-cors"),
        ],
        &[("sec-fetch-site", "cross-site"), ("sec-fetch-mode", "cors")],
        // A browser without Sec-Fetch-*: its Origin, another site's or an
        // opaque one (a sandboxed page, such as another bucket's script).
        &[("origin", "https://evil.example")],
        &[("origin", "null")],
    ] {
        // A 401 without a Basic challenge: one would have the browser drop
        // its login and ask again, in vain, as the next try comes from the
        // same other site.
        let r = from_browser(&s, "POST", &path, "sk", site, Some("pwned"));
        let detail = r.assert_problem(401);
        assert_eq!(r.header("www-authenticate"), None, "{site:?}");
        assert!(detail.contains("came from another site"), "{detail}");
        let r = from_browser(&s, "GET", &format!("/{b}/?values=true"), "sk", site, None);
        r.assert_problem(401);
    }
    assert_eq!(as_(&s, "GET", &path, "rk", None).text(), "v", "unchanged");
    // A script runs as the anonymous caller it then is.
    install_reader(&s, &b, "who");
    let run = |site: &[(&str, &str)]| {
        from_browser(&s, "GET", &format!("/{b}/scripts/who"), "sk", site, None).text()
    };
    assert!(
        run(CROSS_SITE_FORM).starts_with("permission denied"),
        "{}",
        run(CROSS_SITE_FORM)
    );
    // The same requests from this server's own pages, from the address bar,
    // or from a client that is not a browser act with the key.
    for site in [
        &[
            ("sec-fetch-site", "same-origin"),
            ("sec-fetch-mode", "cors"),
        ][..],
        &[("sec-fetch-site", "none"), ("sec-fetch-mode", "navigate")],
        &[("origin", s.base())],
        // The same in capitals.
        &[(
            "origin",
            &s.base().to_uppercase().replace("HTTP://", "http://"),
        )],
        &[],
    ] {
        let written = format!("written by {}", site.len());
        let r = from_browser(&s, "POST", &path, "sk", site, Some(&written));
        assert_eq!(r.status, 204, "{site:?}: {}", r.text());
        assert_eq!(run(site), format!("{written}\n"), "{site:?}");
    }
    // A page elsewhere that sends the key itself, as Bearer (the kvdb.io
    // client) or in the query, acts with it.
    let cors = [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "cors"),
        ("authorization", "Bearer wk"),
    ];
    assert_eq!(s.request("PUT", &path, &cors, Some(b"x")).status, 204);
    let r = s.request("PUT", &format!("{path}?key=wk"), &cors[..2], Some(b"y"));
    assert_eq!(r.status, 204, "{}", r.text());
    // A link from elsewhere still opens the editor with the login, but only
    // the editor: not a script named `edit` (found by a review), nor the
    // editor in another site's frame.
    let link = [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "document"),
    ];
    install_reader(&s, &b, "edit");
    let r = from_browser(&s, "GET", &format!("/{b}/scripts/edit"), "sk", &link, None);
    assert!(r.text().starts_with("permission denied"), "{}", r.text());
    let framed = [link[0], link[1], ("sec-fetch-dest", "iframe")];
    let r = from_browser(
        &s,
        "GET",
        &format!("/{b}/scripts/who/edit"),
        "sk",
        &framed,
        None,
    );
    r.assert_problem(401);
    let r = from_browser(
        &s,
        "GET",
        &format!("/{b}/scripts/who/edit"),
        "sk",
        &link,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(
        r.header("content-security-policy").as_deref(),
        Some("frame-ancestors 'none'")
    );
}

/// Sends `method path` with these headers and the first half of `body`,
/// waits until the server has surely judged the headers, calls `meanwhile`,
/// then sends the rest; returns the answer's status line and body.
fn with_a_slow_body(
    s: &TestServer,
    head: &str,
    body: &str,
    meanwhile: impl FnOnce(),
) -> (String, String) {
    use std::io::{Read, Write};
    let addr = s.base().trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let (first, rest) = body.split_at(body.len() / 2);
    write!(
        conn,
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{first}",
        body.len()
    )
    .expect("send the head");
    conn.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    meanwhile();
    conn.write_all(rest.as_bytes()).expect("send the rest");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

fn rotate(s: &TestServer, b: &str, fields: &str) {
    rotate_with(s, b, "sk", fields);
}

#[test]
fn a_write_whose_body_arrives_after_its_token_was_revoked_is_refused() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let token = s.token(&b, "sk", "permissions=write");
    let (status, body) = with_a_slow_body(
        &s,
        &format!("PUT /{b}/late HTTP/1.1\r\nAuthorization: Bearer {token}"),
        "written by a revoked token",
        || rotate(&s, &b, "signing_key=a-new-signing-key"),
    );
    assert!(status.contains(" 401 "), "{status}: {body}");
    assert!(body.contains("token"), "{body}");
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/late"), "sk", None).status,
        404
    );
}

#[test]
fn an_anonymous_write_whose_body_arrives_after_a_write_key_was_set_is_refused() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    let (status, body) = with_a_slow_body(&s, &format!("PATCH /{b}/n HTTP/1.1"), "+5", || {
        rotate(&s, &b, "write_key=wk")
    });
    assert!(status.contains(" 401 "), "{status}: {body}");
    assert_eq!(as_(&s, "GET", &format!("/{b}/n"), "sk", None).status, 404);
}

#[test]
fn a_policy_change_whose_body_arrives_after_the_secret_key_was_rotated_is_refused() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let (status, body) = with_a_slow_body(
        &s,
        &format!(
            "PATCH /{b} HTTP/1.1\r\nAuthorization: Bearer sk\r\nContent-Type: application/x-www-form-urlencoded"
        ),
        "secret_key=taken-back-by-a-leak",
        || rotate(&s, &b, "secret_key=rotated"),
    );
    assert!(status.contains(" 401 "), "{status}: {body}");
    // The rotation stands: the new secret opens the bucket, the old one
    // and the one the late body asked for don't.
    assert_eq!(
        as_(&s, "GET", &format!("/{b}"), "rotated", None).status,
        200
    );
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}"), "sk", None));
    assert_unauthorized(&as_(
        &s,
        "GET",
        &format!("/{b}"),
        "taken-back-by-a-leak",
        None,
    ));
}

#[test]
fn a_token_request_and_a_script_upload_whose_bodies_arrive_after_a_rotation_are_refused() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let (status, body) = with_a_slow_body(
        &s,
        &format!(
            "POST /{b}/tokens/ HTTP/1.1\r\nAuthorization: Bearer sk\r\nContent-Type: application/x-www-form-urlencoded"
        ),
        "permissions=read,write",
        || rotate(&s, &b, "secret_key=sk2"),
    );
    assert!(status.contains(" 401 "), "{status}: {body}");
    assert!(!body.contains("access_token"), "{body}");
    let (status, body) = with_a_slow_body(
        &s,
        &format!("PUT /{b}/scripts/late HTTP/1.1\r\nAuthorization: Bearer sk2"),
        "kvdb.say('uploaded by an old secret')",
        || rotate_with(&s, &b, "sk2", "secret_key=sk3"),
    );
    assert!(status.contains(" 401 "), "{status}: {body}");
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/scripts/late"), "sk3", None).status,
        404
    );
}

#[test]
fn a_script_run_whose_body_arrives_after_its_token_was_revoked_is_refused() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let r = as_(
        &s,
        "PUT",
        &format!("/{b}/scripts/set"),
        "sk",
        Some("kvdb.set('ran', kvdb.var.v) kvdb.say('ok')"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let token = s.token(&b, "sk", "permissions=read,write");
    let (status, body) = with_a_slow_body(
        &s,
        &format!(
            "POST /{b}/scripts/set HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/x-www-form-urlencoded"
        ),
        "v=run-by-a-revoked-token",
        || rotate(&s, &b, "signing_key=a-new-signing-key"),
    );
    assert!(status.contains(" 401 "), "{status}: {body}");
    assert_eq!(as_(&s, "GET", &format!("/{b}/ran"), "sk", None).status, 404);
}

/// A slow body whose policy did not change is taken as before.
#[test]
fn a_slow_body_is_written_when_the_policy_did_not_change() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let token = s.token(&b, "sk", "permissions=read,write");
    let (status, body) = with_a_slow_body(
        &s,
        &format!("PUT /{b}/slow HTTP/1.1\r\nAuthorization: Bearer {token}"),
        "slow but fine",
        || {
            // Another bucket's policy change is no reason to judge again.
            let other = s.create_bucket("secret_key=sk");
            rotate(&s, &other, "write_key=x");
        },
    );
    assert!(status.contains(" 204 "), "{status}: {body}");
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/slow"), "sk", None).text(),
        "slow but fine"
    );
}

fn rotate_with(s: &TestServer, b: &str, secret: &str, fields: &str) {
    let r = typed_as(
        s,
        "PATCH",
        &format!("/{b}"),
        secret,
        Some("application/x-www-form-urlencoded"),
        Some(fields),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// README: one credential is used, the first present of the header,
/// `?access_token=` and `?key=`; the others are ignored.
#[test]
fn the_first_credential_present_is_the_one_used() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/k?key=wrong"), "sk", None).text(),
        "v"
    );
    assert_unauthorized(&as_(&s, "GET", &format!("/{b}/k?key=sk"), "wrong", None));
    assert_unauthorized(&anon(
        &s,
        "GET",
        &format!("/{b}/k?access_token=wrong&key=sk"),
        None,
    ));
}

/// A token that runs out while its request's body comes in is refused once
/// the body is read (judged again, as after a policy change).
#[test]
fn a_write_whose_body_arrives_after_its_token_expired_is_refused() {
    let s = TestServer::start();
    let b = locked_bucket(&s);
    let token = s.token(&b, "sk", "permissions=write&ttl=1");
    let (status, body) = with_a_slow_body(
        &s,
        &format!("PUT /{b}/late HTTP/1.1\r\nAuthorization: Bearer {token}"),
        "written by an expired token",
        || std::thread::sleep(Duration::from_millis(2500)),
    );
    assert!(status.contains(" 401 "), "{status}: {body}");
    assert!(body.contains("expired"), "{body}");
    assert_eq!(
        as_(&s, "GET", &format!("/{b}/late"), "sk", None).status,
        404
    );
}

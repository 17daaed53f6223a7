//! Parity of the runtimes: one table of scenarios per example (a request →
//! the expected response and the data it leaves), run in order against the
//! Lua twin, the Rust component and, for hello and visitors, the Python
//! component of the example, each in a fresh bucket of the same policy. A
//! runtime that answers differently, from the table or from the Lua twin,
//! fails with the scenario and the runtime named.
//!
//! The components are built by `./test.sh`: the Rust guests with cargo
//! (target/wasm32-wasip2/release), the Python ones with
//! `examples/python/build.sh` (target/python-guests, ~18 MB each, so each is
//! uploaded once per test).

use std::fmt::Write as _;
use std::time::Duration;

use crate::harness::TestServer;
use crate::lua_api::SK;
use crate::wasm::{component, visitors_key};

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const PROBLEM: &str = "application/problem+json";

/// Every bucket of these tests: reading, writing and listing each need a key.
const POLICY: &str = "secret_key=sk&read_key=rk&write_key=wk";

/// Who calls.
#[derive(Clone, Copy, Debug)]
enum Caller {
    Anonymous,
    ReadKey,
    WriteKey,
    Secret,
    /// An access token issued with these form fields.
    Token(&'static str),
    /// A credential the bucket does not know.
    Wrong,
}

/// What the request carries.
#[derive(Clone, Copy, Debug)]
enum Body {
    None,
    Form(&'static str),
    Json(&'static str),
}

/// What the response body must be.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Exact(&'static str),
    /// Starts with this (the rest is the host's error text, which must still
    /// be the same in every runtime).
    Prefix(&'static str),
}

/// One request and what it must give. `{today}` in a key is today's
/// visitors key.
struct Scenario {
    name: &'static str,
    method: &'static str,
    query: &'static str,
    body: Body,
    caller: Caller,
    status: u16,
    content_type: &'static str,
    expect: Expect,
    /// Keys read back with the secret key afterwards: the value and its
    /// content type, or `None` for absent.
    data: &'static [(&'static str, Option<(&'static str, &'static str)>)],
    /// Every key of the bucket afterwards, in order.
    keys: &'static [&'static str],
}

/// One runtime's version of an example.
#[derive(Clone, Copy)]
enum Runtime {
    Lua(&'static str),
    Rust(&'static str),
    Python(&'static str),
}

impl Runtime {
    fn label(self) -> &'static str {
        match self {
            Runtime::Lua(_) => "Lua",
            Runtime::Rust(_) => "Rust WASM",
            Runtime::Python(_) => "Python WASM",
        }
    }

    /// The script's bytes and its upload content type.
    fn source(self) -> (Vec<u8>, &'static str) {
        match self {
            Runtime::Lua(example) => {
                let path = format!(
                    "{}/../examples/{example}/{example}.lua",
                    env!("CARGO_MANIFEST_DIR")
                );
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                (bytes, "text/plain")
            }
            Runtime::Rust(crate_name) => (component(crate_name), "application/wasm"),
            Runtime::Python(guest) => {
                let path = format!(
                    "{}/../target/python-guests/{guest}.wasm",
                    env!("CARGO_MANIFEST_DIR")
                );
                let bytes = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!(
                        "{path}: {e}. The Python guests are built by ./test.sh \
                         (examples/python/build.sh); run it first"
                    )
                });
                (bytes, "application/wasm")
            }
        }
    }
}

/// What a runtime answered to one scenario.
#[derive(PartialEq, Eq, Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

fn agent() -> ureq::Agent {
    // A Python component compiles for many seconds in a debug build.
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

fn upload(s: &TestServer, b: &str, runtime: Runtime) {
    let (bytes, content_type) = runtime.source();
    let request = ureq::http::Request::builder()
        .method("PUT")
        .uri(s.url(&format!("/{b}/scripts/example")))
        .header("authorization", "Bearer sk")
        .header("content-type", content_type)
        .body(bytes)
        .expect("request");
    let mut r = agent()
        .run(request)
        .unwrap_or_else(|e| panic!("upload of the {} example: {e}", runtime.label()));
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    assert_eq!(
        status,
        200,
        "upload of the {} example: {text}",
        runtime.label()
    );
}

fn credential(s: &TestServer, b: &str, caller: Caller) -> Option<String> {
    match caller {
        Caller::Anonymous => None,
        Caller::ReadKey => Some("rk".into()),
        Caller::WriteKey => Some("wk".into()),
        Caller::Secret => Some(SK.into()),
        Caller::Token(fields) => Some(s.token(b, SK, fields)),
        Caller::Wrong => Some("not-a-key".into()),
    }
}

fn send(s: &TestServer, b: &str, scenario: &Scenario) -> Answer {
    let auth = credential(s, b, scenario.caller).map(|c| format!("Bearer {c}"));
    let mut headers = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let body = match scenario.body {
        Body::None => None,
        Body::Form(form) => {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
            Some(form.as_bytes())
        }
        Body::Json(doc) => {
            headers.push(("content-type", "application/json"));
            Some(doc.as_bytes())
        }
    };
    let path = format!("/{b}/scripts/example{}", scenario.query);
    let r = s.request(scenario.method, &path, &headers, body);
    Answer {
        status: r.status,
        content_type: r.header("content-type").unwrap_or_default(),
        body: r.text(),
    }
}

/// The differences between what `scenario` left in bucket `b` and the table.
fn data_differences(s: &TestServer, b: &str, scenario: &Scenario) -> Vec<String> {
    let today = visitors_key();
    let mut out = Vec::new();
    let auth = [("authorization", "Bearer sk")];
    for (key, expected) in scenario.data {
        let key = key.replace("{today}", &today);
        let r = s.request("GET", &format!("/{b}/{key}"), &auth, None);
        let actual = (r.status == 200).then(|| {
            (
                r.text(),
                r.header("content-type").unwrap_or_default().to_owned(),
            )
        });
        let expected = expected.map(|(v, ct)| (v.to_owned(), ct.to_owned()));
        if r.status != 200 && r.status != 404 {
            out.push(format!("GET {key}: {} {}", r.status, r.text()));
        } else if actual != expected {
            out.push(format!(
                "key {key}: holds {actual:?}, expected {expected:?}"
            ));
        }
    }
    let r = s.request("GET", &format!("/{b}/?format=json"), &auth, None);
    let keys: Vec<String> =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("listing ({e}): {}", r.text()));
    let expected: Vec<String> = scenario
        .keys
        .iter()
        .map(|k| k.replace("{today}", &today))
        .collect();
    if keys != expected {
        out.push(format!("keys {keys:?}, expected {expected:?}"));
    }
    out
}

/// Runs `scenarios` in order against each runtime (a fresh bucket each) and
/// fails with every difference, naming the scenario and the runtime.
fn check(example: &str, scenarios: &[Scenario], runtimes: &[Runtime]) {
    let s = TestServer::start();
    let mut failures = Vec::new();
    // The answers of the first runtime (Lua), which every other must match.
    let mut reference: Vec<Answer> = Vec::new();
    for &runtime in runtimes {
        let b = s.create_bucket(POLICY);
        upload(&s, &b, runtime);
        for (i, scenario) in scenarios.iter().enumerate() {
            let at = format!(
                "{example}: scenario `{}` on {}",
                scenario.name,
                runtime.label()
            );
            let answer = send(&s, &b, scenario);
            let mut problems = Vec::new();
            if answer.status != scenario.status {
                problems.push(format!(
                    "status {}, expected {}",
                    answer.status, scenario.status
                ));
            }
            if !answer.content_type.starts_with(scenario.content_type) {
                problems.push(format!(
                    "content type {:?}, expected {:?}",
                    answer.content_type, scenario.content_type
                ));
            }
            let body_ok = match scenario.expect {
                Expect::Exact(body) => answer.body == body,
                Expect::Prefix(prefix) => answer.body.starts_with(prefix),
            };
            if !body_ok {
                problems.push(format!(
                    "body {:?}, expected {:?}",
                    answer.body, scenario.expect
                ));
            }
            problems.extend(data_differences(&s, &b, scenario));
            if let Some(lua) = reference.get(i)
                && *lua != answer
            {
                problems.push(format!("answered {answer:?}, but Lua answered {lua:?}"));
            }
            if !problems.is_empty() {
                failures.push(format!("{at}: {}", problems.join("; ")));
            }
            if reference.len() < scenarios.len() {
                reference.push(answer);
            }
        }
    }
    let mut report = String::new();
    for f in &failures {
        let _ = writeln!(report, "  {f}");
    }
    assert!(
        failures.is_empty(),
        "{} difference(s) between the runtimes and the table:\n{report}",
        failures.len()
    );
}

// ---------------------------------------------------------------------------
// hello

const HELLO: &[Scenario] = &[
    Scenario {
        name: "a plain name by GET",
        method: "GET",
        query: "?name=World",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello World\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "markup and quotes are escaped",
        method: "GET",
        query: "?name=%3Cb%3E%26amp%3B%22x%22%27%2F",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello &lt;b&gt;&amp;amp;&quot;x&quot;&#x27;&#x2F;\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "no name",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello \n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "an empty name",
        method: "GET",
        query: "?name=",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello \n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "the last of duplicate names",
        method: "GET",
        query: "?name=1&name=2",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello 2\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "UTF-8 passes through",
        method: "GET",
        query: "?name=%C3%A9t%C3%A9%20%E2%9C%93",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello été ✓\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "a form body by POST",
        method: "POST",
        query: "",
        body: Body::Form("name=%3Ci%3Eform%3C%2Fi%3E"),
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello &lt;i&gt;form&lt;&#x2F;i&gt;\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "the body wins over the query",
        method: "POST",
        query: "?name=query",
        body: Body::Form("name=body"),
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello body\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "a JSON object body",
        method: "POST",
        query: "",
        body: Body::Json(r#"{"name": "json"}"#),
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello json\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "POST without a body",
        method: "POST",
        query: "?name=q",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello q\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "with the secret key",
        method: "GET",
        query: "?name=admin",
        body: Body::None,
        caller: Caller::Secret,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello admin\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "with a token",
        method: "GET",
        query: "?name=token",
        body: Body::None,
        caller: Caller::Token("prefix=x:&permissions=read"),
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("Hello token\n"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "a wrong credential is refused before the run",
        method: "GET",
        query: "?name=x",
        body: Body::None,
        caller: Caller::Wrong,
        status: 401,
        content_type: PROBLEM,
        expect: Expect::Prefix("{"),
        data: &[],
        keys: &[],
    },
];

#[test]
fn hello_answers_the_same_in_lua_rust_and_python() {
    check(
        "hello",
        HELLO,
        &[
            Runtime::Lua("hello"),
            Runtime::Rust("kvdb_example_hello"),
            Runtime::Python("hello"),
        ],
    );
}

// ---------------------------------------------------------------------------
// visitors

const DENIED_INCR: &str = "error incrementing: permission denied";

const VISITORS: &[Scenario] = &[
    Scenario {
        name: "anonymous may not write",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 500,
        content_type: TEXT,
        expect: Expect::Prefix(DENIED_INCR),
        data: &[("{today}", None)],
        keys: &[],
    },
    Scenario {
        name: "the read key may not write",
        method: "POST",
        query: "",
        body: Body::Form("a=1"),
        caller: Caller::ReadKey,
        status: 500,
        content_type: TEXT,
        expect: Expect::Prefix(DENIED_INCR),
        data: &[("{today}", None)],
        keys: &[],
    },
    Scenario {
        name: "the write key counts the first visit",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::WriteKey,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("1\n"),
        data: &[("{today}", Some(("1", TEXT)))],
        keys: &["{today}"],
    },
    Scenario {
        name: "a POST counts too",
        method: "POST",
        query: "?x=1",
        body: Body::Form("y=2"),
        caller: Caller::WriteKey,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("2\n"),
        data: &[("{today}", Some(("2", TEXT)))],
        keys: &["{today}"],
    },
    Scenario {
        name: "the secret key counts",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Secret,
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("3\n"),
        data: &[("{today}", Some(("3", TEXT)))],
        keys: &["{today}"],
    },
    Scenario {
        name: "a write-only token counts but cannot read the count back",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Token("prefix=visitors:&permissions=write"),
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("nil\n"),
        data: &[("{today}", Some(("4", TEXT)))],
        keys: &["{today}"],
    },
    Scenario {
        name: "a token for another prefix may not write",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Token("prefix=other:&permissions=read,write"),
        status: 500,
        content_type: TEXT,
        expect: Expect::Prefix(DENIED_INCR),
        data: &[("{today}", Some(("4", TEXT)))],
        keys: &["{today}"],
    },
    Scenario {
        name: "a read-write token for the prefix counts",
        method: "POST",
        query: "",
        body: Body::None,
        caller: Caller::Token("prefix=visitors:&permissions=read,write"),
        status: 200,
        content_type: TEXT,
        expect: Expect::Exact("5\n"),
        data: &[("{today}", Some(("5", TEXT)))],
        keys: &["{today}"],
    },
];

#[test]
fn visitors_answers_the_same_in_lua_rust_and_python() {
    check(
        "visitors",
        VISITORS,
        &[
            Runtime::Lua("visitors"),
            Runtime::Rust("kvdb_example_visitors"),
            Runtime::Python("visitors"),
        ],
    );
}

// ---------------------------------------------------------------------------
// scope

const SCOPE_OUTPUT: &str = "users:1:name: ok\nusers:2:name: permission denied";

const SCOPE: &[Scenario] = &[
    Scenario {
        name: "anonymous: the script's own scope writes users:1: only",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 200,
        content_type: TEXT,
        expect: Expect::Prefix(SCOPE_OUTPUT),
        data: &[
            ("users:1:name", Some(("bob", TEXT))),
            ("users:2:name", None),
        ],
        keys: &["users:1:name"],
    },
    Scenario {
        name: "the read key by POST: the same",
        method: "POST",
        query: "",
        body: Body::Form("a=1"),
        caller: Caller::ReadKey,
        status: 200,
        content_type: TEXT,
        expect: Expect::Prefix(SCOPE_OUTPUT),
        data: &[("users:2:name", None)],
        keys: &["users:1:name"],
    },
    Scenario {
        name: "the secret key cannot widen what the script narrowed",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Secret,
        status: 200,
        content_type: TEXT,
        expect: Expect::Prefix(SCOPE_OUTPUT),
        data: &[
            ("users:1:name", Some(("bob", TEXT))),
            ("users:2:name", None),
        ],
        keys: &["users:1:name"],
    },
    Scenario {
        name: "a read token for another prefix: the same",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Token("prefix=x:&permissions=read"),
        status: 200,
        content_type: TEXT,
        expect: Expect::Prefix(SCOPE_OUTPUT),
        data: &[("users:2:name", None)],
        keys: &["users:1:name"],
    },
];

#[test]
fn scope_answers_the_same_in_lua_and_rust() {
    check(
        "scope",
        SCOPE,
        &[Runtime::Lua("scope"), Runtime::Rust("kvdb_example_scope")],
    );
}

// ---------------------------------------------------------------------------
// guestbook

const ENTRY_1: &str = r#"{"id":1,"name":"ann","message":"hi"}"#;
const ENTRY_2: &str = r#"{"id":2,"name":"bob","message":"yo"}"#;
const ENTRY_3: &str = r#"{"id":3,"name":"<cy> é","message":"a \"quoted\" / line\nnext"}"#;

const GUESTBOOK: &[Scenario] = &[
    Scenario {
        name: "the secret key lists an empty book",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Secret,
        status: 200,
        content_type: JSON,
        expect: Expect::Exact("[]"),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "anonymous may not list",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Anonymous,
        status: 403,
        content_type: JSON,
        expect: Expect::Prefix(r#"{"error":"permission denied"#),
        data: &[],
        keys: &[],
    },
    Scenario {
        name: "anonymous may not post",
        method: "POST",
        query: "",
        body: Body::Form("name=ann&message=hi"),
        caller: Caller::Anonymous,
        status: 403,
        content_type: JSON,
        expect: Expect::Prefix(r#"{"error":"permission denied"#),
        data: &[("guestbook-count", None)],
        keys: &[],
    },
    Scenario {
        name: "the write key posts a form",
        method: "POST",
        query: "",
        body: Body::Form("name=ann&message=hi"),
        caller: Caller::WriteKey,
        status: 201,
        content_type: JSON,
        expect: Expect::Exact(ENTRY_1),
        data: &[
            ("guestbook-count", Some(("1", TEXT))),
            ("guestbook:00000001", Some((ENTRY_1, JSON))),
        ],
        keys: &["guestbook-count", "guestbook:00000001"],
    },
    Scenario {
        name: "a post without a message is 400",
        method: "POST",
        query: "",
        body: Body::Form("name=bob"),
        caller: Caller::WriteKey,
        status: 400,
        content_type: JSON,
        expect: Expect::Exact(r#"{"error":"name and message are required"}"#),
        data: &[("guestbook-count", Some(("1", TEXT)))],
        keys: &["guestbook-count", "guestbook:00000001"],
    },
    Scenario {
        name: "a post with an empty name is 400",
        method: "POST",
        query: "",
        body: Body::Form("name=&message=x"),
        caller: Caller::WriteKey,
        status: 400,
        content_type: JSON,
        expect: Expect::Exact(r#"{"error":"name and message are required"}"#),
        data: &[("guestbook-count", Some(("1", TEXT)))],
        keys: &["guestbook-count", "guestbook:00000001"],
    },
    Scenario {
        name: "the fields may come from the query",
        method: "POST",
        query: "?name=bob&message=yo",
        body: Body::None,
        caller: Caller::WriteKey,
        status: 201,
        content_type: JSON,
        expect: Expect::Exact(ENTRY_2),
        data: &[("guestbook:00000002", Some((ENTRY_2, JSON)))],
        keys: &[
            "guestbook-count",
            "guestbook:00000001",
            "guestbook:00000002",
        ],
    },
    Scenario {
        name: "a JSON body with markup, quotes, a slash, a newline and UTF-8",
        method: "POST",
        query: "",
        body: Body::Json(r#"{"name": "<cy> é", "message": "a \"quoted\" / line\nnext"}"#),
        caller: Caller::Secret,
        status: 201,
        content_type: JSON,
        expect: Expect::Exact(ENTRY_3),
        data: &[
            ("guestbook-count", Some(("3", TEXT))),
            ("guestbook:00000003", Some((ENTRY_3, JSON))),
        ],
        keys: &[
            "guestbook-count",
            "guestbook:00000001",
            "guestbook:00000002",
            "guestbook:00000003",
        ],
    },
    Scenario {
        name: "the write key reads but may not list",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::WriteKey,
        status: 403,
        content_type: JSON,
        expect: Expect::Prefix(r#"{"error":"permission denied"#),
        data: &[],
        keys: &[
            "guestbook-count",
            "guestbook:00000001",
            "guestbook:00000002",
            "guestbook:00000003",
        ],
    },
    Scenario {
        name: "a listing token lists every entry in order",
        method: "GET",
        query: "",
        body: Body::None,
        caller: Caller::Token("prefix=guestbook:&permissions=read,enumerate"),
        status: 200,
        content_type: JSON,
        expect: Expect::Exact(
            r#"[{"id":1,"name":"ann","message":"hi"},{"id":2,"name":"bob","message":"yo"},{"id":3,"name":"<cy> é","message":"a \"quoted\" / line\nnext"}]"#,
        ),
        data: &[],
        keys: &[
            "guestbook-count",
            "guestbook:00000001",
            "guestbook:00000002",
            "guestbook:00000003",
        ],
    },
];

#[test]
fn guestbook_answers_the_same_in_lua_and_rust() {
    check(
        "guestbook",
        GUESTBOOK,
        &[
            Runtime::Lua("guestbook"),
            Runtime::Rust("kvdb_example_guestbook"),
        ],
    );
}

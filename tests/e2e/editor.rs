//! The script editor page (`GET /:bucket/scripts/:script/edit`): over plain
//! HTTP, and in a real headless Chromium driven by `tests/browser/editor.mjs`.
//!
//! The browser test needs Debian's `chromium` and `npm ci` in `tests/browser/`;
//! `./test.sh` installs both. Without them it fails, it never skips.

use std::path::Path;
use std::time::Duration;

use crate::harness::{TestServer, basic_auth, run_node};

const CHROMIUM: &str = "/usr/bin/chromium";
const BROWSER_TEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/browser/editor.mjs");
const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/browser");
/// Far beyond the few seconds a run takes; only a hung browser gets here.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

/// The text between `<textarea id="source" …>` and `</textarea>`, unescaped,
/// less the one newline HTML drops right after the start tag.
fn textarea_source(page: &str) -> String {
    let start = page
        .find("<textarea id=\"source\"")
        .unwrap_or_else(|| panic!("no source textarea in the page:\n{page}"));
    let open_end = start + page[start..].find('>').expect("end of the start tag") + 1;
    let close = open_end
        + page[open_end..]
            .find("</textarea>")
            .expect("the textarea's end tag");
    let raw = &page[open_end..close];
    let raw = raw.strip_prefix('\n').unwrap_or(raw);
    unescape_html(raw)
}

/// Character references: the named few an escaper uses, and numeric ones.
fn unescape_html(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let semi = rest
            .find(';')
            .unwrap_or_else(|| panic!("unterminated reference in {s:?}"));
        let name = &rest[1..semi];
        let c = match name {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = name.strip_prefix("#x").or(name.strip_prefix("#X")) {
                    u32::from_str_radix(hex, 16)
                } else if let Some(dec) = name.strip_prefix('#') {
                    dec.parse()
                } else {
                    panic!("unexpected reference &{name}; in {s:?}")
                };
                char::from_u32(code.expect("numeric reference")).expect("a character")
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn editor_page_needs_the_secret_key_escapes_the_source_and_loads_nothing_external() {
    let s = TestServer::start();
    let bucket = s.create_bucket("secret_key=s3cret");
    let admin = basic_auth("s3cret", "");
    let source = "-- </textarea><script>alert(1)</script> & \"'\nkvdb.say(\"Hello\")\n";
    let r = s.request(
        "PUT",
        &format!("/{bucket}/scripts/hello"),
        &[("authorization", admin.as_str())],
        Some(source.as_bytes()),
    );
    assert_eq!(r.status, 200, "upload: {}", r.text());
    let edit = format!("/{bucket}/scripts/hello/edit");

    // No credentials, or a wrong key: 401 with a Basic challenge, so a
    // browser asks for the key.
    let wrong = basic_auth("wrong", "");
    for headers in [vec![], vec![("authorization", wrong.as_str())]] {
        let r = s.request("GET", &edit, &headers, None);
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Basic ") || challenge.contains(", Basic "),
            "{headers:?}: WWW-Authenticate {challenge:?} offers no Basic"
        );
        assert!(
            !r.text().contains("alert(1)"),
            "the 401 leaks the source: {}",
            r.text()
        );
    }

    // The secret key: the page, with the current source escaped in it.
    let r = s.request("GET", &edit, &[("authorization", admin.as_str())], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/html"), "content-type {ct}");
    let page = r.text();
    assert!(
        !page.contains("</textarea><script>alert(1)"),
        "the source is in the page unescaped:\n{page}"
    );
    assert_eq!(
        page.matches("<script").count(),
        1,
        "only the page's own script:\n{page}"
    );
    assert_eq!(textarea_source(&page), source, "page:\n{page}");

    // Nothing to load from elsewhere: the page works offline and leaks nothing.
    for external in ["http://", "https://", "=\"//", "='//", "url(//"] {
        assert!(
            !page.contains(external),
            "the page refers to {external}…:\n{page}"
        );
    }

    // A script that does not exist yet: an empty editor.
    let r = s.request(
        "GET",
        &format!("/{bucket}/scripts/new-one/edit"),
        &[("authorization", admin.as_str())],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(textarea_source(&r.text()), "");
}

#[test]
fn the_editor_page_of_a_component_shows_no_binary_and_offers_no_save() {
    let s = TestServer::start();
    let bucket = s.create_bucket("secret_key=s3cret");
    let admin = basic_auth("s3cret", "");
    let component = crate::wasm::hello();
    let r = s.request(
        "PUT",
        &format!("/{bucket}/scripts/greet"),
        &[
            ("authorization", admin.as_str()),
            ("content-type", "application/wasm"),
        ],
        Some(&component),
    );
    assert_eq!(r.status, 200, "upload: {}", r.text());
    let r = s.request(
        "GET",
        &format!("/{bucket}/scripts/greet/edit"),
        &[("authorization", admin.as_str())],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.text();
    assert!(
        page.len() < 20_000,
        "{} bytes: the component is in the page",
        page.len()
    );
    assert_eq!(textarea_source(&page), "");
    assert!(page.contains("A WebAssembly component"), "{page}");
    assert!(
        page.contains(&format!("({} bytes)", component.len())),
        "{page}"
    );
    assert!(
        page.contains(r#"<button id="save" type="button" disabled>"#),
        "{page}"
    );
    // The component still runs.
    let r = s.get(&format!("/{bucket}/scripts/greet?name=Ann"));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn editor_works_in_headless_chromium() {
    let missing: Vec<&str> = [
        (CHROMIUM, "Debian's chromium"),
        (
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/browser/node_modules/playwright-core/package.json"
            ),
            "tests/browser/node_modules (npm ci)",
        ),
    ]
    .into_iter()
    .filter(|(path, _)| !Path::new(path).exists())
    .map(|(_, what)| what)
    .collect();
    assert!(
        missing.is_empty(),
        "the browser test needs {}: run ./test.sh from the repository root, which installs it",
        missing.join(" and ")
    );

    let s = TestServer::start();
    // Read and write keys: an anonymous run can do nothing, so the page must
    // run scripts as its (admin) user to pass.
    let bucket = s.create_bucket("secret_key=s3cret&read_key=r3ad&write_key=wr1te");

    let output = run_node(
        BROWSER_DIR,
        BROWSER_TEST,
        &[s.base(), bucket.as_str(), "s3cret"],
        BROWSER_TIMEOUT,
    );
    println!("{output}");
}

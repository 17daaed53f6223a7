//! Why an uploaded component does not link, from the names it imports and
//! exports, when they tell: a component built against another version of
//! the `kvdb:script` package, or one that imports interfaces this server
//! does not provide (`wasi:http`, which componentize-js adds by default).
//!
//! wasmtime's own error names the first import it could not match and the
//! first item of it that differs: a component built against
//! `kvdb:script@0.2.0` got "instance export `get` has the wrong type:
//! function implementation is missing", which says neither what is wrong
//! nor what to do (found by a reviewer writing guests).
//!
//! These are only read once linking has failed: a component that links
//! runs, whatever its names say (wasmtime matches `0.2.3` to a `0.2.0` it
//! provides, as semver allows).

/// The WIT the host binds (`bindings.rs`): the one source of truth for the
/// version of `kvdb:script` this server provides.
const WIT: &str = include_str!("../../../../wit/kvdb.wit");

/// The packages whose 0.2 interfaces `wasmtime_wasi::p2::add_to_linker_async`
/// defines (the unit test `the_wasi_packages_listed_are_the_ones_linked`
/// checks each against the linker). Filesystem and sockets are linked but
/// grant nothing; a component may import them (the Rust standard library
/// does).
const WASI_PACKAGES: [&str; 6] = [
    "wasi:cli",
    "wasi:clocks",
    "wasi:filesystem",
    "wasi:io",
    "wasi:random",
    "wasi:sockets",
];

/// The most unsupported imports a message names (a component may import
/// thousands).
const NAMED: usize = 8;

/// The longest name (or version) a message repeats as the component spells
/// it.
const NAME_BYTES: usize = 200;

/// The version of the `kvdb:script` package this server provides, from
/// `wit/kvdb.wit` (`package kvdb:script@0.1.0;`).
pub fn provided_version() -> &'static str {
    WIT.lines()
        .find_map(|line| line.trim().strip_prefix("package kvdb:script@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .unwrap_or_default()
}

/// `name` (an import or export of a component) as package, interface and
/// version: `wasi:http/types@0.2.0` is `("wasi:http", "types",
/// Some("0.2.0"))`. A plain name (`handle`) is none.
fn split(name: &str) -> Option<(&str, &str, Option<&str>)> {
    let (package, rest) = name.split_once('/')?;
    Some(match rest.split_once('@') {
        Some((interface, version)) => (package, interface, Some(version)),
        None => (package, rest, None),
    })
}

/// Whether this server's linker defines an import of that name (at least
/// by its package and version: an interface it lacks in a package it has
/// is left to wasmtime's message).
fn provided(name: &str) -> bool {
    match split(name) {
        Some(("kvdb:script", _, Some(version))) => version == provided_version(),
        Some((package, _, Some(version))) => {
            WASI_PACKAGES.contains(&package) && version.starts_with("0.2.")
        }
        _ => false,
    }
}

/// `s` cut to at most [`NAME_BYTES`] (at a character boundary).
fn bounded(s: &str) -> &str {
    let mut end = s.len().min(NAME_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why a component with these imports and exports, which failed to link,
/// does not fit this server, and what to do; `None` when its names do not
/// tell (wasmtime's message says more then).
pub fn misfit<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    exports: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let ours = provided_version();
    let imports: Vec<&str> = imports.into_iter().collect();
    // Another version of kvdb:script comes first: each of its imports would
    // be listed as unsupported, when the one fix is to rebuild.
    for name in imports.iter().copied().chain(exports) {
        if let Some(("kvdb:script", _, version)) = split(name)
            && version != Some(ours)
        {
            let built = match version {
                Some(v) => format!("kvdb:script@{}", bounded(v)),
                None => "kvdb:script without a version".to_owned(),
            };
            return Some(format!(
                "this component was built against {built} (it uses `{}`); this server provides \
                 kvdb:script@{ours}: rebuild it against this server's wit/ (wit/kvdb.wit)",
                bounded(name)
            ));
        }
    }
    let unsupported: Vec<&str> = imports.into_iter().filter(|n| !provided(n)).collect();
    if unsupported.is_empty() {
        return None;
    }
    let mut named: Vec<String> = unsupported
        .iter()
        .take(NAMED)
        .map(|n| format!("`{}`", bounded(n)))
        .collect();
    if unsupported.len() > NAMED {
        named.push(format!("and {} more", unsupported.len() - NAMED));
    }
    let mut message = format!(
        "it imports what this server does not provide: {}. A script may import the \
         kvdb:script@{ours} interfaces of wit/kvdb.wit, and WASI 0.2's cli, clocks, \
         filesystem, io, random and sockets (of which only clocks and random grant anything)",
        named.join(", ")
    );
    if unsupported.iter().any(|n| n.starts_with("wasi:http/")) {
        message.push_str(
            "; componentize-js imports wasi:http by default (for `fetch` and fetch events): \
             build with `disableFeatures: ['http', 'fetch-event']`",
        );
    }
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::{WASI_PACKAGES, misfit, provided, provided_version};

    #[test]
    fn the_provided_version_is_read_from_the_wit() {
        let v = provided_version();
        assert!(!v.is_empty(), "no `package kvdb:script@…;` in wit/kvdb.wit");
        assert_eq!(v.split('.').count(), 3, "{v}");
        assert!(v.split('.').all(|n| n.parse::<u32>().is_ok()), "{v}");
    }

    #[test]
    fn another_version_of_kvdb_script_says_to_rebuild() {
        let ours = format!("kvdb:script/types@{}", provided_version());
        let m = misfit(
            [
                ours.as_str(),
                "kvdb:script/kv@0.2.0",
                "wasi:http/types@0.2.0",
            ],
            ["handle"],
        )
        .expect("a reason");
        assert!(m.contains("built against kvdb:script@0.2.0"), "{m}");
        assert!(
            m.contains(&format!("provides kvdb:script@{}", provided_version())),
            "{m}"
        );
        assert!(m.contains("wit/"), "{m}");
        // Exports count too; so does a name without a version.
        let m = misfit([], ["kvdb:script/handler@9.0.0"]).expect("a reason");
        assert!(m.contains("built against kvdb:script@9.0.0"), "{m}");
        let m = misfit(["kvdb:script/kv"], []).expect("a reason");
        assert!(m.contains("without a version"), "{m}");
    }

    #[test]
    fn unsupported_imports_are_named_with_the_componentize_js_hint_for_wasi_http() {
        let m = misfit(
            [
                "wasi:io/streams@0.2.3",
                "wasi:http/types@0.2.3",
                "wasi:http/outgoing-handler@0.2.3",
                "wasi:cli/environment@0.3.0",
            ],
            [],
        )
        .expect("a reason");
        assert!(m.contains("`wasi:http/types@0.2.3`"), "{m}");
        assert!(m.contains("`wasi:http/outgoing-handler@0.2.3`"), "{m}");
        assert!(m.contains("`wasi:cli/environment@0.3.0`"), "{m}");
        assert!(!m.contains("streams"), "{m}");
        assert!(
            m.contains("disableFeatures: ['http', 'fetch-event']"),
            "{m}"
        );
        // Other imports: named, without the hint; a long list is cut.
        let many: Vec<String> = (0..20).map(|i| format!("test:other/i{i}")).collect();
        let m = misfit(many.iter().map(String::as_str), []).expect("a reason");
        assert!(
            m.contains("`test:other/i0`") && m.contains("and 12 more"),
            "{m}"
        );
        assert!(!m.contains("i19") && !m.contains("componentize-js"), "{m}");
        // Nothing to say: wasmtime's message is kept.
        assert_eq!(misfit(["wasi:random/random@0.2.0"], ["handle"]), None);
    }

    /// Each WASI package said to be provided is linked, at 0.2.0 and at a
    /// later 0.2, and `wasi:http` is not: the list can't drift from
    /// wasmtime-wasi's. Each probe imports one item of an interface of the
    /// package (an instance import without any is satisfied by nothing).
    #[test]
    fn the_wasi_packages_listed_are_the_ones_linked() {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        let engine = wasmtime::Engine::new(&config).expect("engine");
        let linker = super::super::linker(&engine).expect("linker");
        let links = |name: &str, item: &str| {
            let text = format!("(component (import \"{name}\" (instance {item})))");
            let bytes = wat::parse_str(&text).expect("wat");
            let component = wasmtime::component::Component::new(&engine, bytes).expect("compiles");
            linker.instantiate_pre(&component).is_ok()
        };
        let resource = |name: &str| format!("(export \"{name}\" (type (sub resource)))");
        let probes = [
            (
                "wasi:cli/environment",
                r#"(export "get-arguments" (func (result (list string))))"#.to_owned(),
            ),
            (
                "wasi:clocks/monotonic-clock",
                r#"(export "now" (func (result u64)))"#.to_owned(),
            ),
            ("wasi:filesystem/types", resource("descriptor")),
            ("wasi:io/error", resource("error")),
            (
                "wasi:random/random",
                r#"(export "get-random-u64" (func (result u64)))"#.to_owned(),
            ),
            ("wasi:sockets/network", resource("network")),
        ];
        assert_eq!(probes.len(), WASI_PACKAGES.len());
        for ((interface, item), package) in probes.iter().zip(WASI_PACKAGES) {
            assert!(interface.starts_with(&format!("{package}/")), "{interface}");
            for version in ["0.2.0", "0.2.3"] {
                let name = format!("{interface}@{version}");
                assert!(provided(&name), "{name}");
                assert!(links(&name, item), "{name} is not linked");
            }
            let later = format!("{interface}@0.3.0");
            assert!(!provided(&later) && !links(&later, item), "{later}");
        }
        let log = r#"(type $level (enum "debug" "info" "warn" "error"))
            (export "level" (type $l (eq $level)))
            (export "log" (func (param "level" $l) (param "message" string)))"#;
        let ours = format!("kvdb:script/log@{}", provided_version());
        assert!(provided(&ours) && links(&ours, log), "{ours}");
        let other = "kvdb:script/log@0.2.0";
        assert!(!provided(other) && !links(other, log), "{other}");
        let http = "wasi:http/types@0.2.0";
        let fields = resource("fields");
        assert!(!provided(http) && !links(http, &fields), "{http}");
    }
}

#!/usr/bin/env bash
# Runs every check and test of KVdb, installing what they need on a fresh
# machine first. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\n==> %s\n' "$*"; }

say "toolchain components"
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "$component"
  fi
done

# The example guests (examples/) build for WebAssembly components.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi

# The browser test (tests/browser, run by tests/e2e/editor.rs) drives Debian's
# Chromium through playwright-core, which never downloads a browser itself.
say "browser and client test dependencies"
# Both run on Node.js (Debian's nodejs and npm when it is missing).
packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)
if [ ${#packages[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y "${packages[@]}"
fi
# The kvdb.io client test (tests/clients, run by tests/e2e/clients.rs) runs the
# JavaScript client from npm, unchanged, against the server.
# npm ci only when node_modules is missing or older than the lock file.
for dir in tests/browser tests/clients; do
  if [ ! "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund)
  fi
done

say "cargo fmt --all -- --check"
cargo fmt --all -- --check

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Before the tests: they upload these components (target/wasm32-wasip2/release).
say "example guests for wasm32-wasip2 (release)"
cargo build --locked --target wasm32-wasip2 --release \
  -p kvdb-example-visitors -p kvdb-example-hello -p kvdb-example-scope -p kvdb-example-guestbook \
  -p kvdb-test-hostile -p kvdb-test-otherworld

# The Python guests (target/python-guests), which tests/e2e/parity.rs runs
# against the Lua and Rust ones. build.sh installs componentize-py into a venv
# there; it takes ~25 s, so it runs only when a source is newer than a guest.
say "Python guests (componentize-py)"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y python3-venv
fi
for guest in hello visitors; do
  built="target/python-guests/$guest.wasm"
  if [ ! -f "$built" ] || [ -n "$(find examples/python/build.sh "examples/python/$guest" wit \
    -newer "$built" -print -quit)" ]; then
    examples/python/build.sh "$guest"
  fi
done

say "cargo doc -p kvdb-guest (the SDK's docs build without a warning)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps -p kvdb-guest

say "cargo test --workspace"
cargo test --workspace --locked

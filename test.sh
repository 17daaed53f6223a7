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

say "cargo fmt --all -- --check"
cargo fmt --all -- --check

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "cargo test --workspace"
cargo test --workspace --locked

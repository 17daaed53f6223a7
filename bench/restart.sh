#!/usr/bin/env bash
# The first request to a WebAssembly script after a restart, with the data
# directory's compiled/ folder (code loaded) and without it (compiled again).
#
#   bench/restart.sh              # 3 interleaved rounds
#   ROUNDS=5 bench/restart.sh
#
# Builds the release server, the Rust hello guest and the Python hello guest
# (examples/python/build.sh) unless BUILD=0. Starts kvdb on 127.0.0.1 with a
# temp data dir, uploads both guests, then per round: kill -9 and restart
# with compiled/ in place, then kill -9 and restart with it moved away, and
# times the first and second request of each (curl's time_total). Without
# compiled/, the first request also pays for compressing and writing the
# new cache file (a few per cent of the compile).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
ROUNDS=${ROUNDS:-3}
kvdb=target/release/kvdb
rust_guest=target/wasm32-wasip2/release/kvdb_example_hello.wasm
python_guest=target/python-guests/hello.wasm

if [[ ${BUILD:-1} != 0 ]]; then
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
    cargo build --release -q --locked -p kvdb
    cargo build --release -q --locked --target wasm32-wasip2 -p kvdb-example-hello
    examples/python/build.sh hello >/dev/null
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvdb-restart.XXXXXX")
pid=
cleanup() {
    if [[ -n $pid ]]; then
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

start() {
    "$kvdb" serve --listen 127.0.0.1:0 --data "$tmp/data" >"$tmp/out" 2>>"$tmp/err" &
    pid=$!
    port=
    for _ in $(seq 200); do
        port=$(grep -o '127.0.0.1:[0-9]*' "$tmp/out" 2>/dev/null | head -1 | cut -d: -f2) || true
        [[ -n $port ]] && return
        sleep 0.05
    done
    echo "kvdb did not start (see $tmp/err)" >&2
    exit 1
}

stop() {
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}

first() { # script query -> seconds
    curl -fsS -o /dev/null -w '%{time_total}' "http://127.0.0.1:$port/$bucket/scripts/$1?$2"
}

start
bucket=$(curl -fsS -d secret_key=restartbench1 "http://127.0.0.1:$port/")
for pair in "rust:$rust_guest" "python:$python_guest"; do
    curl -fsS -o /dev/null -u restartbench1: -H 'Content-Type: application/wasm' \
        -T "${pair#*:}" "http://127.0.0.1:$port/$bucket/scripts/${pair%%:*}"
done
echo "compiled/ after the uploads: $(du -sh "$tmp/data/compiled" | cut -f1)"
echo
echo "| round | compiled/ | Rust hello: 1st | 2nd | Python hello: 1st | 2nd |"
echo "| ---: | --- | ---: | ---: | ---: | ---: |"
for round in $(seq "$ROUNDS"); do
    for mode in kept removed; do
        stop
        [[ $mode == removed ]] && mv "$tmp/data/compiled" "$tmp/kept"
        start
        r1=$(first rust name=x); r2=$(first rust name=y)
        p1=$(first python name=x); p2=$(first python name=y)
        echo "| $round | $mode | ${r1} s | ${r2} s | ${p1} s | ${p2} s |"
        if [[ $mode == removed ]]; then
            stop
            rm -rf "$tmp/data/compiled"
            mv "$tmp/kept" "$tmp/data/compiled"
            start
        fi
    done
done

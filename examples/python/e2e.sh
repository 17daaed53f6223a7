#!/usr/bin/env bash
# Behaviour test of the Python guests against a real server: each component
# must answer exactly (status, content-type, body) what the Lua scripts of
# API.md answer, on the same requests.
#
#   examples/python/e2e.sh [KVDB_BINARY]     # default: target/debug/kvdb
#
# Builds the components first (build.sh) unless SKIP_BUILD=1. A componentize-py
# component is about 18 MB (it carries CPython): within the default limit of
# uploaded components (--script-component-bytes, 64 MiB).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
kvdb="${1:-$root/target/debug/kvdb}"
out="${OUT_DIR:-$root/target/python-guests}"

[ "${SKIP_BUILD:-0}" = 1 ] || "$here/build.sh"

work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

"$kvdb" serve --listen 127.0.0.1:0 --backend memory --data "$work/data" \
    > "$work/server.log" 2>&1 &
pid=$!
host=""
for _ in $(seq 100); do
    host="$(grep -o 'http://[0-9.:]*' "$work/server.log" | head -n1 || true)"
    [ -n "$host" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$host" ] || { echo "the server did not start" >&2; cat "$work/server.log" >&2; exit 1; }

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# Anonymous runs may not write; runs with the write key may.
bucket="$(curl -sf -d 'secret_key=sk&write_key=wk' "$host/")"

upload() { # NAME FILE [CONTENT-TYPE]
    local t0 t1
    t0=$(date +%s%N)
    curl -sf -u sk: -T "$2" ${3:+-H "Content-Type: $3"} "$host/$bucket/scripts/$1" > /dev/null \
        || { fail "upload of $1 ($2)"; return; }
    t1=$(date +%s%N)
    echo "uploaded $1 ($(wc -c < "$2" | tr -d ' ') bytes) in $(((t1 - t0) / 1000000)) ms" >&2
}

# The Lua twins of the examples (the visitors one keys by the UTC date, as
# the Python guest does).
upload lua-hello "$root/examples/hello/hello.lua"
upload lua-visitors "$root/examples/visitors/visitors.lua"
upload py-hello "$out/hello.wasm" application/wasm
upload py-visitors "$out/visitors.wasm" application/wasm

# run SCRIPT QUERY [CURL ARGS...]: "STATUS CONTENT-TYPE" on the first line, then the body.
run() {
    local script="$1" query="$2"
    shift 2
    curl -s -o "$work/body" -w '%{http_code} %{content_type}\n' "$@" \
        "$host/$bucket/scripts/$script$query"
    cat "$work/body"
}

# expect NAME SCRIPT QUERY EXPECTED [CURL ARGS...]: the Python guest answers
# exactly EXPECTED (status line + body).
expect() {
    local name="$1" script="$2" query="$3" want="$4" got
    shift 4
    got="$(run "$script" "$query" "$@"; echo x)"
    got="${got%x}"
    [ "$got" = "$want" ] || fail "$name ($script$query): got $(printf %q "$got"), want $(printf %q "$want")"
}

# same NAME QUERY [CURL ARGS...]: py-hello and lua-hello answer the same.
same() {
    local name="$1" query="$2" py lua
    shift 2
    py="$(run py-hello "$query" "$@"; echo x)"
    lua="$(run lua-hello "$query" "$@"; echo x)"
    [ "$py" = "$lua" ] || fail "hello $name: python $(printf %q "$py"), lua $(printf %q "$lua")"
}

TEXT="text/plain; charset=utf-8"
expect "hello escapes" py-hello '?name=%3Cb%3E%26amp%3B%22x%22' \
    "200 $TEXT
Hello &lt;b&gt;&amp;amp;&quot;x&quot;
"
expect "hello escapes ' and /" py-hello "?name=%27%2F" "200 $TEXT
Hello &#x27;&#x2F;
"
expect "hello without a name" py-hello "" "200 $TEXT
Hello 
"
same "escapes" '?name=%3Cb%3E%26amp%3B%22x%22%27%2F'
same "plain" '?name=World'
same "no name" ''
same "the last duplicate" '?name=1&name=2'
same "UTF-8" '?name=%C3%A9t%C3%A9%20%E2%9C%93'
same "form body" '' -d 'name=<i>form</i>'
same "body wins" '?name=query' -d 'name=body'

# The counter: the Python and Lua scripts share the key of the day.
expect "counter 1" py-visitors "" "200 $TEXT
1
" -H 'Authorization: Bearer wk'
expect "counter 2" lua-visitors "" "200 $TEXT
2
" -H 'Authorization: Bearer wk'
expect "counter 3" py-visitors "" "200 $TEXT
3
" -H 'Authorization: Bearer wk'
day="$(date -u +%Y-%m-%d)"
key="$(curl -sf -u sk: "$host/$bucket/visitors:$day" || true)"
[ "$key" = 3 ] || fail "visitors:$day holds $(printf %q "$key"), want 3"
# A denied increment: the same 500 and text as Lua's.
py="$(run py-visitors ""; echo x)"
lua="$(run lua-visitors ""; echo x)"
[ "$py" = "$lua" ] || fail "denied counter: python $(printf %q "$py"), lua $(printf %q "$lua")"
case "$py" in
"500 $TEXT"$'\n'"error incrementing: permission denied"*) ;;
*) fail "denied counter: $(printf %q "$py")" ;;
esac

if [ "$failures" -ne 0 ]; then
    echo "examples/python/e2e.sh: $failures failure(s)" >&2
    exit 1
fi
echo "examples/python/e2e.sh: the Python guests behave as the Lua scripts" >&2

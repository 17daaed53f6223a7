#!/usr/bin/env bash
# KVdb benchmark: kvdb (strict and relaxed durability) against a trivial axum
# server (the ceiling: what the HTTP stack alone costs) and against webdis in
# front of redis (a well-known HTTP key-value service), all driven by wrk.
#
#   bench/run.sh                      # 3 rounds of 5 s per contender and case
#   DURATION=1 ROUNDS=1 bench/run.sh  # quick smoke run
#
# Prints a Markdown table and writes it to bench/results/latest.md (raw wrk
# output and server logs go to bench/results/logs/). Exits non-zero if any run
# saw an error (non-2xx answer, socket error, wrk failure, server death).
# See bench/README.md for what is measured and the targets.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
PATCH_KEYS=${PATCH_KEYS:-10000}   # key space of the "PATCH many" workload

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
RESULTS=$BENCH/results
CLK_TCK=$(getconf CLK_TCK)

log() { echo "[bench] $*" >&2; }
die() { log "error: $*"; exit 2; }

# --- setup -------------------------------------------------------------------

install_deps() {
    local missing=() tool
    for tool in wrk redis-server webdis; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]} from Debian"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk redis-server webdis >&2
    fi
    command -v python3 >/dev/null || die "python3 is needed for the report"
}

build() {
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -q -p kvdb -p kvdb-bench-ceiling) >&2
}

# A free TCP port on 127.0.0.1 (for servers that cannot take port 0 and tell
# us which port they got, i.e. redis and webdis).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

PIDS=()   # every server we started, stopped by cleanup

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ -n ${KEEP_TMP:-} ]] && log "kept $TMP" || rm -rf "$TMP"
}

# wait_listening NAME PID: wait until the server prints
# "listening on http://127.0.0.1:PORT" on stdout, then print PORT.
wait_listening() {
    local name=$1 pid=$2 line _
    for _ in $(seq 300); do
        line=$(grep -o -m1 'listening on http://[0-9.]*:[0-9]*' "$TMP/$name.out" || true)
        if [[ -n $line ]]; then echo "${line##*:}"; return 0; fi
        kill -0 "$pid" 2>/dev/null || { cat "$TMP/$name.out" "$TMP/$name.err" >&2; die "$name exited before listening"; }
        sleep 0.1
    done
    die "$name did not print its listening line within 30 s"
}

# wait_http URL EXPECTED: poll until URL answers a body containing EXPECTED.
wait_http() {
    local _
    for _ in $(seq 300); do
        curl -fsS "$1" 2>/dev/null | grep -q "$2" && return 0
        sleep 0.1
    done
    die "$1 never answered $2"
}

# start_kvdb NAME [EXTRA ARGS...]: sets NAME_PORT, NAME_PID, NAME_BUCKET.
start_kvdb() {
    local name=$1; shift
    "$ROOT/target/release/kvdb" serve --listen 127.0.0.1:0 --data "$TMP/$name-data" "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.err" &
    local pid=$!
    PIDS+=("$pid")
    local port; port=$(wait_listening "$name" "$pid")
    # A bucket created without keys needs no auth.
    local bucket; bucket=$(curl -fsS -X POST "http://127.0.0.1:$port/")
    [[ $bucket =~ ^[A-Za-z0-9_-]+$ ]] || die "$name: POST / answered '$bucket'"
    # Seed the value the GET workload reads.
    curl -fsS -o /dev/null -X PUT --data-binary hello "http://127.0.0.1:$port/$bucket/small"
    printf -v "${name}_PORT" %s "$port"
    printf -v "${name}_PID" %s "$pid"
    printf -v "${name}_BUCKET" %s "$bucket"
    log "$name: pid $pid port $port bucket $bucket ($*)"
}

start_ceiling() {
    "$ROOT/target/release/kvdb-bench-ceiling" 127.0.0.1:0 >"$TMP/ceiling.out" 2>"$TMP/ceiling.err" &
    CEIL_PID=$!
    PIDS+=("$CEIL_PID")
    CEIL_PORT=$(wait_listening ceiling "$CEIL_PID")
    log "ceiling: pid $CEIL_PID port $CEIL_PORT"
}

# redis with an append-only file fsynced every second: the same promise as
# kvdb --durability relaxed (a crash loses at most about the last second), so
# neither side gets to skip the disk entirely. No RDB snapshots (--save ''),
# whose fork would land at random in some runs. REDIS_AOF=no turns persistence
# off (pure in-memory redis) for comparison.
start_redis_webdis() {
    REDIS_PORT=$(free_port)
    mkdir -p "$TMP/redis"
    local persist=(--appendonly yes --appendfsync everysec)
    [[ ${REDIS_AOF:-everysec} == no ]] && persist=(--appendonly no)
    REDIS_DESC="redis-server ${persist[*]} --save ''"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$TMP/redis" --save '' \
        "${persist[@]}" --daemonize no --protected-mode yes \
        >"$TMP/redis.out" 2>"$TMP/redis.err" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")

    WEBDIS_PORT=$(free_port)
    # Same keys as /etc/webdis/webdis.json, minus the daemon, pidfile and ACLs.
    cat >"$TMP/webdis.json" <<EOF
{
    "redis_host": "127.0.0.1",
    "redis_port": $REDIS_PORT,
    "redis_auth": null,
    "http_host": "127.0.0.1",
    "http_port": $WEBDIS_PORT,
    "threads": 2,
    "pool_size": 20,
    "daemonize": false,
    "database": 0,
    "verbosity": 1,
    "logfile": "$TMP/webdis.log"
}
EOF
    webdis "$TMP/webdis.json" >"$TMP/webdis.out" 2>"$TMP/webdis.err" &
    WEBDIS_PID=$!
    PIDS+=("$WEBDIS_PID")
    # PING goes through webdis to redis, so both are up once it answers.
    wait_http "http://127.0.0.1:$WEBDIS_PORT/PING" PONG
    curl -fsS -o /dev/null "http://127.0.0.1:$WEBDIS_PORT/SET/small/hello"
    log "redis: pid $REDIS_PID port $REDIS_PORT; webdis: pid $WEBDIS_PID port $WEBDIS_PORT"
}

# --- measuring ---------------------------------------------------------------

# cpu_ticks PID...: utime+stime of the processes (all threads), in clock ticks.
# Fields 14 and 15 of /proc/PID/stat; cut after the ")" of the command name,
# which may contain spaces, so they become fields 12 and 13.
cpu_ticks() {
    local pid total=0 stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        total=$((total + $(awk '{print $12 + $13}' <<<"$stat")))
    done
    echo "$total"
}

# measure WORKLOAD CONNS ROUND SPEC: one wrk run, appended to runs.tsv.
# SPEC is "CONTENDER|SERVER PIDS|URL|LUA SCRIPT|SCRIPT ARGS" (args without
# spaces; @TAG@ becomes a tag unique to this connection count and round).
measure() {
    local workload=$1 conns=$2 round=$3 spec=$4
    local name pids url script args
    IFS='|' read -r name pids url script args <<<"$spec"
    args=${args//@TAG@/c${conns}r${round}}
    # wrk needs at least one connection per thread.
    local threads=2; ((conns < 2)) && threads=1
    local cmd=(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency)
    [[ -n $script ]] && cmd+=(-s "$BENCH/wrk/$script")
    cmd+=("$url")
    # shellcheck disable=SC2206 # args are space-separated words on purpose
    [[ -n $script ]] && cmd+=(-- $args)

    local logfile; logfile="$TMP/logs/$(tr -c 'A-Za-z0-9\n' _ <<<"$workload-c$conns-$name-r$round").txt"
    local before after note=""
    # shellcheck disable=SC2086 # pids is a list
    before=$(cpu_ticks $pids)
    { echo "\$ ${cmd[*]}"; "${cmd[@]}" 2>&1 || echo "wrk exited with status $?"; } >"$logfile"
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    local pid
    for pid in $pids; do
        kill -0 "$pid" 2>/dev/null || note="server pid $pid died"
    done
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$workload" "$conns" "$name" "$round" \
        "$logfile" "$((after - before))" "$note" >>"$TMP/runs.tsv"
    log "$workload c$conns r$round $name: $(grep -o 'Requests/sec:.*' "$logfile" || echo 'no result') ${note}"
}

# workload NAME SPEC...: for each connection count, ROUNDS rounds of all
# contenders in turn (A B C A B C ...). Interleaving spreads the machine's
# drift over every contender instead of letting one of them get a quiet minute.
workload() {
    local name=$1; shift
    local conns round spec
    for conns in 64 1; do
        for round in $(seq "$ROUNDS"); do
            for spec in "$@"; do
                measure "$name" "$conns" "$round" "$spec"
            done
        done
    done
}

# --- main ----------------------------------------------------------------------

install_deps
build

TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvdb-bench.XXXXXX")
trap cleanup EXIT
mkdir -p "$TMP/logs"
# Strict durability is only meaningful if fsync reaches a disk.
[[ $(stat -f -c %T "$TMP") == tmpfs ]] && log "warning: $TMP is on tmpfs, fsync costs nothing there"

start_kvdb strict                           # the default durability
start_kvdb relaxed --durability relaxed
start_ceiling
start_redis_webdis

KS="http://127.0.0.1:$strict_PORT"
KR="http://127.0.0.1:$relaxed_PORT"
WD="http://127.0.0.1:$WEBDIS_PORT"
WD_PIDS="$WEBDIS_PID $REDIS_PID"   # webdis's cost includes the redis behind it

workload "GET" \
    "kvdb strict|$strict_PID|$KS/$strict_BUCKET/small||" \
    "ceiling|$CEIL_PID|http://127.0.0.1:$CEIL_PORT/||" \
    "webdis GET|$WD_PIDS|$WD/GET/small||"

workload "PUT" \
    "kvdb strict|$strict_PID|$KS|put.lua|kvdb /$strict_BUCKET @TAG@" \
    "kvdb relaxed|$relaxed_PID|$KR|put.lua|kvdb /$relaxed_BUCKET @TAG@" \
    "webdis SET|$WD_PIDS|$WD|put.lua|webdis - @TAG@"

workload "PATCH hot" \
    "kvdb strict|$strict_PID|$KS|patch.lua|kvdb /$strict_BUCKET 1" \
    "kvdb relaxed|$relaxed_PID|$KR|patch.lua|kvdb /$relaxed_BUCKET 1" \
    "webdis INCR|$WD_PIDS|$WD|patch.lua|webdis - 1"

workload "PATCH many" \
    "kvdb strict|$strict_PID|$KS|patch.lua|kvdb /$strict_BUCKET $PATCH_KEYS" \
    "kvdb relaxed|$relaxed_PID|$KR|patch.lua|kvdb /$relaxed_BUCKET $PATCH_KEYS" \
    "webdis INCR|$WD_PIDS|$WD|patch.lua|webdis - $PATCH_KEYS"

# Lost-update check: the hot counter must equal the increments wrk counted
# (plus at most the requests still in flight when each run stopped).
COUNTERS=(
    --counter "kvdb strict=$(curl -fsS "$KS/$strict_BUCKET/ctr-0" || echo unreadable)"
    --counter "kvdb relaxed=$(curl -fsS "$KR/$relaxed_BUCKET/ctr-0" || echo unreadable)"
    --counter "webdis INCR=$(curl -fsS "$WD/GET/ctr-0.txt" || echo unreadable)"
)

# Keep the raw evidence next to the table.
mkdir -p "$RESULTS"
rm -rf "$RESULTS/logs"
cp -r "$TMP/logs" "$RESULTS/logs"
cp "$TMP"/*.out "$TMP"/*.err "$TMP/webdis.log" "$RESULTS/logs/" 2>/dev/null || true
sed "s|$TMP/logs/|$RESULTS/logs/|" "$TMP/runs.tsv" >"$RESULTS/logs/runs.tsv"

status=0
python3 "$BENCH/report.py" "$RESULTS/logs/runs.tsv" "$RESULTS/latest.md" \
    "${COUNTERS[@]}" --rounds "$ROUNDS" --duration "$DURATION" --clk-tck "$CLK_TCK" \
    --note "kvdb $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')" \
    --note "redis: $REDIS_DESC; webdis threads 2, pool_size 20; webdis CPU counts webdis + redis" \
    --note "PATCH many: key drawn at random from $PATCH_KEYS" \
    --note "machine: $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)" \
    || status=$?
exit "$status"

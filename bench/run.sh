#!/usr/bin/env bash
# KVdb benchmark: kvdb (strict and relaxed durability) against a trivial axum
# server (the ceiling: what the HTTP stack alone costs) and against webdis in
# front of redis (a well-known HTTP key-value service), all driven by wrk; and
# kvdb's Lua scripts against plain requests, with redis EVAL / INCR (driven by
# redis-benchmark over RESP) beside them.
#
#   bench/run.sh                      # 3 rounds of 5 s per contender and case
#   DURATION=1 ROUNDS=1 bench/run.sh  # quick smoke run
#   WORKLOADS=scripts bench/run.sh    # only some groups: core, scripts, wasm, all (default)
#   BUILD=0 bench/run.sh              # use the release binaries already in target/
#
# Prints a Markdown table and writes it to bench/results/latest.md (raw wrk
# output and server logs go to bench/results/logs/). Exits non-zero if any run
# saw an error (non-2xx answer, socket error, wrk or redis-benchmark failure,
# server death, lost update).
# See bench/README.md for what is measured and the targets.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
PATCH_KEYS=${PATCH_KEYS:-10000}   # key space of the "PATCH many" workload
WORKLOADS=${WORKLOADS:-all}       # groups to run, comma or space separated
SCRIPT_SECRET=s3                  # secret key of the buckets that hold the scripts

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
RESULTS=$BENCH/results
CLK_TCK=$(getconf CLK_TCK)

log() { echo "[bench] $*" >&2; }
die() { log "error: $*"; exit 2; }

# core: GET, PUT, PATCH hot, PATCH many (kvdb vs ceiling vs webdis).
# scripts: script-get, script-counter (kvdb scripts vs plain requests, redis EVAL).
# wasm: wasm-hello, wasm-counter (WebAssembly guests vs their Lua twins vs plain
#   requests), and the in-process instantiation benchmark (bench/instantiate/).
RUN_CORE="" RUN_SCRIPTS="" RUN_WASM=""
for group in ${WORKLOADS//,/ }; do
    case $group in
        all) RUN_CORE=1 RUN_SCRIPTS=1 RUN_WASM=1 ;;
        core) RUN_CORE=1 ;;
        scripts) RUN_SCRIPTS=1 ;;
        wasm) RUN_WASM=1 ;;
        *) die "unknown workload group '$group' in WORKLOADS (core, scripts, wasm, all)" ;;
    esac
done
[[ -n $RUN_CORE$RUN_SCRIPTS$RUN_WASM ]] || die "WORKLOADS names no group (core, scripts, wasm, all)"

WASM_TARGET=wasm32-wasip2
GUESTS=$ROOT/target/$WASM_TARGET/release   # the built guests
INSTANTIATE_ITERS=${INSTANTIATE_ITERS:-10000}   # per variant, in-process benchmark

# --- setup -------------------------------------------------------------------

install_deps() {
    local missing=() tool
    for tool in wrk redis-server redis-cli redis-benchmark webdis cc; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]} from Debian"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk redis-server redis-tools webdis gcc libc6-dev >&2
    fi
    command -v python3 >/dev/null || die "python3 is needed for the report"
}

# The LD_PRELOAD shim that gives the "kvdb strict (3.5 ms fsync)" contender
# the disk the group-commit target was written for (bench/slowsync/slowsync.c).
SLOWSYNC_LIB=$ROOT/target/slowsync/libslowsync.so

build() {
    if [[ -n $RUN_CORE ]]; then
        mkdir -p "${SLOWSYNC_LIB%/*}"
        cc -shared -fPIC -O2 -Wall -o "$SLOWSYNC_LIB" "$BENCH/slowsync/slowsync.c" -ldl ||
            die "could not build $BENCH/slowsync/slowsync.c"
    fi
    if [[ ${BUILD:-1} == 0 ]]; then
        log "BUILD=0: using the existing binaries ($(stat -c %y "$ROOT/target/release/kvdb" 2>/dev/null || echo 'missing'))"
        [[ -x $ROOT/target/release/kvdb && -x $ROOT/target/release/kvdb-bench-ceiling ]] ||
            die "BUILD=0 but target/release/kvdb or kvdb-bench-ceiling is missing"
        if [[ -n $RUN_WASM ]]; then
            local f
            for f in "$ROOT/target/release/kvdb-bench-instantiate" \
                "$GUESTS/kvdb_example_hello.wasm" "$GUESTS/kvdb_example_visitors.wasm"; do
                [[ -e $f ]] || die "BUILD=0 but $f is missing"
            done
        fi
        return
    fi
    log "building release binaries"
    local packages=(-p kvdb -p kvdb-bench-ceiling)
    [[ -n $RUN_WASM ]] && packages+=(-p kvdb-bench-instantiate)
    (cd "$ROOT" && cargo build --release -q "${packages[@]}") >&2
    if [[ -n $RUN_WASM ]]; then
        if ! rustup target list --installed 2>/dev/null | grep -qx "$WASM_TARGET"; then
            log "adding the $WASM_TARGET target"
            rustup target add "$WASM_TARGET" >&2
        fi
        log "building the WebAssembly guests (hello, visitors)"
        (cd "$ROOT" && cargo build --target "$WASM_TARGET" --release -q \
            -p kvdb-example-visitors -p kvdb-example-hello) >&2
    fi
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

# start_kvdb NAME [EXTRA ARGS...]: sets NAME_PORT, NAME_PID, NAME_BUCKET. The
# server's environment gets KVDB_ENV's assignments (e.g. LD_PRELOAD=...).
KVDB_ENV=()
start_kvdb() {
    local name=$1; shift
    env "${KVDB_ENV[@]}" "$ROOT/target/release/kvdb" serve --listen 127.0.0.1:0 --data "$TMP/$name-data" "$@" \
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
start_redis() {
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
    local _
    for _ in $(seq 300); do
        [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && break
        kill -0 "$REDIS_PID" 2>/dev/null || { cat "$TMP/redis.out" "$TMP/redis.err" >&2; die "redis exited"; }
        sleep 0.1
    done
    [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] || die "redis never answered PING"
    log "redis: pid $REDIS_PID port $REDIS_PORT ($REDIS_DESC)"
}

start_webdis() {
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
    log "webdis: pid $WEBDIS_PID port $WEBDIS_PORT"
}

# setup_scripts NAME: on the kvdb started as NAME, a bucket with a secret key
# (only those can have scripts) holding the key "k" = "hello", the script
# bench/scripts/get.lua as "get" and examples/visitors/visitors.lua (the
# visitors counter of API.md, keyed by the UTC date) as "visitors". Runs each
# script once to check it answers. Sets NAME_SBUCKET and NAME_VISITORS_BASE
# (the visitors count after that check, subtracted in the lost-update check).
setup_scripts() {
    local name=$1 port_var=${1}_PORT
    local base="http://127.0.0.1:${!port_var}"
    local bucket; bucket=$(curl -fsS -d "secret_key=$SCRIPT_SECRET" "$base/")
    [[ $bucket =~ ^[A-Za-z0-9_-]+$ ]] || die "$name: POST / with a secret key answered '$bucket'"
    curl -fsS -o /dev/null -X PUT --data-binary hello "$base/$bucket/k"
    local script out code
    local file
    for script in get visitors; do
        file=$BENCH/scripts/get.lua
        [[ $script == visitors ]] && file=$ROOT/examples/visitors/visitors.lua
        out=$(curl -sS -u "$SCRIPT_SECRET:" -T "$file" \
            -w '\n%{http_code}' "$base/$bucket/scripts/$script") || die "$name: upload of $script failed"
        code=${out##*$'\n'}
        [[ $code == 2?? ]] || die "$name: curl -u $SCRIPT_SECRET: -T $file $base/$bucket/scripts/$script answered $code: ${out%$'\n'*}"
        out=$(curl -sS -w '\n%{http_code}' "$base/$bucket/scripts/$script") || die "$name: running $script failed"
        code=${out##*$'\n'}
        [[ $code == 200 ]] || die "$name: GET $base/$bucket/scripts/$script answered $code: ${out%$'\n'*}"
    done
    printf -v "${name}_SBUCKET" %s "$bucket"
    printf -v "${name}_VISITORS_BASE" %s "$(visitors_count "$base/$bucket")"
    log "$name: script bucket $bucket (scripts get, visitors)"
}

# upload_script NAME BUCKET_URL SCRIPT FILE [CONTENT TYPE]: uploads FILE as
# the script SCRIPT, dies with the server's answer if it is refused.
upload_script() {
    local name=$1 url=$2 script=$3 file=$4 type=${5:-} out code
    local headers=()
    [[ -n $type ]] && headers=(-H "Content-Type: $type")
    out=$(curl -sS -u "$SCRIPT_SECRET:" -T "$file" "${headers[@]}" \
        -w '\n%{http_code}' "$url/scripts/$script") || die "$name: upload of $file failed"
    code=${out##*$'\n'}
    [[ $code == 2?? ]] || die "$name: curl -u $SCRIPT_SECRET: -T $file ${headers[*]} $url/scripts/$script answered $code: ${out%$'\n'*}"
}

# check_script NAME URL EXPECTED: GET URL must answer 200 with EXPECTED as the
# whole body (EXPECTED empty: any body).
check_script() {
    local name=$1 url=$2 expected=$3 out code body
    out=$(curl -sS -w '\n%{http_code}' "$url") || die "$name: GET $url failed"
    code=${out##*$'\n'} body=${out%$'\n'*}
    body=${body%$'\n'}   # the scripts end their answer with a newline
    [[ $code == 200 ]] || die "$name: GET $url answered $code: $body"
    [[ -z $expected || $body == "$expected" ]] || die "$name: GET $url answered '$body', expected '$expected'"
}

# setup_wasm NAME: on the kvdb started as NAME, two buckets with a secret key:
# NAME_WBUCKET holds the WebAssembly guests (examples/hello and
# examples/visitors, built for wasm32-wasip2) as "hello" and "visitors", the
# key "k" = "hello" (the plain GET) and "ctr-0" (the plain PATCH);
# NAME_LBUCKET holds their Lua twins (examples/*/hello.lua, visitors.lua)
# under the same names. Separate buckets, so each visitors counter counts one
# contender. Runs each script once to check it answers; sets
# NAME_WVISITORS_BASE and NAME_LVISITORS_BASE (the counts after that check).
setup_wasm() {
    local name=$1 port_var=${1}_PORT
    local base="http://127.0.0.1:${!port_var}" wb lb
    wb=$(curl -fsS -d "secret_key=$SCRIPT_SECRET" "$base/")
    lb=$(curl -fsS -d "secret_key=$SCRIPT_SECRET" "$base/")
    [[ $wb =~ ^[A-Za-z0-9_-]+$ && $lb =~ ^[A-Za-z0-9_-]+$ ]] ||
        die "$name: POST / with a secret key answered '$wb' / '$lb'"
    curl -fsS -o /dev/null -X PUT --data-binary hello "$base/$wb/k"
    upload_script "$name" "$base/$wb" hello "$GUESTS/kvdb_example_hello.wasm" application/wasm
    upload_script "$name" "$base/$wb" visitors "$GUESTS/kvdb_example_visitors.wasm" application/wasm
    upload_script "$name" "$base/$lb" hello "$ROOT/examples/hello/hello.lua"
    upload_script "$name" "$base/$lb" visitors "$ROOT/examples/visitors/visitors.lua"
    local b
    for b in "$wb" "$lb"; do
        check_script "$name" "$base/$b/scripts/hello?name=World" $'Hello World'
        check_script "$name" "$base/$b/scripts/visitors" ""
    done
    printf -v "${name}_WBUCKET" %s "$wb"
    printf -v "${name}_LBUCKET" %s "$lb"
    printf -v "${name}_WVISITORS_BASE" %s "$(visitors_count "$base/$wb")"
    printf -v "${name}_LVISITORS_BASE" %s "$(visitors_count "$base/$lb")"
    log "$name: WebAssembly bucket $wb, Lua bucket $lb (scripts hello, visitors)"
}

# visitors_count BUCKET_URL: the sum of every visitors:DATE counter (a run
# that crosses midnight counts into two keys).
visitors_count() {
    local listing
    listing=$(curl -fsS -u "$SCRIPT_SECRET:" "$1/?prefix=visitors:&values=true&format=text") || return 1
    awk -F= '{ n += $NF } END { print n + 0 }' <<<"$listing"
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

# redis_command NAME: the redis-benchmark command line of a RESP workload.
redis_command() {
    case $1 in
        eval) RCMD=(EVAL "return redis.call('incr', KEYS[1])" 1 k) ;;
        incr) RCMD=(INCR k) ;;
        *) die "unknown redis command '$1'" ;;
    esac
}

# rb_rps FILE: the req/s of a redis-benchmark --csv output (empty if none).
rb_rps() {
    # The test name may hold commas (EVAL ... 'incr', KEYS[1] ...): split on ",".
    grep -A1 '^"test","rps"' "$1" | sed -n 2p | awk -F'","' '{ print $2 }' || true
}

# redis-benchmark runs a number of requests, not a duration: RB_N[CMD-cCONNS]
# is the request count that should last about DURATION s, first from a short
# calibration run, then from the previous measured run (following drift).
declare -A RB_N=()
rb_requests() {
    local cmd=$1 conns=$2 port=$3 key="$1-c$2"
    if [[ -z ${RB_N[$key]:-} ]]; then
        local n0=3000; ((conns > 1)) && n0=20000
        redis_command "$cmd"
        local cal="$TMP/logs/calibration-redis-$key.txt"
        redis-benchmark -p "$port" -c "$conns" -n "$n0" --csv "${RCMD[@]}" >"$cal" 2>&1 || true
        rb_update "$key" "$(rb_rps "$cal")" "$n0"
    fi
    echo "${RB_N[$key]}"
}
rb_update() {
    local key=$1 rps=${2:-} fallback=$3
    if [[ $rps =~ ^[0-9.]+$ ]]; then
        RB_N[$key]=$(awk -v r="$rps" -v d="$DURATION" 'BEGIN { n = int(r * d); print (n < 1000 ? 1000 : n) }')
    else
        RB_N[$key]=$fallback
    fi
}

# measure WORKLOAD CONNS ROUND SPEC: one wrk or redis-benchmark run, appended
# to runs.tsv. SPEC is "CONTENDER|SERVER PIDS|URL|LUA SCRIPT|SCRIPT ARGS" (args
# without spaces; @TAG@ becomes a tag unique to this connection count and
# round). A URL resp://127.0.0.1:PORT means redis-benchmark on that port, with
# the LUA SCRIPT field naming the command (see redis_command).
measure() {
    local workload=$1 conns=$2 round=$3 spec=$4
    local name pids url script args
    IFS='|' read -r name pids url script args <<<"$spec"
    args=${args//@TAG@/c${conns}r${round}}
    local cmd tool requests=""
    if [[ $url == resp://* ]]; then
        tool=redis-benchmark
        [[ -n ${RB_N[$script-c$conns]:-} ]] || rb_requests "$script" "$conns" "${url##*:}" >/dev/null
        requests=${RB_N[$script-c$conns]}
        redis_command "$script"
        cmd=(redis-benchmark -p "${url##*:}" -c "$conns" -n "$requests" --csv "${RCMD[@]}")
    else
        tool=wrk
        # wrk needs at least one connection per thread.
        local threads=2; ((conns < 2)) && threads=1
        cmd=(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency)
        [[ -n $script ]] && cmd+=(-s "$BENCH/wrk/$script")
        cmd+=("$url")
        # shellcheck disable=SC2206 # args are space-separated words on purpose
        if [[ -n $script ]]; then cmd+=(-- $args); fi
    fi

    local logfile; logfile="$TMP/logs/$(tr -c 'A-Za-z0-9\n' _ <<<"$workload-c$conns-$name-r$round").txt"
    local before after note="" start end
    # shellcheck disable=SC2086 # pids is a list
    before=$(cpu_ticks $pids)
    start=$(date +%s.%N)
    { printf '$'; printf ' %q' "${cmd[@]}"; echo
      "${cmd[@]}" 2>&1 || echo "$tool exited with status $?"; } >"$logfile"
    end=$(date +%s.%N)
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    if [[ $tool == redis-benchmark ]]; then
        # What report.py needs and the CSV lacks: the request count and the time.
        printf 'redis-benchmark requests: %s\nelapsed: %s s\n' "$requests" \
            "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" >>"$logfile"
        rb_update "$script-c$conns" "$(rb_rps "$logfile")" "$requests"
    fi
    local pid
    for pid in $pids; do
        kill -0 "$pid" 2>/dev/null || note="server pid $pid died"
    done
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$workload" "$conns" "$name" "$round" \
        "$logfile" "$((after - before))" "$note" >>"$TMP/runs.tsv"
    local result; result=$(grep -o 'Requests/sec:.*' "$logfile" || true)
    if [[ $tool == redis-benchmark ]]; then
        result=$(rb_rps "$logfile")
        result=${result:+"Requests/sec: $result (-n $requests)"}
    fi
    log "$workload c$conns r$round $name: ${result:-no result} ${note}"
}

# group_commit NAME PID URL BUCKET CONNS...: how many durable writes share one
# fsync. One extra PUT run per connection count, outside the measured rounds
# (counting syscalls through tracepoints slows the server a little), with
# `perf stat` counting the server's fdatasync and fsync calls while wrk runs.
# Appends rows to $TMP/logs/group-commit.tsv; a missing or refused perf is
# noted, not an error (this is evidence for the PUT rows, not a measurement of
# its own).
group_commit() {
    local name=$1 pid=$2 url=$3 bucket=$4; shift 4
    local conns threads log requests syncs
    for conns in "$@"; do
        threads=2; ((conns < 2)) && threads=1
        log="$TMP/logs/$(tr -c 'A-Za-z0-9\n' _ <<<"group-commit-$name-c$conns")"
        if ! perf stat -x, -o "$log.perf" \
            -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync -p "$pid" -- \
            wrk -t"$threads" -c"$conns" -d"${DURATION}s" -s "$BENCH/wrk/put.lua" "$url" \
            -- kvdb "/$bucket" "gc$conns" >"$log.txt" 2>&1; then
            printf '%s\t%s\tperf stat failed (see logs/%s.perf and .txt)\n' \
                "$name" "$conns" "${log##*/}" >>"$TMP/logs/group-commit.tsv"
            continue
        fi
        requests=$(awk '/requests in/ { print $1 }' "$log.txt")
        syncs=$(awk -F, '/syscalls:sys_enter_f(data)?sync/ { n += $1 } END { print n + 0 }' "$log.perf")
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$conns" "${requests:-?}" "$syncs" \
            "$(grep -c -E 'Non-2xx|Socket errors' "$log.txt" || true)" >>"$TMP/logs/group-commit.tsv"
        log "group commit $name c$conns: ${requests:-?} writes answered, $syncs fsyncs"
    done
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
if [[ -n $RUN_CORE ]]; then
    # The default durability on an emulated slower disk: every fsync takes at
    # least 3.5 ms (the disk measured before the project started, in
    # ../shared/FACTS.md outside this repository, for which the group-commit
    # target was set).
    KVDB_ENV=("LD_PRELOAD=$SLOWSYNC_LIB" "SLOWSYNC_US=3500")
    start_kvdb slowsync
    KVDB_ENV=()
    grep -q '^slowsync: ' "$TMP/slowsync.err" || die "the slowsync shim is not active (see $TMP/slowsync.err)"
fi
start_redis
if [[ -n $RUN_CORE ]]; then
    start_ceiling
    start_webdis
fi
if [[ -n $RUN_SCRIPTS ]]; then
    setup_scripts strict
    setup_scripts relaxed
fi
[[ -n $RUN_WASM ]] && setup_wasm strict

KS="http://127.0.0.1:$strict_PORT"
KR="http://127.0.0.1:$relaxed_PORT"
[[ -n $RUN_CORE ]] && KD="http://127.0.0.1:$slowsync_PORT"
NOTES=("kvdb $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')")
[[ ${BUILD:-1} == 0 ]] && NOTES[0]+=", not rebuilt (BUILD=0): binary of $(stat -c %y "$ROOT/target/release/kvdb" | cut -d. -f1)"
COUNTERS=()
INSTANTIATE_ARGS=()   # report.py arguments of the in-process benchmark
GROUP_COMMIT_ARGS=()  # report.py arguments of the group-commit table

if [[ -n $RUN_CORE ]]; then
    WD="http://127.0.0.1:$WEBDIS_PORT"
    WD_PIDS="$WEBDIS_PID $REDIS_PID"   # webdis's cost includes the redis behind it

    workload "GET" \
        "kvdb strict|$strict_PID|$KS/$strict_BUCKET/small||" \
        "ceiling|$CEIL_PID|http://127.0.0.1:$CEIL_PORT/||" \
        "webdis GET|$WD_PIDS|$WD/GET/small||"

    workload "PUT" \
        "kvdb strict|$strict_PID|$KS|put.lua|kvdb /$strict_BUCKET @TAG@" \
        "kvdb relaxed|$relaxed_PID|$KR|put.lua|kvdb /$relaxed_BUCKET @TAG@" \
        "webdis SET|$WD_PIDS|$WD|put.lua|webdis - @TAG@" \
        "kvdb strict (3.5 ms fsync)|$slowsync_PID|$KD|put.lua|kvdb /$slowsync_BUCKET @TAG@"

    # Direct evidence of group commit: durable writes answered per fsync.
    if command -v perf >/dev/null; then
        group_commit "kvdb strict" "$strict_PID" "$KS" "$strict_BUCKET" 64 1
        group_commit "kvdb relaxed" "$relaxed_PID" "$KR" "$relaxed_BUCKET" 64
        group_commit "kvdb strict (3.5 ms fsync)" "$slowsync_PID" "$KD" "$slowsync_BUCKET" 64 1
        GROUP_COMMIT_ARGS+=(--group-commit "$RESULTS/logs/group-commit.tsv")   # copied there below
    else
        NOTES+=("group commit (writes per fsync) not measured: no perf (Debian: linux-perf)")
    fi

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
    COUNTERS+=(
        --counter "PATCH hot|kvdb strict=$(curl -fsS "$KS/$strict_BUCKET/ctr-0" || echo unreadable)"
        --counter "PATCH hot|kvdb relaxed=$(curl -fsS "$KR/$relaxed_BUCKET/ctr-0" || echo unreadable)"
        --counter "PATCH hot|webdis INCR=$(curl -fsS "$WD/GET/ctr-0.txt" || echo unreadable)"
    )
    NOTES+=(
        "redis: $REDIS_DESC; webdis threads 2, pool_size 20; webdis CPU counts webdis + redis"
        "PATCH many: key drawn at random from $PATCH_KEYS"
        "kvdb strict (3.5 ms fsync): the default durability with bench/slowsync/slowsync.c preloaded, which makes every fsync and fdatasync take at least 3.5 ms (the disk measured before the project started, for which the 20× group-commit target was set); PUT only"
    )
fi

if [[ -n $RUN_SCRIPTS ]]; then
    SS="$KS/$strict_SBUCKET"
    SR="$KR/$relaxed_SBUCKET"
    RESP="resp://127.0.0.1:$REDIS_PORT"

    # A script that reads one small key and says it, vs GET of that key.
    workload "script-get" \
        "kvdb strict script|$strict_PID|$SS/scripts/get||" \
        "kvdb strict GET|$strict_PID|$SS/k||"

    # The visitors counter of API.md (incr, then get, then say), vs PATCH +1 on
    # one hot key; redis EVAL of an incr script and plain INCR beside them.
    workload "script-counter" \
        "kvdb strict script|$strict_PID|$SS/scripts/visitors||" \
        "kvdb strict PATCH|$strict_PID|$KS|patch.lua|kvdb /$strict_SBUCKET 1" \
        "kvdb relaxed script|$relaxed_PID|$SR/scripts/visitors||" \
        "kvdb relaxed PATCH|$relaxed_PID|$KR|patch.lua|kvdb /$relaxed_SBUCKET 1" \
        "redis EVAL (RESP)|$REDIS_PID|$RESP|eval|" \
        "redis INCR (RESP)|$REDIS_PID|$RESP|incr|"

    # Lost-update check: every answered script run counted one visitor.
    vs=$(visitors_count "$SS") || vs=unreadable
    vr=$(visitors_count "$SR") || vr=unreadable
    [[ $vs =~ ^[0-9]+$ ]] && vs=$((vs - strict_VISITORS_BASE))
    [[ $vr =~ ^[0-9]+$ ]] && vr=$((vr - relaxed_VISITORS_BASE))
    COUNTERS+=(
        --counter "script-counter|kvdb strict script=$vs"
        --counter "script-counter|kvdb relaxed script=$vr"
        --counter "script-counter|kvdb strict PATCH=$(curl -fsS "$SS/ctr-0" || echo unreadable)"
        --counter "script-counter|kvdb relaxed PATCH=$(curl -fsS "$SR/ctr-0" || echo unreadable)"
    )
    NOTES+=(
        "scripts: Lua, uploaded to a bucket with a secret key, run anonymously with GET /BUCKET/scripts/NAME; script-get is bench/scripts/get.lua, script-counter is examples/visitors/visitors.lua (the visitors counter of API.md, keyed by the UTC date)"
        "redis rows: redis-benchmark -c 64 / -c 1 -n N (N from the previous run's rate, for about $DURATION s) against $REDIS_DESC; EVAL is \`EVAL \"return redis.call('incr', KEYS[1])\" 1 k\`; server CPU counts redis only"
    )
fi

if [[ -n $RUN_WASM ]]; then
    SW="$KS/$strict_WBUCKET"
    SL="$KS/$strict_LBUCKET"

    # Hello (greets ?name=World): the WebAssembly guest vs its Lua twin vs a
    # plain GET of a 5-byte key, in the same bucket as the guest.
    workload "wasm-hello" \
        "kvdb strict WASM hello|$strict_PID|$SW/scripts/hello?name=World||" \
        "kvdb strict Lua hello|$strict_PID|$SL/scripts/hello?name=World||" \
        "kvdb strict GET|$strict_PID|$SW/k||"

    # The visitors counter (incr, get, answer): WebAssembly vs Lua vs PATCH +1.
    workload "wasm-counter" \
        "kvdb strict WASM counter|$strict_PID|$SW/scripts/visitors||" \
        "kvdb strict Lua counter|$strict_PID|$SL/scripts/visitors||" \
        "kvdb strict PATCH|$strict_PID|$KS|patch.lua|kvdb /$strict_WBUCKET 1"

    vw=$(visitors_count "$SW") || vw=unreadable
    vl=$(visitors_count "$SL") || vl=unreadable
    [[ $vw =~ ^[0-9]+$ ]] && vw=$((vw - strict_WVISITORS_BASE))
    [[ $vl =~ ^[0-9]+$ ]] && vl=$((vl - strict_LVISITORS_BASE))
    COUNTERS+=(
        --counter "wasm-counter|kvdb strict WASM counter=$vw"
        --counter "wasm-counter|kvdb strict Lua counter=$vl"
        --counter "wasm-counter|kvdb strict PATCH=$(curl -fsS "$SW/ctr-0" || echo unreadable)"
    )

    # In-process: fresh store + instantiate + call, pooled vs on-demand.
    log "in-process instantiation benchmark ($INSTANTIATE_ITERS iterations per variant)"
    INSTANTIATE_ARGS=(--section "$RESULTS/logs/instantiate.md")   # copied there below
    if ! env -u ONLY ITERS=$INSTANTIATE_ITERS "$ROOT/target/release/kvdb-bench-instantiate" \
        "$GUESTS/kvdb_example_hello.wasm" "$TMP/logs/instantiate.md" \
        >"$TMP/logs/instantiate.txt" 2>&1; then
        cat "$TMP/logs/instantiate.txt" >&2
        INSTANTIATE_ARGS+=(--failed "kvdb-bench-instantiate failed: see bench/results/logs/instantiate.txt")
    fi
    NOTES+=(
        "wasm: examples/hello and examples/visitors built for wasm32-wasip2 (64 KiB guest stack, .cargo/config.toml), uploaded with Content-Type application/wasm to one bucket with a secret key, their Lua twins (examples/*/hello.lua, visitors.lua) to another; run anonymously with GET /BUCKET/scripts/NAME (hello with ?name=World); GET and PATCH on the WebAssembly bucket; guests of $(stat -c %y "$GUESTS/kvdb_example_hello.wasm" | cut -d. -f1)"
    )
fi

# Keep the raw evidence next to the table.
mkdir -p "$RESULTS"
rm -rf "$RESULTS/logs"
cp -r "$TMP/logs" "$RESULTS/logs"
cp "$TMP"/*.out "$TMP"/*.err "$TMP/webdis.log" "$RESULTS/logs/" 2>/dev/null || true
sed "s|$TMP/logs/|$RESULTS/logs/|" "$TMP/runs.tsv" >"$RESULTS/logs/runs.tsv"

# The CPU model, kernel and how long the machine has been up go with the
# figures: WebAssembly hello took 23.1 µs of server CPU a request on a freshly
# provisioned VM (13:49 on 2026-12-04) and 16.5 µs on one up for hours, while
# a GET took 8.1 and 7.9 (bench/HISTORY.md).
# (A VM's model name can be as vague as "AMD EPYC": family, model and
# stepping tell the generation.)
cpu_model=$(awk -F': ' '/^model name/ {n = $2} /^cpu family/ {f = $2} /^model\t/ {m = $2}
    /^stepping/ {s = $2} /^$/ {exit} END {printf "%s, family %s model %s stepping %s", n, f, m, s}' /proc/cpuinfo)
NOTES+=("machine: $(nproc) cores (${cpu_model:-unknown CPU}), Linux $(uname -r), up $(awk '{printf "%.1f h", $1 / 3600}' /proc/uptime), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)")
NOTE_ARGS=()
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done

status=0
python3 "$BENCH/report.py" "$RESULTS/logs/runs.tsv" "$RESULTS/latest.md" \
    "${COUNTERS[@]}" "${NOTE_ARGS[@]}" "${GROUP_COMMIT_ARGS[@]}" "${INSTANTIATE_ARGS[@]}" \
    --rounds "$ROUNDS" --duration "$DURATION" --clk-tck "$CLK_TCK" \
    || status=$?
exit "$status"

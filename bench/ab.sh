#!/usr/bin/env bash
# A/B of two kvdb binaries on the same machine, interleaved: for each round and
# workload, A then B. Prints each run, then medians (min-max) of req/s and of
# the server's CPU µs per request (from /proc), which drift less than req/s.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY
#   ROUNDS=5 SECONDS_EACH=4 WORKLOADS="patch-relaxed-1 put-relaxed-1" bench/ab.sh A B
#
# Workloads: KIND-DURABILITY-CONNS with KIND get (a small value), put (fresh
# keys), patch (+1 on one of 10,000 keys), patchhot (+1 on one key), wasmhello
# (the WebAssembly hello example, GET ?name=World), luahello (its Lua twin),
# wasmcounter (the WebAssembly visitors counter), luacounter (its Lua twin);
# DURABILITY strict or relaxed. The wasm workloads need the guests built
# (cargo build --target wasm32-wasip2 --release -p kvdb-example-hello
# -p kvdb-example-visitors).
# Default: patch-relaxed-1 put-relaxed-1 patch-strict-1 patch-relaxed-64.
# Needs wrk (bench/run.sh installs it). Build the two binaries the same way,
# e.g. with CARGO_TARGET_DIR=target/ab CARGO_PROFILE_RELEASE_LTO=false for a
# quick A/B (the default fat LTO takes minutes per build).
set -euo pipefail

[ $# -eq 2 ] || { sed -n 2,18p "$0"; exit 2; }
A=$1 B=$2
ROUNDS=${ROUNDS:-5}
SECONDS_EACH=${SECONDS_EACH:-4}
WORKLOADS=${WORKLOADS:-patch-relaxed-1 put-relaxed-1 patch-strict-1 patch-relaxed-64}
here="$(cd "$(dirname "$0")" && pwd)"
GUESTS=$here/../target/wasm32-wasip2/release
command -v wrk >/dev/null || { echo "wrk is missing: bench/run.sh installs it" >&2; exit 1; }

tmp=$(mktemp -d /var/tmp/kvdb-ab.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

declare -A server
start() { # NAME BINARY DURABILITY
    local dir="$tmp/$1"
    mkdir -p "$dir"
    "$2" serve --listen 127.0.0.1:0 --data "$dir/data" --durability "$3" >"$dir/out" 2>"$dir/err" &
    pids+=($!)
    local pid=$! port=""
    for _ in $(seq 100); do
        port=$(grep -o '127.0.0.1:[0-9]*' "$dir/out" 2>/dev/null | head -1 | cut -d: -f2 || true)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "$1 did not start: $(cat "$dir/err")" >&2; exit 1; }
    local bucket
    bucket=$(curl -fsS -d secret_key=abbenchsecret "http://127.0.0.1:$port/")
    curl -fsS -X PUT --data-binary hello "http://127.0.0.1:$port/$bucket/k"
    # The scripts the workloads run: KIND NAME FILE (a component if .wasm).
    local kind name file
    while read -r kind name file; do
        [[ " $WORKLOADS " == *" $kind-"* ]] || continue
        local type=()
        [[ $file == *.wasm ]] && type=(-H 'Content-Type: application/wasm')
        curl -fsS -o /dev/null -u abbenchsecret: "${type[@]}" -T "$file" \
            "http://127.0.0.1:$port/$bucket/scripts/$name"
    done <<EOF
wasmhello whello $GUESTS/kvdb_example_hello.wasm
luahello lhello $here/../examples/hello/hello.lua
wasmcounter wcounter $GUESTS/kvdb_example_visitors.wasm
luacounter lcounter $here/../examples/visitors/visitors.lua
EOF
    server[$1]="$port $bucket $pid"
}
for side in A B; do
    bin=$A; [ $side = B ] && bin=$B
    for d in strict relaxed; do start "$side-$d" "$bin" "$d"; done
done

run() { # SIDE WORKLOAD
    local kind durability conns port bucket pid threads=2 t0 t1
    IFS=- read -r kind durability conns <<<"$2"
    read -r port bucket pid <<<"${server[$1-$durability]}"
    [ "$conns" -lt 2 ] && threads=1
    local url="http://127.0.0.1:$port" out="$tmp/wrk.out"
    t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    case $kind in
        get) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" "$url/$bucket/k" >"$out" ;;
        put) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" -s "$here/wrk/put.lua" "$url" -- kvdb "/$bucket" "ab$RANDOM$RANDOM" >"$out" ;;
        patch) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" -s "$here/wrk/patch.lua" "$url" -- kvdb "/$bucket" 10000 >"$out" ;;
        wasmhello) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" "$url/$bucket/scripts/whello?name=World" >"$out" ;;
        wasmcounter) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" "$url/$bucket/scripts/wcounter" >"$out" ;;
        luacounter) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" "$url/$bucket/scripts/lcounter" >"$out" ;;
        luahello) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" "$url/$bucket/scripts/lhello?name=World" >"$out" ;;
        patchhot) wrk -t$threads -c"$conns" -d"${SECONDS_EACH}s" -s "$here/wrk/patch.lua" "$url" -- kvdb "/$bucket" 1 >"$out" ;;
        *) echo "unknown workload $2" >&2; exit 2 ;;
    esac
    t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    local requests rps errors
    requests=$(awk '/requests in/{print $1}' "$out")
    rps=$(awk '/Requests\/sec/{print $2}' "$out")
    errors=$(grep -c 'Non-2xx\|Socket errors' "$out" || true)
    local ticks
    ticks=$(getconf CLK_TCK)
    echo "$2 $1 $rps $(python3 -c "print(round(($t1-$t0)*1e6/$ticks/$requests, 1))") $errors"
}

log="$tmp/runs"
for r in $(seq "$ROUNDS"); do
    for w in $WORKLOADS; do
        for side in A B; do run $side "$w" | tee -a "$log"; done
    done
done
echo
echo "A = $A"
echo "B = $B"
python3 - "$log" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    workload, side, rps, cpu, errors = line.split()
    runs[workload, side].append((float(rps), float(cpu), int(errors)))
print(f"| workload | side | req/s median (min-max) | CPU µs/req median (min-max) | runs with errors |")
print("| --- | --- | ---: | ---: | ---: |")
for (workload, side), v in sorted(runs.items()):
    rps = [x[0] for x in v]; cpu = [x[1] for x in v]
    print(f"| {workload} | {side} | {statistics.median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
          f"| {statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) | {sum(x[2] for x in v)} |")
PY

#!/usr/bin/env python3
"""Turn the wrk runs of bench/run.sh into a Markdown table (stdlib only).

Input: runs.tsv, one line per wrk run:
    workload, connections, contender, round, wrk log file, server CPU ticks, note
(note is non-empty when something went wrong outside wrk, e.g. a server died).

Output: the table on stdout and in OUT_MD. Exit status 1 if any run had an
error, so the benchmark fails loudly while still showing everything it measured.
"""

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

# The ratios we track, as (numerator, denominator, target or None).
# Each side is (workload, connections, contender); None connections means
# "at each connection count".
RATIOS = [
    (("GET", None, "kvdb strict"), ("GET", None, "ceiling"), 0.7),
    (("GET", None, "kvdb strict"), ("GET", None, "webdis GET"), 1.4),
    (("PUT", 64, "kvdb strict"), ("PUT", 1, "kvdb strict"), 20.0),
    (("PUT", None, "kvdb relaxed"), ("PUT", None, "webdis SET"), 1.0),
    (("PUT", None, "kvdb strict"), ("PUT", None, "webdis SET"), None),
    (("PATCH hot", None, "kvdb relaxed"), ("PATCH hot", None, "webdis INCR"), 1.0),
    (("PATCH hot", None, "kvdb strict"), ("PATCH hot", None, "webdis INCR"), None),
    (("PATCH many", None, "kvdb relaxed"), ("PATCH many", None, "webdis INCR"), 1.0),
    (("PATCH many", None, "kvdb strict"), ("PATCH many", None, "webdis INCR"), None),
]

UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
DURATION = r"([\d.]+)(us|ms|s|m)\b"


def to_us(value, unit):
    return float(value) * UNIT_US[unit]


def parse_wrk(text):
    """What one wrk --latency run reports; missing fields stay absent."""
    run = {"errors": {}}
    if m := re.search(r"(\d+) requests in " + DURATION, text):
        run["requests"] = int(m[1])
    if m := re.search(r"Requests/sec:\s*([\d.]+)", text):
        run["rps"] = float(m[1])
    for pct in ("50", "99"):
        if m := re.search(rf"^\s*{pct}(?:\.0+)?%\s+" + DURATION, text, re.M):
            run[f"p{pct}"] = to_us(m[1], m[2])
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text):
        run["errors"]["non-2xx"] = int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        for kind, n in zip(("connect", "read", "write", "timeout"), m.groups()):
            if int(n):
                run["errors"][kind] = int(n)
    if "rps" not in run or not run.get("requests"):
        run["errors"]["no result from wrk"] = 1
    return run


def load(tsv, clk_tck):
    groups = {}  # (workload, conns, contender) -> list of runs
    order = []
    for line in Path(tsv).read_text().splitlines():
        if not line.strip():
            continue
        workload, conns, contender, _round, logfile, ticks, *rest = line.split("\t")
        note = rest[0] if rest else ""
        run = parse_wrk(Path(logfile).read_text(errors="replace"))
        if note:
            run["errors"][note] = 1
        if run.get("requests"):
            run["cpu_us"] = int(ticks) * 1e6 / clk_tck / run["requests"]
        key = (workload, int(conns), contender)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(run)
    return order, groups


def median_of(runs, field):
    values = [r[field] for r in runs if field in r]
    return statistics.median(values) if values else None


def check_counters(counters, groups):
    """The hot key got one increment per answered PATCH hot request, plus at most
    one per connection per run for requests still in flight when wrk stopped."""
    checks = []
    for item in counters:
        contender, _, value = item.partition("=")
        runs = [(k[1], r) for k, rs in groups.items()
                if k[0] == "PATCH hot" and k[2] == contender for r in rs]
        counted = sum(r.get("requests", 0) for _, r in runs)
        in_flight = sum(conns for conns, _ in runs)
        errors = sum(sum(r["errors"].values()) for _, r in runs)
        try:
            n = int(value.strip())
        except ValueError:
            checks.append((False, f"{contender}: counter unreadable ({value.strip()!r})"))
            continue
        ok = counted <= n <= counted + in_flight + errors
        checks.append((ok, f"{contender}: counter {n:,}, answered {counted:,} "
                           f"(+ up to {in_flight} in flight)"))
    return checks


def fmt_rps(x):
    return "–" if x is None else f"{x:,.0f}"


def fmt_range(lo, hi):
    return "–" if lo is None else f"{fmt_rps(lo)}–{fmt_rps(hi)}"


def fmt_lat(us):
    if us is None:
        return "–"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1e6:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_cpu(us):
    return "–" if us is None else f"{us:.1f}"


def fmt_errors(runs):
    total = {}
    for r in runs:
        for kind, n in r["errors"].items():
            total[kind] = total.get(kind, 0) + n
    if not total:
        return "0"
    return "**" + ", ".join(f"{n} {kind}" for kind, n in total.items()) + "**"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs_tsv")
    ap.add_argument("out_md")
    ap.add_argument("--rounds", required=True)
    ap.add_argument("--duration", required=True)
    ap.add_argument("--clk-tck", type=int, default=100)
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--counter", action="append", default=[],
                    help="CONTENDER=VALUE: the hot counter read back after the runs")
    args = ap.parse_args()

    order, groups = load(args.runs_tsv, args.clk_tck)
    stats = {
        key: {
            "rps": median_of(runs, "rps"),
            "min": min((r["rps"] for r in runs if "rps" in r), default=None),
            "max": max((r["rps"] for r in runs if "rps" in r), default=None),
            "p50": median_of(runs, "p50"),
            "p99": median_of(runs, "p99"),
            "cpu": median_of(runs, "cpu_us"),
            "errors": fmt_errors(runs),
        }
        for key, runs in groups.items()
    }
    checks = check_counters(args.counter, groups)
    any_error = any(s["errors"] != "0" for s in stats.values()) or any(not ok for ok, _ in checks)

    out = [
        "# KVdb benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {args.rounds} round(s) of {args.duration} s per "
        "contender, contenders interleaved (A B C A B C …); wrk -t2 -c64 and -t1 -c1.",
        "",
        *(f"- {n}" for n in args.note),
        "",
        "| Workload | Conns | Contender | req/s (median) | min–max | p50 | p99 | server CPU µs/req | Errors |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for key in order:
        workload, conns, contender = key
        s = stats[key]
        out.append(
            f"| {workload} | {conns} | {contender} | {fmt_rps(s['rps'])} | "
            f"{fmt_range(s['min'], s['max'])} | {fmt_lat(s['p50'])} | "
            f"{fmt_lat(s['p99'])} | {fmt_cpu(s['cpu'])} | {s['errors']} |"
        )

    out += [
        "",
        "Ratios of median req/s:",
        "",
        "| Ratio | Conns | Value | Target | Met |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    conn_counts = sorted({k[1] for k in order}, reverse=True)
    for num, den, target in RATIOS:
        pairs = []
        if num[1] is None:
            pairs = [(c, (num[0], c, num[2]), (den[0], c, den[2])) for c in conn_counts]
        else:
            pairs = [(f"{num[1]} / {den[1]}", num, den)]
        for conns, nk, dk in pairs:
            n, d = stats.get(nk, {}).get("rps"), stats.get(dk, {}).get("rps")
            value = n / d if n and d else None
            met = "–" if target is None or value is None else ("✅" if value >= target else "❌")
            label = (f"{nk[0]}: {nk[2]}, {nk[1]} / {dk[1]} connections" if nk[2] == dk[2]
                     else f"{nk[0]}: {nk[2]} / {dk[2]}")
            out.append(
                f"| {label} | {conns} | "
                f"{'–' if value is None else f'{value:.2f}×'} | "
                f"{'–' if target is None else f'≥ {target:g}×'} | {met} |"
            )
    out += ["", "Lost-update check (PATCH hot: counter read back vs. increments wrk counted):", ""]
    out += [f"- {'ok' if ok else '**FAILED**'}: {msg}" for ok, msg in checks]
    out += [
        "",
        "Errors: " + ("**some runs had errors (see the Errors column and the wrk logs in "
                      "bench/results/logs/)**" if any_error else "none."),
        "",
    ]

    text = "\n".join(out)
    Path(args.out_md).write_text(text)
    print(text)
    return 1 if any_error else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How much one client's JSON merges on a large document hold up the other
buckets' writes (the single writer commits every bucket's writes).

usage: bench/json_stall.py [KVDB_BINARY] [MERGING_CLIENTS]
       (defaults: target/release/kvdb, 1)

Starts the server on 127.0.0.1 with a temp data dir (stopped and removed at
the end), stores a ~8 MB JSON document in bucket A, and has a probe PUT a
one-byte value to bucket B every 10 ms: 3 s with nothing else running, then
8 s while MERGING_CLIENTS clients merge-patch the document in A without a
pause. Prints the probe's median and worst latency for both phases.
Standard library only.
"""
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/kvdb"
clients = int(sys.argv[2]) if len(sys.argv) > 2 else 1
data = tempfile.mkdtemp(prefix="kvdb-json-stall-")
server = subprocess.Popen(
    [binary, "serve", "--listen", "127.0.0.1:0", "--data", data],
    stderr=subprocess.PIPE,
    text=True,
)
try:
    address = None
    for line in server.stderr:
        found = re.search(r"(127\.0\.0\.1:\d+)", line)
        if found:
            address = found.group(1)
            break
    if address is None:
        sys.exit("the server did not say where it listens")
    # Keep reading its log so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    base = f"http://{address}"

    def call(method, path, body=b"", content_type=None):
        request = urllib.request.Request(base + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    a = call("POST", "/")[1].decode().strip()
    b = call("POST", "/")[1].decode().strip()
    document = json.dumps({f"k{i}": "x" * 100 for i in range(70000)}).encode()
    status, _ = call("PUT", f"/{a}/big", document, "application/json")
    if status != 204:
        sys.exit(f"storing the document: {status}")
    print(f"document: {len(document) / 1e6:.1f} MB")

    def probe(seconds):
        latencies, end, i = [], time.time() + seconds, 0
        while time.time() < end:
            started = time.perf_counter()
            call("PUT", f"/{b}/p{i % 100}", b"1")
            latencies.append(time.perf_counter() - started)
            i += 1
            time.sleep(0.01)
        return latencies

    idle = probe(3)
    stop = threading.Event()
    merges = []

    def merge():
        n = 0
        while not stop.is_set():
            patch = json.dumps({"n": n}).encode()
            status, _ = call("PATCH", f"/{a}/big", patch, "application/merge-patch+json")
            if status != 200:
                sys.exit(f"merge: {status}")
            merges.append(n)
            n += 1

    threads = [threading.Thread(target=merge) for _ in range(clients)]
    for t in threads:
        t.start()
    busy = probe(8)
    stop.set()
    for t in threads:
        t.join()

    def ms(latencies):
        return statistics.median(latencies) * 1e3, max(latencies) * 1e3

    print("probe PUT, idle: median %.1f ms, max %.1f ms" % ms(idle))
    print(
        "probe PUT during %d merges by %d client(s): median %.1f ms, max %.1f ms"
        % ((len(merges), clients) + ms(busy))
    )
finally:
    server.send_signal(signal.SIGTERM)
    server.wait()
    shutil.rmtree(data, ignore_errors=True)

"""Load on `cbir serve` (127.0.0.1 only): 8 concurrent clients for 60 s, then again while
`cbir index --update` rewrites the served index (100 files changed).

    python benchmarks/serve_load.py [--data ../shared/data/animals4] [--seconds 60] [--clients 8]

Reports requests, errors, throughput and latency percentiles per phase, the update's own duration, and
whether the server picked up the updated index without a restart.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = -1
    return status, (time.perf_counter() - t) * 1000


def load(url: str, queries: list[bytes], clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        nonlocal errors
        i = c
        while time.monotonic() < stop:
            status, ms = post(url, queries[i % len(queries)])
            i += clients
            with lock:
                lat.append(ms)
                errors += status != 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / wall, "p50": statistics.median(lat),
            "p95": lat[int(0.95 * (len(lat) - 1))], "p99": lat[int(0.99 * (len(lat) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "animals4"))
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--work", default=str(ROOT / "indexes" / ".bench-load"))
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    coll = work / "images"
    files = sorted(data.rglob("*.jpg"))
    for f in files:
        dst = coll / f.relative_to(data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), dst)
    index = work / "index"
    cbir = [sys.executable, "-m", "cbir"]
    subprocess.run([*cbir, "index", str(coll), "--out", str(index), "-q"], check=True)
    port = free_port()
    server = subprocess.Popen([*cbir, "serve", str(index), "--port", str(port), "--threads", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/api/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        queries = [p.read_bytes() for p in files[::23][:64]]
        url = base + "/api/search?k=10"
        rows.append(("steady", load(url, queries, args.clients, args.seconds), ""))
        # change 100 files: replace symlinks by re-encoded, resized copies
        for p in sorted(coll.rglob("*.jpg"))[::16][:100]:
            im = Image.open(p).convert("RGB")
            buf = io.BytesIO()
            im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(buf, "JPEG", quality=80)
            p.unlink()
            p.write_bytes(buf.getvalue())
        result: dict = {}

        def update() -> None:
            t = time.perf_counter()
            proc = subprocess.run([*cbir, "index", str(coll), "--out", str(index), "--update", "-q"],
                                  capture_output=True, text=True)
            result["seconds"] = time.perf_counter() - t
            result["out"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]

        updater = threading.Thread(target=update)
        updater.start()
        during = load(url, queries, args.clients, args.seconds)
        updater.join()
        rows.append(("during --update", during, f"update took {result['seconds']:.1f} s: {result['out']}"))
        time.sleep(1.5)
        with urllib.request.urlopen(base + "/api/indexes", timeout=10) as r:
            created_after = json.loads(r.read())["indexes"][0]["created"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{len(files)} images, efficientnet_lite0, {args.clients} clients x {args.seconds:.0f} s per phase, "
          f"{os.cpu_count()} cores; served index after the update was created {created_after}")
    print("| phase | requests | errors | requests/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r, _ in rows:
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | "
              f"{r['p99']:.0f} |")
    for name, _, note in rows:
        if note:
            print(f"{name}: {note}")


if __name__ == "__main__":
    main()

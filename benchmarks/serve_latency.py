"""Upload-to-JSON latency of `cbir serve` on 127.0.0.1 with a 10,000-image efficientnet_lite0 index.

    python benchmarks/serve_latency.py [--data ../shared/data/animals4] [--images 10000]

The collection is the data set repeated (symlinked copies) until it has --images files, indexed once into
indexes/bench-serve-<N> (reused on later runs). Then `cbir serve` runs as its own process and clients POST
real JPEGs to /api/search: first one client, then 8 concurrent clients. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_collection(data: Path, target: Path, n: int) -> Path:
    files = sorted(p for p in data.rglob("*.jpg"))
    if target.exists():
        return target
    target.mkdir(parents=True)
    made, copy = 0, 0
    while made < n:
        for f in files:
            if made >= n:
                break
            dst = target / f"copy{copy}" / f.relative_to(data)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), dst)
            made += 1
        copy += 1
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            json.loads(resp.read())
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = -1
    return status, (time.perf_counter() - t) * 1000


def run_clients(url: str, queries: list[bytes], clients: int, per_client: int, budget_s: float) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + budget_s

    def client(c: int) -> None:
        nonlocal errors
        for i in range(per_client):
            if time.monotonic() > deadline:
                return
            status, ms = post(url, queries[(c * per_client + i) % len(queries)])
            with lock:
                lat.append(ms)
                errors += status != 200

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat.sort()
    return {"clients": clients, "requests": len(lat), "errors": errors, "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "rps": len(lat) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "animals4"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=100, help="per phase")
    args = ap.parse_args()
    data = Path(args.data)
    coll = make_collection(data, ROOT / "indexes" / f".bench-serve-images-{args.images}", args.images)
    index = ROOT / "indexes" / f"bench-serve-{args.images}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not (index / "vectors.h5").exists():
        print(f"indexing {args.images} images once into {index} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "cbir", "index", str(coll), "--out", str(index), "-q"], check=True,
                       env=env)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cbir", "serve", str(index), "--port", str(port),
                               "--threads", "8"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(base + "/api/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not start")
        queries = [p.read_bytes() for p in sorted(data.rglob("*.jpg"))[::17][:64]]
        url = base + "/api/search?k=10"
        for q in queries[:5]:  # warm-up
            post(url, q)
        one = run_clients(url, queries, 1, args.requests, budget_s=120)
        eight = run_clients(url, queries, 8, max(1, args.requests // 8 * 2), budget_s=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"index: {health['images']} vectors (efficientnet_lite0, 1280-d), machine: {os.cpu_count()} cores")
    print("| clients | requests | errors | p50 ms | p95 ms | requests/s |")
    print("|---|---|---|---|---|---|")
    for row in (one, eight):
        print(f"| {row['clients']} | {row['requests']} | {row['errors']} | {row['p50']:.1f} | {row['p95']:.1f} | "
              f"{row['rps']:.1f} |")


if __name__ == "__main__":
    main()

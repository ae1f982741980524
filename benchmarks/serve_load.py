"""Load on `cbir serve` (127.0.0.1 only), in one of three modes.

    python benchmarks/serve_load.py [--data ../shared/data/animals4] [--seconds 60] [--clients 8]
    python benchmarks/serve_load.py --mode batching [--seconds 20] [--repeats 3]
    python benchmarks/serve_load.py --mode drift [--minutes 10]

update (default): 8 concurrent clients for 60 s, then again while `cbir index --update` rewrites the served index
(100 files changed); requests, errors, throughput and latency percentiles per phase, the update's own duration, and
whether the server picked up the updated index without a restart.

batching: two servers of the same index, batched query embeddings (`--max-batch 16`) and one at a time
(`--max-batch 1`); 8 clients against each in turn, repeated with the order alternated so that a busy moment of a
shared machine hits both (medians of the repeats, and their ratios); then one client alternating single requests
between the two (each server's percentiles, and the median of the per-pair latency ratios).

drift: one batched server under 8 clients for --minutes, a row per minute with its p95 and the server's resident
memory (VmRSS), to see whether either creeps up.
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
    return summary(lat, time.perf_counter() - t0, errors)


def start_server(index: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`cbir serve INDEX` as its own process on a free port, once it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cbir", "serve", str(index), "--port", str(port), "--threads",
                               "8", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(base + "/api/health", timeout=2).read()
            return server, base
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("the server did not start")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(args: argparse.Namespace) -> tuple[Path, Path, list[Path]]:
    """The collection (symlinks into --data) indexed with the default encoder; (collection, index, files). The
    batching and drift modes reuse the index a previous run of theirs left (the update mode changes its files)."""
    data, work = Path(args.data), Path(args.work)
    coll, index, files = work / "images", work / "index", sorted(data.rglob("*.jpg"))
    if args.mode != "update" and (index / "manifest.json").is_file():
        return coll, index, files
    shutil.rmtree(work, ignore_errors=True)
    for f in files:
        dst = coll / f.relative_to(data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), dst)
    precision = ["--precision", args.precision] if args.precision else []
    subprocess.run([sys.executable, "-m", "cbir", "index", str(coll), "--out", str(index), "-q", *precision],
                   check=True)
    return coll, index, files


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/api/health", timeout=10) as r:
        return json.loads(r.read())


def summary(lat: list[float], wall: float, errors: int) -> dict:
    lat = sorted(lat)
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / wall, "p50": statistics.median(lat),
            "p95": lat[int(0.95 * (len(lat) - 1))], "p99": lat[int(0.99 * (len(lat) - 1))]}


def one_client_paired(urls: dict[str, str], queries: list[bytes], seconds: float) -> tuple[dict, float]:
    """One client alternating single requests between the servers (the order flipped every pair), so a busy moment
    of a shared machine hits both alike; per server its summary, and the median of the per-pair latency ratios."""
    lat: dict[str, list[float]] = {m: [] for m in urls}
    errors = dict.fromkeys(urls, 0)
    ratios, stop, i = [], time.monotonic() + seconds, 0
    modes = list(urls)
    while time.monotonic() < stop:
        pair = {}
        for mode in modes if i % 2 == 0 else modes[::-1]:
            status, ms = post(urls[mode], queries[i % len(queries)])
            pair[mode] = ms
            lat[mode].append(ms)
            errors[mode] += status != 200
        ratios.append(pair[modes[0]] / pair[modes[1]])
        i += 1
    return ({m: summary(lat[m], sum(lat[m]) / 1000, errors[m]) for m in urls}, statistics.median(ratios))


def batching(args: argparse.Namespace, index: Path, queries: list[bytes]) -> None:
    servers = {"batched": start_server(index, "--max-batch", "16"), "one by one": start_server(index, "--max-batch",
                                                                                                 "1")}
    urls = {mode: base + "/api/search?k=10" for mode, (_, base) in servers.items()}
    runs: dict[str, list[dict]] = {m: [] for m in servers}
    try:
        for url in urls.values():  # warm up: the first batches of each size choose their kernels
            load(url, queries, args.clients, 5)
        for r in range(args.repeats):
            for mode in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                runs[mode].append(load(urls[mode], queries, args.clients, args.seconds))
        single, ratio = one_client_paired(urls, queries, args.seconds * args.repeats)
        stats = health(servers["batched"][1])["batching"]
    finally:
        for server, _ in servers.values():
            stop(server)
    print(f"{len(queries)} query photos, efficientnet_lite0 ({args.precision or 'auto'}), {os.cpu_count()} cores; "
          f"{args.clients} clients: {args.repeats} alternating runs of {args.seconds:.0f} s per server, medians of "
          f"the runs; 1 client: {args.seconds * args.repeats:.0f} s of single requests alternating between them")
    print("| clients | server | requests | errors | requests/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p95", "p99")} for m, rs in runs.items()}
    for mode, rs in runs.items():
        m = med[mode]
        print(f"| {args.clients} | {mode} | {sum(r['requests'] for r in rs)} | {sum(r['errors'] for r in rs)} | "
              f"{m['rps']:.1f} | {m['p50']:.1f} | {m['p95']:.1f} | {m['p99']:.1f} |")
    for mode, m in single.items():
        print(f"| 1 | {mode} | {m['requests']} | {m['errors']} | {m['rps']:.1f} | {m['p50']:.1f} | {m['p95']:.1f} | "
              f"{m['p99']:.1f} |")
    on, off = med["batched"], med["one by one"]
    print(f"{args.clients} clients, batched / one by one: requests/s x{on['rps'] / off['rps']:.2f}, p50 "
          f"x{on['p50'] / off['p50']:.2f}, p95 x{on['p95'] / off['p95']:.2f}")
    print(f"1 client, batched / one by one: p50 x{single['batched']['p50'] / single['one by one']['p50']:.3f}, "
          f"median of the paired ratios x{ratio:.3f}")
    print(f"batched server: {stats['jobs']} embeddings in {stats['batches']} batches "
          f"(mean {stats['jobs'] / max(1, stats['batches']):.2f}), {stats['waits']} waited for a decoding request")


def drift(args: argparse.Namespace, index: Path, queries: list[bytes]) -> None:
    server, base = start_server(index, "--max-batch", "16")
    rows = []
    try:
        load(base + "/api/search?k=10", queries, args.clients, 5)
        for minute in range(1, int(args.minutes) + 1):
            r = load(base + "/api/search?k=10", queries, args.clients, 60)
            rows.append((minute, r, rss_mb(server.pid)))
    finally:
        stop(server)
    print(f"{args.clients} clients against one batched server for {len(rows)} minutes, {os.cpu_count()} cores")
    print("| minute | requests | errors | requests/s | p50 ms | p95 ms | server RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for minute, r, rss in rows:
        print(f"| {minute} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
              f"{rss:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["update", "batching", "drift"], default="update")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "animals4"))
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="batching: alternating repeats per mode")
    ap.add_argument("--minutes", type=float, default=10, help="drift: how long")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="the index's (and so the queries') numeric mode; "
                    "default: what --precision auto chooses on this machine")
    ap.add_argument("--work", default=str(ROOT / "indexes" / ".bench-load"))
    args = ap.parse_args()
    if args.mode != "update":  # a drift run in the background keeps its own folder
        args.work += f"-{args.mode}" + (f"-{args.precision}" if args.precision else "")
    coll, index, files = prepare(args)
    queries = [p.read_bytes() for p in files[::23][:64]]
    if args.mode == "batching":
        batching(args, index, queries)
    elif args.mode == "drift":
        drift(args, index, queries)
    else:
        update_phases(args, coll, index, files, queries)


def update_phases(args: argparse.Namespace, coll: Path, index: Path, files: list[Path], queries: list[bytes]) -> None:
    cbir = [sys.executable, "-m", "cbir"]
    server, base = start_server(index)
    rows = []
    try:
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
        stop(server)
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

"""What a change costs in a live index: commits on a 1,000,000-row index, uploads through the write API, and searches
while images are added.

    python benchmarks/update_cost.py commit [--rows 1000000] [--dim 1280] [--changed 100] [--work /tmp/u]
    python benchmarks/update_cost.py api --data ../shared/data/animals4 [--uploads 60] [--work /tmp/u]
    python benchmarks/update_cost.py load --data ../shared/data/animals4 [--seconds 60] [--clients 8] [--rate 5]

commit: a 1M-row in-memory index of synthetic clustered vectors (benchmarks/scale.py's generator) written through
the product's segment writer (one segment, IVF tuned to recall@10 >= 0.99), then `--changed` rows changed: deleted
and written again as a new segment, committed, merge policy run (what `cbir index --update` writes). The first
build is what every update cost before segments (the whole file written again and IVF trained and tuned again).
api: `cbir serve --writable` (its own process, 127.0.0.1) over an index of --data; each POST /api/images returns
when the image is committed, i.e. searchable: its latency, p50 and p95, and a search that finds it.
load: --clients threads POST search queries for --seconds, first alone, then while one more client uploads --rate
images a second: errors, answers per second, search p50/p95 in each phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import Generator  # noqa: E402
from serve_latency import free_port, post  # noqa: E402


def commit_cost(args: argparse.Namespace) -> None:
    from cbir.search import manifest as manifest_mod
    from cbir.search import policy
    from cbir.search.manifest import Manifest, Settings
    from cbir.search.writer import IndexWriter, RowBlock

    out = args.work / "commit"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    gen = Generator(args.dim)
    config = {"name": "synthetic", "dim": args.dim, "pooling": "none", "weights": {"source": "none", "sha256": ""}}
    settings = Settings(encoder=config, root=str(out), index_type="auto")

    def block(ids: np.ndarray, stream: int) -> RowBlock:
        n = len(ids)
        if stream:  # changed rows: new vectors for scattered ids
            x = np.concatenate([gen.rows(int(a), int(a) + 1, stream=stream) for a in ids])
        else:
            x = gen.rows(int(ids[0]), int(ids[-1]) + 1)
        return RowBlock(ids=ids, paths=[f"{i:09d}.jpg" for i in ids], vectors=x, mtime_ns=np.zeros(n, np.int64),
                        size=np.zeros(n, np.int64), sha256=[""] * n)

    started = time.perf_counter()
    writer = IndexWriter(out, Manifest(generation=0, settings=settings))
    ids = writer.new_ids(args.rows)
    writer.add_segment(args.rows, (block(ids[a:a + 100_000], 0) for a in range(0, args.rows, 100_000)))
    writer.commit(created="bench")
    first = time.perf_counter() - started
    rng = np.random.default_rng(0)
    took = []
    for r in range(args.repeats):
        changed = np.sort(rng.choice(args.rows, size=args.changed, replace=False)).astype(np.int64)
        started = time.perf_counter()
        writer = IndexWriter(out, manifest_mod.load(out))
        writer.delete(changed)
        writer.add_segment(len(changed), [block(changed, r + 1)])  # the same ids: changed files keep theirs
        policy.merge_small(out, writer.commit())
        took.append(time.perf_counter() - started)
    manifest = manifest_mod.load(out)
    print(f"| {args.rows:,} rows x {args.dim} | first build (what each update cost before) | {first:.1f} s |")
    print(f"| commit {args.changed} changed rows (delete + new segment + commit + merge policy), median of "
          f"{args.repeats} | {statistics.median(took):.2f} s | max {max(took):.2f} s |")
    print(f"| after: {len(manifest.segments)} segments, {manifest.deleted} deleted rows | | |")


def _serve(index: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cbir", "serve", str(index), "--port", str(port), "--writable", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # "serving ..." once it listens
    return proc


def _index_of(args: argparse.Namespace) -> Path:
    from cbir import Index

    data = args.work / "photos"
    if not data.exists():
        data.mkdir(parents=True)
        for f in sorted(Path(args.data).rglob("*.jpg"))[:: 2][: args.images]:
            (data / f.parent.name).mkdir(exist_ok=True)
            (data / f.parent.name / f.name).write_bytes(f.read_bytes())
    index = args.work / "index"
    if not (index / "manifest.json").exists():
        Index.build(data, out=index, device="cpu")
    return index


def api_cost(args: argparse.Namespace) -> None:
    index = _index_of(args)
    uploads = sorted(Path(args.data).rglob("*.jpg"))[1::2][: args.uploads]
    port = free_port()
    proc = _serve(index, port)
    try:
        url = f"http://127.0.0.1:{port}"
        took, found = [], 0
        for f in uploads:
            status, ms = post(f"{url}/api/images", f.read_bytes())
            assert status in (200, 201), status
            took.append(ms)
            req = urllib.request.Request(f"{url}/api/search?k=1", data=f.read_bytes(),
                                         headers={"Content-Type": "image/jpeg"}, method="POST")
            with urllib.request.urlopen(req, timeout=60) as resp:
                top = json.loads(resp.read())["results"][0]
            found += top["path"].startswith("cbir-uploads/") and top["score"] > 0.999
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"| POST /api/images -> searchable, {len(took)} uploads one after another | p50 "
          f"{np.percentile(took, 50):.0f} ms | p95 {np.percentile(took, 95):.0f} ms | found first by search: "
          f"{found}/{len(took)} |")


def load_cost(args: argparse.Namespace) -> None:
    index = _index_of(args)
    queries = [f.read_bytes() for f in sorted(Path(args.data).rglob("*.jpg"))[::7][:64]]
    uploads = [f.read_bytes() for f in sorted(Path(args.data).rglob("*.jpg"))[1::2][args.uploads:]]
    port = free_port()
    proc = _serve(index, port)
    url = f"http://127.0.0.1:{port}"
    try:
        alone = _phase(url, queries, args, uploads=None)
        writing = _phase(url, queries, args, uploads=uploads)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for name, (lat, errors, added, seconds) in (("searches alone", alone), ("while adding", writing)):
        print(f"| {args.clients} clients x {args.seconds:.0f} s, {name} | {len(lat)} answers, {errors} errors, "
              f"{len(lat) / seconds:.1f}/s | p50 {np.percentile(lat, 50):.0f} ms | p95 {np.percentile(lat, 95):.0f} ms "
              f"| {added} images added |")
    ratio = np.percentile(writing[0], 95) / np.percentile(alone[0], 95)
    print(f"| search p95 while adding / alone | {ratio:.2f}x | | |")


def _phase(url: str, queries: list[bytes], args: argparse.Namespace,
           uploads: list[bytes] | None) -> tuple[list[float], int, int, float]:
    lat: list[float] = []
    errors = [0]
    added = [0]
    stop = time.monotonic() + args.seconds

    def client(seed: int) -> None:
        i = seed
        while time.monotonic() < stop:
            status, ms = post(f"{url}/api/search?k=10", queries[i % len(queries)])
            i += 1
            if status == 200:
                lat.append(ms)
            else:
                errors[0] += 1

    def upload(body: bytes) -> None:
        status, _ = post(f"{url}/api/images", body)
        if status in (200, 201):
            added[0] += 1
        else:
            errors[0] += 1

    def writer() -> None:
        """Uploads started on a schedule (--rate a second), each in its own thread: the offered rate does not fall
        when one upload takes longer than 1 / rate (a closed loop reached 3/s of the 5 asked)."""
        assert uploads is not None
        started, pending = time.monotonic(), []
        for n, body in enumerate(uploads):
            due = started + n / args.rate
            if due >= stop:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            pending.append(threading.Thread(target=upload, args=(body,)))
            pending[-1].start()
        for t in pending:
            t.join()

    threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
    if uploads is not None:
        threads.append(threading.Thread(target=writer))
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors[0], added[0], time.monotonic() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["commit", "api", "load"])
    p.add_argument("--work", type=Path, default=Path("/tmp/cbir-update-cost"))
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--changed", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "animals4"))
    p.add_argument("--images", type=int, default=800, help="api/load: photos in the served index")
    p.add_argument("--uploads", type=int, default=60)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rate", type=float, default=5.0, help="load: images added per second")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    {"commit": commit_cost, "api": api_cost, "load": load_cost}[args.what](args)


if __name__ == "__main__":
    main()

"""An index larger than RAM: N clustered 1280-d vectors written shard by shard, built on disk, served from disk.

    python benchmarks/scale.py --n 10000000 --out /data/cbir-scale      # ~26 GB of vectors, ~25 min on 2 cores
    python benchmarks/scale.py --out /data/cbir-scale --reuse --updates 20 --update-rows 10000
    python benchmarks/scale.py --engines PHOTOS [--repeats 3]           # --engine ray against local, same photos

Writes a real index folder (a segment of float16 rows, its on-disk IVF-PQ + .ivfdata, the manifest) through the
product's own segment writer (`IndexWriter.add_segment`: rows streamed block by block, then `ondisk.build_index`:
train on a sample, fill shards, merge into on-disk lists, tune nprobe/k_factor to recall@10 >= 0.95 on held-out
rows). Then a fresh process opens it with `Index.open` and answers 1,000 fresh queries one at a time; recall@10 is
against an exact scan of every live row. `--updates N` then commits N updates of --update-rows new rows each (new
segments encoded with the first segment's trained index; the merge policy runs after each) and measures again.

The vectors: a 64-d Gaussian mixture (1,000 clusters) mapped into 1280-d plus isotropic noise, L2-normalised:
clustered like image embeddings, whose intrinsic dimension is far below their width. No images are decoded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbir.search import manifest as manifest_mod  # noqa: E402
from cbir.search import ondisk, policy  # noqa: E402
from cbir.search.manifest import Manifest, Settings  # noqa: E402
from cbir.search.plan import exact_top  # noqa: E402
from cbir.search.writer import IndexWriter, RowBlock  # noqa: E402

LATENT, CLUSTERS = 64, 1000


class Generator:
    """Deterministic clustered vectors: rows [start, stop) are the same whatever the shard size."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
        self.mix = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)

    def rows(self, start: int, stop: int, stream: int = 0) -> np.ndarray:
        rng = np.random.default_rng([stream, start])
        n = stop - start
        z = self.centres[rng.integers(0, CLUSTERS, n)] + 0.6 * rng.standard_normal((n, LATENT), dtype=np.float32)
        x = z @ self.mix + 0.25 * rng.standard_normal((n, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def _settings(out: Path, dim: int) -> Settings:
    config = {"name": "synthetic", "dim": dim, "pooling": "none", "weights": {"source": "none", "sha256": ""}}
    return Settings(encoder=config, root=str(out), index_type="ivfpq", vector_dtype="float16", on_disk=True)


def _blocks(gen: Generator, start: int, stop: int, shard: int, stream: int = 0):
    for a in range(start, stop, shard):
        b = min(stop, a + shard)
        zeros = np.zeros(b - a, np.int64)
        yield RowBlock(ids=np.arange(a, b), paths=[f"shard-{a // shard:05d}/{i:09d}.jpg" for i in range(a, b)],
                       vectors=gen.rows(a, b, stream=stream).astype(np.float16), mtime_ns=zeros, size=zeros,
                       sha256=[""] * (b - a))
        logging.info(f"written {b - start:,} of {stop - start:,} rows")


def write(out: Path, n: int, dim: int, shard: int) -> float:
    """The first segment: rows streamed through the segment writer, then its on-disk index built and tuned."""
    started = time.perf_counter()
    base = Manifest(generation=0, settings=_settings(out, dim))
    writer = IndexWriter(out, base)
    writer.new_ids(n)
    writer.add_segment(n, _blocks(Generator(dim), 0, n, shard))
    writer.commit(created="bench")
    return time.perf_counter() - started


def update(out: Path, rows: int, dim: int, stream: int) -> float:
    """One update: `rows` new rows as a new segment, committed, merge policy run (as cbir index --update does)."""
    started = time.perf_counter()
    writer = IndexWriter(out, manifest_mod.load(out))
    first = int(writer.new_ids(rows)[0])
    writer.add_segment(rows, _blocks(Generator(dim), first, first + rows, rows, stream=stream))
    policy.merge_small(out, writer.commit())
    return time.perf_counter() - started


def serve(out: Path, n_queries: int, dim: int) -> dict:
    """Run in a fresh process: open the index, answer queries one at a time, report time and memory."""
    from cbir.index import Index

    started = time.perf_counter()
    index = Index.open(out)
    open_s = time.perf_counter() - started
    rss_open = _rss_anon()
    queries = Generator(dim).rows(0, n_queries, stream=10**6)
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        results = index.search_vector(q, 10)
        times.append(time.perf_counter() - t)
        found.append([r.id for r in results])
    paths_ok = all(index.path_of(i).endswith(f"{i:09d}.jpg") for i in found[0])
    return {"open_s": open_s, "rss_anon_open_mb": rss_open, "rss_anon_mb": _rss_anon(),
            "p50_ms": 1000 * float(np.median(times)), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "found": found, "paths_ok": paths_ok, "plan": index.generation.segments[0].search.plan.describe(),
            "segments": len(index.generation.segments), "rows": len(index)}


def exact_ids(out: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k ids over every live row of every segment (scanned from disk, block by block)."""
    from cbir.search.segments import Generation

    gen = Generation.open(out)
    scores, ids = [], []
    for seg in gen.segments:
        vectors = seg.store.vectors
        assert vectors is not None
        top = exact_top(vectors, queries, k)
        part = np.asarray(vectors[np.unique(top)], np.float32)
        rows = np.unique(top)
        sims = queries @ part.T
        pos = np.searchsorted(rows, top)
        scores.append(np.take_along_axis(sims, pos, 1))
        ids.append(np.asarray(seg.store.ids)[top])
    s, i = np.hstack(scores), np.hstack(ids)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(i, order, 1)


def measure(out: Path, args: argparse.Namespace) -> tuple[dict, float, float]:
    """Serve in a fresh process (page cache dropped is not possible here: sync only), then recall@10 vs exact."""
    os.system("sync")
    cmd = [sys.executable, __file__, "--serve", "--out", str(out), "--queries", str(args.queries), "--dim",
           str(args.dim)]
    served = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    started = time.perf_counter()
    truth = exact_ids(out, Generator(args.dim).rows(0, args.queries, stream=10**6), 10)
    exact_s = time.perf_counter() - started
    found = np.array([f + [-1] * (10 - len(f)) for f in served["found"]])
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), found.tolist(), strict=True)]))
    return served, recall, exact_s


def engines(photos: Path, repeats: int, work: Path) -> None:
    """`cbir index PHOTOS --rebuild` with --engine local and --engine ray (a local Ray cluster started by the run),
    alternating, as fresh processes; images/s as the run reports it, and wall time of the whole command."""
    import re
    from statistics import median

    rates: dict[str, list[float]] = {"local": [], "ray": []}
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    steady: list[float] = []
    for _ in range(repeats):
        for engine in ("local", "ray"):
            cmd = [sys.executable, "-m", "cbir", "index", str(photos), "--out", str(work / engine), "--rebuild", "-q",
                   "--engine", engine]
            started = time.perf_counter()
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_no_ray_address())
            walls[engine].append(time.perf_counter() - started)
            rates[engine].append(float(re.search(r"\(([\d.]+) images/s\)", done.stdout).group(1)))
            running = re.search(r"then ([\d.]+) images/s", done.stderr)
            if running:
                steady.append(float(running.group(1)))
            logging.info(f"{engine}: {rates[engine][-1]:.1f} images/s, {walls[engine][-1]:.1f} s wall")
    print(f"{'engine':<8} {'images/s (median)':>18} {'wall s (median)':>16}")
    for engine in rates:
        print(f"{engine:<8} {median(rates[engine]):>18.1f} {median(walls[engine]):>16.1f}")
    print(f"ray / local images/s: {median(rates['ray']) / median(rates['local']):.2f}   "
          f"wall local / ray: {median(walls['local']) / median(walls['ray']):.2f}   ({repeats} runs each, alternating)")
    if steady:
        print(f"ray once its workers run: {median(steady):.1f} images/s = {median(steady) / median(rates['local']):.2f}"
              " x local (the rest is start-up: cluster, worker processes, models)")


def _no_ray_address() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _rss_anon() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--shard", type=int, default=ondisk.SHARD_ROWS)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("/tmp/cbir-scale"))
    p.add_argument("--reuse", action="store_true", help="keep an index built before at --out")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engines", type=Path, metavar="PHOTOS", help="compare --engine ray with local on PHOTOS")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--updates", type=int, default=0, help="then commit this many updates and measure again")
    p.add_argument("--update-rows", type=int, default=10_000)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.engines:
        engines(args.engines, args.repeats, args.out)
        return
    if args.serve:
        print(json.dumps(serve(args.out, args.queries, args.dim)))
        return
    write_s = 0.0
    if not args.reuse:
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        write_s = write(args.out, args.n, args.dim, args.shard)
    disk = {f.name: f.stat().st_size for f in args.out.iterdir() if f.is_file()}
    served, recall, exact_s = measure(args.out, args)
    rows = [("vectors", f"{served['rows']:,} x {args.dim} (float16 on disk)"),
            ("write the segment and build its on-disk IVF-PQ (train, fill shards, merge, tune)", f"{write_s:.0f} s"),
            ("size on disk", ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(disk.items()))),
            ("search plan", served["plan"]),
            ("Index.open, fresh process", f"{served['open_s']:.2f} s"),
            ("RssAnon after open / after queries",
             f"{served['rss_anon_open_mb']:.0f} / {served['rss_anon_mb']:.0f} MB"),
            ("single query p50 / p95", f"{served['p50_ms']:.1f} / {served['p95_ms']:.1f} ms"),
            (f"recall@10 vs exact ({args.queries} fresh queries)", f"{recall:.4f}"),
            ("paths looked up by id", "ok" if served["paths_ok"] else "WRONG"),
            ("exact scan for the truth", f"{exact_s:.0f} s")]
    if args.updates:
        took = [update(args.out, args.update_rows, args.dim, stream=u + 1) for u in range(args.updates)]
        after, recall_after, _ = measure(args.out, args)
        rows += [(f"{args.updates} updates of {args.update_rows:,} rows: seconds each (median / max)",
                  f"{np.median(took):.1f} / {max(took):.1f} s"),
                 ("after the updates: rows, segments", f"{after['rows']:,}, {after['segments']}"),
                 ("after: single query p50 / p95", f"{after['p50_ms']:.1f} / {after['p95_ms']:.1f} ms "
                  f"({after['p50_ms'] / served['p50_ms']:.2f}x the fresh build's p50)"),
                 ("after: recall@10 vs exact", f"{recall_after:.4f} (fresh build {recall:.4f})")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()

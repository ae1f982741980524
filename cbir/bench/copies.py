"""`cbir bench --task copies DIR`: can each encoder find the original from an edited copy? No labels needed.

A seeded sample of the collection's pictures is edited every way in `edits.EDITS`; each edited copy is a query
(not indexed). The report gives, per encoder and per kind of edit, recall@1 and @10 of the source from the global
vectors alone and with verified copies ranked first (cbir/copies.py), the cosine of copy to source, and a grid of
the misses. It is the label-free way to choose an encoder on one's own photos.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbir.bench.report import thumb_url
from cbir.copies import FeatureCache, rank_copies_first
from cbir.edits import EDITS
from cbir.errors import CbirError
from cbir.images import load_image
from cbir.index import Index

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CopiesConfig:
    dataset: str
    out: str
    encoders: str = "efficientnet_lite0"
    sources: int = 100
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def run_copies(cfg: CopiesConfig) -> dict[str, Any]:
    from indexer import BuildOptions, build

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"task": "copies", "dataset": str(Path(cfg.dataset).resolve()), "seed": cfg.seed,
                              "edits": list(EDITS), "encoders": {}}
    for name in [e.strip() for e in cfg.encoders.split(",") if e.strip()]:
        idx_dir = out / "indexes" / name.replace("/", "_")
        shutil.rmtree(idx_dir, ignore_errors=True)
        log.info(f"{name}: indexing {cfg.dataset}")
        summary = build(cfg.dataset, idx_dir, BuildOptions(encoder=name, precision="fp32", device=cfg.device,
                                                           mode="rebuild", progress=cfg.progress))
        index = Index.open(idx_dir, device=cfg.device, encoder=summary.encoder)
        report["encoders"][name] = _measure(index, cfg, out / "misses" / name)
        report["images"] = len(index)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(_html(report))
    return report


def _sample(index: Index, n: int, seed: int) -> list[int]:
    if len(index) < 2:
        raise CbirError("the copies benchmark needs at least two images")
    order = np.argsort(index.rows().paths)  # the same pictures whatever the encoder
    picks = np.random.default_rng(seed).choice(len(order), size=min(n, len(order)), replace=False)
    return [int(index.rows().ids[order[p]]) for p in sorted(picks)]


def _measure(index: Index, cfg: CopiesConfig, misses_dir: Path) -> dict[str, Any]:
    cache = FeatureCache()
    rows: dict[str, dict[str, list[float]]] = {kind: {"r1": [], "r10": [], "v1": [], "v10": [], "cos": []}
                                               for kind in EDITS}
    misses: list[dict[str, Any]] = []
    sources = _sample(index, cfg.sources, cfg.seed)
    for n, src in enumerate(sources, 1):
        original = load_image(index.file_of(src))
        for kind, edit in EDITS.items():
            query = edit(original)
            vector = index.embed(query)  # once: the plain search, the verified one and the cosine share it
            found = [r.id for r in index.search_vector(vector, k=10)]
            ranked = [r.id for r, _ in rank_copies_first(index, query, k=10, cache=cache, vector=vector)]
            row = rows[kind]
            row["r1"].append(_same_picture(index, cache, src, found[0]))
            row["r10"].append(src in found)
            row["v1"].append(_same_picture(index, cache, src, ranked[0]))
            row["v10"].append(src in ranked)
            row["cos"].append(float(np.dot(vector, index.vector_of(src))))
            if not row["v1"][-1]:
                misses.append(_miss(index, kind, src, query, ranked, misses_dir))
        if n % 10 == 0:
            log.info(f"copies: {n}/{len(sources)} sources")
    per_kind = {kind: {"recall_at_1": float(np.mean(r["r1"])), "recall_at_10": float(np.mean(r["r10"])),
                       "verified_recall_at_1": float(np.mean(r["v1"])),
                       "verified_recall_at_10": float(np.mean(r["v10"])),
                       "cosine_min": float(np.min(r["cos"])), "cosine_p5": float(np.percentile(r["cos"], 5))}
                for kind, r in rows.items()}
    return {"sources": len(sources), "queries": len(sources) * len(EDITS), "per_kind": per_kind, "misses": misses}


def _same_picture(index: Index, cache: FeatureCache, src: int, found: int) -> bool:
    """The source itself, or a picture of the collection that is the same content: byte-identical, or verified as
    a copy of the source (a data set can hold one photo several times; any of them is a right answer)."""
    if found == src:
        return True
    a, b = index.generation.column("sha256", [src, found])
    if a and a == b:
        return True
    return cache.compare(index.file_of(src), index.file_of(found)).verified


def _miss(index: Index, kind: str, src: int, query: Image.Image, ranked: list[int], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{len(list(folder.glob('*.jpg'))):04d}.jpg"
    query.convert("RGB").save(path, quality=85)
    return {"kind": kind, "source": index.path_of(src), "query_file": str(path),
            "top3": [index.path_of(i) for i in ranked[:3]]}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# cbir bench: copies ({report['dataset']}, {report.get('images', 0)} images)", "",
             "Recall of the source from an edited copy: global vectors alone / with verified copies ranked first. "
             "At rank 1 the source or the same picture counts (a byte-identical file, or one verified as a copy of "
             "the source).", ""]
    for name, r in report["encoders"].items():
        lines += [f"## {name} ({r['sources']} sources, {r['queries']} queries)", "",
                  "| edit | R@1 | R@10 | R@1 verified | R@10 verified | cosine to source, min / 5th pct |",
                  "|---|---|---|---|---|---|"]
        for kind, k in r["per_kind"].items():
            lines.append(f"| {kind} | {k['recall_at_1']:.3f} | {k['recall_at_10']:.3f} | "
                         f"{k['verified_recall_at_1']:.3f} | {k['verified_recall_at_10']:.3f} | "
                         f"{k['cosine_min']:.3f} / {k['cosine_p5']:.3f} |")
        lines += ["", f"{len(r['misses'])} misses after verification (report.html shows them).", ""]
    return "\n".join(lines)


def _html(report: dict[str, Any]) -> str:
    root = Path(report["dataset"])
    parts = ["<!doctype html><meta charset='utf-8'><title>cbir bench: copies</title><style>body{font:14px "
             "system-ui;margin:24px}img{width:96px;height:96px;object-fit:cover;margin:2px}.src{outline:3px solid "
             "#34a853}</style>", f"<pre>{html.escape(markdown(report))}</pre><h2>Misses</h2>"]
    for name, r in report["encoders"].items():
        for m in r["misses"]:
            query = Path(m["query_file"])
            cells = [f"<img src='{thumb_url(query.parent, query.name)}' title='query'>"]
            cells += [f"<img class='{'src' if p == m['source'] else ''}' src='{thumb_url(root, p)}' "
                      f"title='{html.escape(p)}'>" for p in m["top3"]]
            parts.append(f"<p>{html.escape(name)} · {html.escape(m['kind'])} · source {html.escape(m['source'])}"
                         f"<br>{''.join(cells)} <img class='src' src='{thumb_url(root, m['source'])}' "
                         "title='source'></p>")
    return "\n".join(parts)

"""`cbir bench`: every encoder on the same labelled collection, same split, same queries, one table.

Protocol: stratified seeded split; trainable encoders train on the train split and select on val; every
encoder indexes all images; queries are the test split (or every image with --queries all); the query
itself is excluded from its results. The colour-histogram and random-CNN baselines always run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir import metrics
from cbir.encoders import get_entry, split_weights
from cbir.errors import CbirError, WeightsUnavailable
from cbir.training.data import load_collection, stratified_split, write_split

BASELINES = ("colour_histogram", "random_cnn")
TRAINABLE = ("siamese", "autoencoder")
DEFAULT_ENCODERS = "efficientnet_lite0,resnet50,vgg16,siamese,autoencoder"
log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BenchConfig:
    dataset: str
    out: str
    encoders: str = DEFAULT_ENCODERS
    ks: tuple[int, ...] = (10, 20)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    queries: str = "test"
    device: str = "auto"
    labels: str = "auto"
    train_epochs: int | None = None
    progress: bool = True
    presets: str = ""  # comma-separated indexer presets (fast, balanced, best) to compare beside the encoders


def parse_encoders(text: str) -> list[tuple[str, str | None]]:
    """'resnet50:none,vgg16' -> [('resnet50', 'none'), ('vgg16', None)], baselines appended."""
    items: list[tuple[str, str | None]] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, weights = split_weights(part)  # 'resnet50:none', 'timm:convnext_tiny:FILE'
        get_entry(name)  # unknown names fail now, not after an hour
        items.append((name, weights))
    for b in BASELINES:
        if b not in [n for n, _ in items]:
            items.append((b, None))
    return items


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.queries not in ("test", "all"):
        raise CbirError("--queries must be test or all")
    ks = sorted(set(cfg.ks) | {10})
    coll = load_collection(cfg.dataset, cfg.labels)
    if coll.labels is None:
        raise CbirError("cbir bench needs labels: class sub-folders in DATASET, or --labels FILE.csv")
    split = stratified_split(coll, cfg.split, cfg.seed)
    write_split(out / "split.csv", coll, split)
    encoders = parse_encoders(cfg.encoders)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "dataset": str(Path(cfg.dataset).resolve()), "images": len(coll.files), "classes": len(set(coll.labels)),
        "protocol": {"split": list(cfg.split), "seed": cfg.seed, "queries": cfg.queries, "ks": ks,
                     "query_excluded_from_results": True,
                     "trainable_encoders": "train on the train split, model selected on val",
                     "gallery": "every image of the collection"},
        "machine": machine(), "encoders": {}, "skipped": {},
    }
    ctx = _Context(cfg=cfg, coll=coll, split=split, ks=ks, out=out)
    jobs: list[tuple[str, str | None, str | None]] = [(name, weights, None) for name, weights in encoders]
    jobs += [(f"preset {p}", None, p) for p in _presets(cfg.presets)]
    for n, (name, weights, preset) in enumerate(jobs, 1):
        tag = f"[{n}/{len(jobs)}] {name}"
        try:
            key, entry = _bench_preset(ctx, preset, tag) if preset else _bench_one(ctx, name, weights, tag)
        except WeightsUnavailable as exc:
            reason = f"{exc} (ask for '{name}:none' to run it with random weights, labelled as such)"
            report["skipped"][name] = reason
            log.info(f"{tag}: skipped: {reason}")
            continue
        report["encoders"][key] = entry
        elapsed = time.perf_counter() - started
        log.info(f"{tag}: P@10 {entry['precision_at_10']:.4f}  mAP {entry['mAP']:.4f}  "
                 f"({elapsed:.0f} s so far, about {elapsed / n * (len(jobs) - n):.0f} s to go)")
    report["seconds"] = round(time.perf_counter() - started, 1)
    from cbir.bench.report import write_reports

    write_reports(report, out, coll.root, ctx.label_of)
    return report


@dataclass(kw_only=True)
class _Context:
    cfg: BenchConfig
    coll: Any
    split: list[str]
    ks: list[int]
    out: Path

    @property
    def label_of(self) -> dict[str, str]:
        return dict(zip(self.coll.files, self.coll.labels, strict=True))

    @property
    def split_of(self) -> dict[str, str]:
        return dict(zip(self.coll.files, self.split, strict=True))


def _bench_one(ctx: _Context, name: str, weights: str | None, tag: str) -> tuple[str, dict[str, Any]]:
    """Train (if it is trainable), index the whole collection, evaluate: one row of the report."""
    from indexer import BuildOptions

    entry: dict[str, Any] = {}
    if name in TRAINABLE:
        log.info(f"{tag}: training on the train split")
        model, train_s = _train(name, ctx.cfg, ctx.coll, ctx.split, ctx.out)
        entry["training_seconds"] = round(train_s, 1)
        weights = str(model)
    # fp32, not 'auto': auto decides by timing, and a benchmark must give the same numbers for the same seed; no
    # local features: images/s is the encoder's speed, and this benchmark verifies no copies
    options = BuildOptions(encoder=name, weights=weights, precision="fp32", device=ctx.cfg.device, mode="rebuild",
                           progress=ctx.cfg.progress, local_features=False)
    entry.update(_index_and_evaluate(ctx, name, options, tag))
    random = entry["weights"] == "none"
    return (f"{name} (random weights)" if random and name not in BASELINES else name), entry


def _presets(text: str) -> list[str]:
    """The preset names of --presets, each checked before anything runs."""
    from indexer.options import preset_settings

    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        preset_settings(name)
    return names


def _bench_preset(ctx: _Context, preset: str, tag: str) -> tuple[str, dict[str, Any]]:
    """A measured configuration of `cbir index --preset` (encoder, expansion), evaluated through its expansion."""
    from indexer import BuildOptions
    from indexer.options import preset_settings

    options = BuildOptions(preset=preset, precision="fp32", device=ctx.cfg.device, mode="rebuild",
                           progress=ctx.cfg.progress, local_features=False)
    entry = _index_and_evaluate(ctx, f"preset-{preset}", options, tag)
    entry["preset"] = dict(preset_settings(preset))
    return f"preset {preset}", entry


def _index_and_evaluate(ctx: _Context, name: str, options: Any, tag: str) -> dict[str, Any]:
    from cbir.index import Index
    from indexer import build

    idx_dir = ctx.out / "indexes" / name
    shutil.rmtree(idx_dir, ignore_errors=True)
    log.info(f"{tag}: embedding {len(ctx.coll.files)} images")
    summary = build(ctx.cfg.dataset, idx_dir, options)
    enc = summary.encoder
    entry: dict[str, Any] = {"encoder": enc.name, "weights": enc.weights.get("source"), "dim": enc.dim,
                             "random_weights": enc.weights.get("source") == "none", "precision": enc.precision,
                             "embed_images_per_s": round(summary.images_per_s, 1)}
    t = time.perf_counter()
    index = Index.open(idx_dir, device=ctx.cfg.device, encoder=enc)
    entry["index_build_seconds"] = round(time.perf_counter() - t + summary.seconds, 2)
    entry["expansion"] = index.expansion.describe()
    entry.update(_evaluate(index, ctx.label_of, ctx.split_of, ctx.cfg.queries, ctx.ks,
                           ctx.out / "topk" / f"{name}.csv"))
    return entry


def _train(kind: str, cfg: BenchConfig, coll, split: list[str], out: Path) -> tuple[Path, float]:
    from cbir.training.trainer import TrainConfig, Trainer

    model = out / "models" / f"{kind}.pt"
    labels = "none" if kind == "autoencoder" else cfg.labels  # an autoencoder trains without labels, by definition
    tc = TrainConfig(kind=kind, data=cfg.dataset, out=str(model), labels=labels, seed=cfg.seed, device=cfg.device,
                     split=cfg.split, epochs=cfg.train_epochs, progress=cfg.progress, assignments=split)
    t = time.perf_counter()
    Trainer(tc).run()
    return model, time.perf_counter() - t


def _evaluate(index, label_of: dict[str, str], split_of: dict[str, str], queries: str, ks: list[int],
              topk_path: Path) -> dict[str, Any]:
    s = index.rows()
    paths = s.paths
    g_labels = np.array([label_of.get(p, "") for p in paths])
    q_pos = np.array([i for i, p in enumerate(paths) if queries == "all" or split_of.get(p) == "test"])
    if len(q_pos) == 0:
        raise CbirError("no queries: the test split is empty (use --queries all or a larger test fraction)")
    # queries as search asks them: the index's query expansion (if any), each query's own row left out
    queries = index.expand(s.vectors[q_pos], [(int(s.ids[q]),) for q in q_pos])
    ranking = metrics.rank(queries, s.vectors, q_pos)
    rel = metrics.relevance(ranking, g_labels[q_pos], g_labels)
    n_rel = np.array([(g_labels == g_labels[q]).sum() - 1 for q in q_pos])
    result = metrics.summarise(rel, n_rel, g_labels[q_pos], ks)
    result["queries"] = int(len(q_pos))
    # query latency through the real FAISS index, one query at a time
    lat = []
    for q in q_pos[: min(200, len(q_pos))]:
        t = time.perf_counter()
        index.search_vector(s.vectors[q], max(ks), exclude_ids=(int(s.ids[q]),))
        lat.append((time.perf_counter() - t) * 1000)
    result["query_ms_p50"] = round(float(np.percentile(lat, 50)), 3)
    result["query_ms_p95"] = round(float(np.percentile(lat, 95)), 3)
    topk_path.parent.mkdir(parents=True, exist_ok=True)
    depth = max(ks)
    with open(topk_path, "w", encoding="utf-8") as fh:
        fh.write("query,rank,result,score,similar\n")
        for qi, q in enumerate(q_pos):
            for r in range(min(depth, ranking.shape[1])):
                g = ranking[qi, r]
                score = float(s.vectors[q] @ s.vectors[g])
                fh.write(f"{json.dumps(paths[q])},{r + 1},{json.dumps(paths[g])},{score:.5f},{int(rel[qi, r])}\n")
    result["_ranking"] = (q_pos, ranking[:, :10], rel[:, :10], paths)
    return result

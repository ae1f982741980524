"""The `cbir` command. Each sub-command is a thin shell around the Python API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cbir.errors import CbirError

if TYPE_CHECKING:
    from cbir.index import Index


def _cmd_index(args: argparse.Namespace) -> int:
    from indexer import BuildOptions, build
    from indexer.options import mode_of

    options = BuildOptions(encoder=args.encoder, weights=args.weights, pooling=args.pooling, precision=args.precision,
                           device=args.device, mode=mode_of(update=args.update, rebuild=args.rebuild),
                           batch_size=args.batch_size, workers=args.workers, exclude=tuple(args.exclude),
                           verify=args.verify, index_type=args.index_type, float16=True if args.float16 else None,
                           qe=args.qe, dba=args.dba, preset=args.preset, progress=not args.quiet,
                           on_disk=True if args.on_disk else None, memory_budget=_bytes(args.memory_budget),
                           engine=args.engine, ray_address=args.ray_address, tags=args.tags,
                           model_kwargs=_json_object(args.model_kwargs, "--model-kwargs"),
                           local_features=not args.no_local_features)
    print(build(args.dir, args.out, options).describe())
    return 0


def _describe_preset(name: str) -> str:
    from indexer.options import DEFAULT_PRESET, PRESETS

    settings = PRESETS.get(name)
    if settings is None:
        return name
    default = ", the default" if name == DEFAULT_PRESET else ""
    return f"{name} ({settings['encoder']}, qe {settings['qe']}, dba {settings['dba']}{default})"


def _json_object(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise CbirError(f"{flag} takes a JSON object, e.g. '{{\"img_size\": 224}}', not {text!r}")
    return value


def _bytes(text: str | None) -> int | None:
    """'8G', '500M', '1.5T' or a number of bytes."""
    if text is None:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise CbirError(f"--memory-budget: not a size: {text!r} (try 8G or 500M)") from None


def _cmd_search(args: argparse.Namespace) -> int:
    from cbir.encoders._onnx_query import QUERY_MODES
    from cbir.index import Index

    if args.image is None and args.text is None:
        raise CbirError("give a query: an image file, --text 'a red bicycle', or both")
    index = Index.open(args.index, device=args.device, weights=args.weights)
    where = _where(args)
    started = time.perf_counter()
    results, evidence = _query(index, args, where)
    took = (time.perf_counter() - started) * 1000
    matched = len(index.matching(where)) if where else len(index)
    by_picture = args.image is not None and not args.no_prepare
    if by_picture and index.encoder_config.get("precision", "fp32") in QUERY_MODES:
        index.prepare_fast_queries()  # once per encoder and machine: later searches start without torch
    if args.json:
        rows = [{**r.to_dict(), **({"copy": e.to_dict()} if evidence else {})}
                for r, e in zip(results, evidence or [None] * len(results), strict=True)]
        print(json.dumps({"index": str(index.directory), "encoder": index.encoder_config["name"], "k": args.k,
                          "text": args.text, "took_ms": round(took, 2), "matched": matched,
                          "filters": where.to_query() if where else {}, "results": rows}, indent=2))
        return 0
    within = f" matching {where.describe()}" if where else ""
    print(f"top {len(results)} of {matched} images{within} in {index.name} ({index.encoder_config['name']}), "
          f"{took:.0f} ms")
    width = max((len(r.path) for r in results), default=4)
    print(f"{'rank':>4}  {'score':>6}  {'path':<{width}}  id")
    for n, r in enumerate(results):
        copy = f"  copy: {evidence[n].inliers} matching points" if evidence and evidence[n].verified else ""
        print(f"{r.rank:>4}  {r.score:6.3f}  {r.path:<{width}}  {r.id}{copy}")
    return 0


def _query(index: Index, args: argparse.Namespace, where) -> tuple[list, list]:
    """The results of `cbir search` (by image, text, or both; verified copies first with --copies), and the
    copies' evidence."""
    if args.text is not None:
        if args.copies:
            raise CbirError("--copies ranks copies of a picture; it does not combine with --text")
        return index.search_text(args.text, k=args.k, image=args.image, where=where), []
    if not args.copies:
        return index.search(args.image, k=args.k, where=where), []
    from cbir.copies import rank_copies_first
    from cbir.images import load_query

    ranked = rank_copies_first(index, load_query(args.image), k=args.k, where=where)
    return [r for r, _ in ranked], [e for _, e in ranked]


def _where(args: argparse.Namespace):
    """The search's filters from --folder, --after, --before, --camera and --tag (several: all of them)."""
    from cbir.search.filters import Where

    return Where.parse(folder=args.folder, after=args.after, before=args.before, camera=args.camera,
                       tags=args.tag or ())


def _cmd_info(args: argparse.Namespace) -> int:
    from cbir.index import Index

    index = Index.open(args.index, device="cpu")
    info = index.info()
    if args.json:
        info["skipped_files"] = [{"path": p, "reason": r} for p, r in index.skipped]
        print(json.dumps(info, indent=2))
        return 0
    enc = info["encoder"]
    w = enc["weights"]
    print(f"index     {info['index']}")
    print(f"images    {info['images']} ({info['skipped']} skipped)   root {info['root']}")
    print(f"encoder   {enc['name']}  dim {enc['dim']}  pooling {enc['pooling']}  "
          f"input {enc['preprocess']['size']}px {enc['preprocess']['resize']}")
    print(f"weights   {w.get('source')}  {w.get('path') or w.get('package') or ''}  sha256 {w.get('sha256', '')[:16]}")
    cal = enc.get("calibration", {})
    why = ("measured: " + ", ".join(f"{m} {v['images_per_s']:.1f} img/s cosine {v['mean_cosine']:.4f} "
                                     f"top-10 overlap {v['top10_overlap']:.3f}" for m, v in cal["modes"].items())
           if "modes" in cal else cal.get("reason", ""))
    if "reused" in cal:
        why += f" (on {cal.get('measured_at', 'an earlier run')}, reused from {cal['reused']})"
    print(f"precision {enc.get('precision', 'fp32')}  {why}".rstrip())
    print("versions  " + "  ".join(f"{k} {v}" for k, v in enc.get("versions", {}).items()))
    _print_segments(info)
    from cbir.search.expansion import Expansion

    print(f"storage   {info['vector_dtype']} vectors   expansion {Expansion.from_dict(info['expansion']).describe()}"
          f"{'   preset ' + _describe_preset(info['preset']) if info['preset'] else ''}")
    w = info["words"]
    print(f"words     near-duplicate >= {w['near_duplicate']:.3f}, similar >= {w['similar']:.3f}, borderline >= "
          f"{w['borderline']:.3f} ({'fitted on this collection' if w['fitted'] else 'defaults'})")
    print(f"created   {info['created']}  in {info['seconds']:.1f} s by cbir {info['cbir_version']}")
    _print_metadata(info)
    for p, r in index.skipped[: args.show_skipped]:
        print(f"  skipped {p}: {r}")
    if len(index.skipped) > args.show_skipped:
        print(f"  ... {len(index.skipped) - args.show_skipped} more skipped (cbir info --json lists all)")
    return 0


def _print_metadata(info: dict) -> None:
    """What was left out of the folder, and what the pictures' metadata holds (dates, cameras, tags, folders)."""
    from cbir.images import describe_left_out

    if info["left_out"]:
        counts = {(x["reason"], x["extension"]): x["files"] for x in info["left_out"]}
        print("left out  " + ", ".join(describe_left_out(counts)))
    meta = info["metadata"]
    d = meta["dates"]
    if d:
        print(f"dates     {d['first']} .. {d['last']} ({d['from_camera']} from the camera, {d['from_file']} from "
              "file times)")
    for name in ("cameras", "tags"):
        counts = meta[name]
        shown = ", ".join(f"{k} ({v})" for k, v in list(counts.items())[:8])
        more = f" and {len(counts) - 8} more" if len(counts) > 8 else ""
        print(f"{name:<9} {shown + more if counts else 'none recorded'}")
    folders = meta["folders"]
    print(f"folders   {len(folders)}{': ' + ', '.join(folders[:8]) if folders else ''}"
          f"{' ...' if len(folders) > 8 else ''}")


def _print_segments(info: dict) -> None:
    """The search index of each segment (one line each, the first few), and what the generation holds."""
    from cbir.search.plan import SearchPlan

    segments = info["segments"]
    print(f"segments  {len(segments)} (generation {info['generation']}; {info['deleted']} deleted rows awaiting "
          f"compaction){'' if len(segments) < 2 else '   cbir compact merges them'}")
    for seg in segments[:5]:
        plan = SearchPlan.from_dict({k: v for k, v in seg["search"].items() if k not in ("gpu", "ntotal")})
        print(f"search    {seg['name']}: {seg['rows'] - seg['deleted']} rows  {plan.describe()}  "
              f"gpu={seg['search']['gpu']}")
    if len(segments) > 5:
        print(f"          ... {len(segments) - 5} more segments (cbir info --json lists all)")
    if info["removed_files"]:
        print(f"removed   {len(info['removed_files'])} files removed from the index by hand (left out until they "
              "change; cbir info --json lists them)")


def _cmd_watch(args: argparse.Namespace) -> int:
    import signal

    from cbir.watch import Watcher
    from indexer import BuildOptions

    out = Path(args.out) if args.out else Path("indexes") / Path(args.dir).resolve().name
    watcher = Watcher(Path(args.dir), out, BuildOptions(encoder=args.encoder, weights=args.weights, device=args.device,
                                                        exclude=tuple(args.exclude), progress=not args.quiet),
                      poll=args.poll)
    print(watcher.catch_up(), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop.set())
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.stop.set()
    print(f"stopped watching {args.dir}: {watcher.batches} batches committed; {out} is up to date", flush=True)
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from cbir.index import Index

    index = Index.open(args.index, device="cpu")
    before = len(index.manifest.segments), index.manifest.deleted
    started = time.perf_counter()
    index.compact()
    print(f"compacted {index.name}: {before[0]} segments ({before[1]} deleted rows) -> "
          f"{len(index.manifest.segments)} segment of {len(index)} rows in {time.perf_counter() - started:.1f} s")
    return 0


def _cmd_encoders(args: argparse.Namespace) -> int:
    from cbir.encoders import list_encoders, list_families

    rows = [(e.name, "/".join(f"{p}:{d or 'as trained'}" for p, d in e.dims.items()), e.default_pooling,
             e.weights_status(), e.description) for e in list_encoders()]
    rows += [(f"{f.prefix}:NAME", "/".join(f"{p}:as the model" for p in f.poolings), f.default_pooling, f.status(None),
              f"{f.description}; e.g. {', '.join(f.examples)}") for f in list_families()]
    if args.json:
        print(json.dumps([dict(zip(("name", "dims", "default_pooling", "weights", "description"), r, strict=True))
                          for r in rows], indent=2))
        return 0
    print(f"{'name':<20} {'dimension (per pooling)':<32} {'default':<8} weights")
    for name, dims, pooling, status, desc in rows:
        print(f"{name:<20} {dims:<32} {pooling:<8} {status}\n{'':<20} {desc}")
    return 0


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise CbirError(f"--split takes three numbers like 60,20,20, not {text!r}") from None
    if len(parts) != 3 or sum(parts) <= 0 or min(parts) < 0:
        raise CbirError(f"--split takes three non-negative numbers like 60,20,20, not {text!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def _cmd_train(args: argparse.Namespace) -> int:
    from cbir.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(kind=args.kind, data=args.dir, out=args.out, labels=args.labels, epochs=args.epochs,
                      batch_size=args.batch_size, image_size=args.image_size, device=args.device, seed=args.seed,
                      resume=args.resume, backbone=args.backbone, emb_dim=args.emb_dim, margin=args.margin,
                      lr=args.lr, patience=args.patience, split=_parse_split(args.split), progress=not args.quiet,
                      backbone_weights=args.backbone_weights or "imagenet")
    result = Trainer(cfg).run()
    print(f"{args.kind}: best val {result['metric']} {result['best_val']:.4f} at epoch {result['best_epoch']} "
          f"(before training {result['baseline_val']:.4f}), {result['epochs_run']} epochs in "
          f"{result['seconds']:.0f} s -> {result['out']}")
    print(f"next: cbir index DIR --encoder {args.kind} --weights {result['out']}")
    return 130 if result["interrupted"] else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cbir.bench.run import BenchConfig, run_bench

    if args.task == "copies":
        from cbir.bench.copies import CopiesConfig, run_copies

        encoders = args.encoders if args.encoders != DEFAULT_BENCH_ENCODERS else "efficientnet_lite0"
        found = run_copies(CopiesConfig(dataset=args.dataset, out=args.out, encoders=encoders, sources=args.sources,
                                        seed=args.seed, device=args.device, progress=not args.quiet))
        print((Path(args.out) / "report.md").read_text())
        print(f"reports: {args.out}/report.md, report.html, report.json ({found['seconds']:.0f} s)")
        return 0

    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise CbirError(f"--k takes numbers like 10,20, not {args.k!r}") from None
    if min(ks) < 1:
        raise CbirError("--k values must be at least 1")
    labels = args.labels or "folders"
    cfg = BenchConfig(dataset=args.dataset, out=args.out, encoders=args.encoders, ks=ks,
                      split=_parse_split(args.split), seed=args.seed, queries=args.queries, device=args.device,
                      labels=labels, train_epochs=args.train_epochs, progress=not args.quiet,
                      presets=args.presets or "")
    if args.presets and args.encoders == DEFAULT_BENCH_ENCODERS:
        cfg.encoders = ""  # presets alone (the baselines stay, as reference rows)
    report = run_bench(cfg)
    print((Path(args.out) / "report.md").read_text())
    print(f"reports: {args.out}/report.md, report.html, report.json ({report['seconds']:.0f} s)")
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from cbir import review
    from cbir.duplicates import DEFAULT_THRESHOLD, TIERS, find_duplicates
    from cbir.index import Index

    if args.undo:
        return _undo_moves(args)
    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLD
    if not 0.0 < args.threshold <= 1.0:
        raise CbirError("--threshold is a cosine similarity between 0 and 1")
    if args.apply and not args.move_to:
        raise CbirError("--apply carries out --move-to DIR: give the folder to move the other pictures of groups to")
    index = Index.open(args.index, device="cpu")
    if args.not_duplicates:
        added = review.Decisions.load(index.directory).mark_not_duplicates(args.not_duplicates)
        print(f"remembered: {', '.join(args.not_duplicates)} are not duplicates ({added} new pairs); they will not "
              "be shown together again")
    found = find_duplicates(index, args.threshold)
    tiers = [t for t in (args.tiers or "identical,near").split(",") if t]
    if unknown := set(tiers) - set(TIERS):
        raise CbirError(f"--tiers: unknown tier {sorted(unknown)[0]!r}; choose from {', '.join(TIERS)}")
    if args.keep:
        review.set_keep(found, args.keep)
    if args.json and not args.move_to:
        print(json.dumps(found, indent=2))
        return 0
    if not args.move_to:
        _print_duplicates(found, args.threshold)
        return 0
    return _move_duplicates(index, found, tiers, args)


def _print_duplicates(found: dict, threshold: float) -> None:
    print(f"{len(found['identical'])} groups of byte-identical files, {len(found['near'])} groups of copies "
          f"({found['candidates']} pairs at cosine >= {threshold} checked, {found['verified_pairs']} verified "
          f"by matching local features), {len(found['same_scene'])} groups of the same scene (burst shots: "
          "not copies)")
    for title, key in (("identical", "identical"), ("copies of", "near"), ("same scene as", "same_scene")):
        for g in found[key]:
            print(f"{title} {g[0]['path']}:" if key != "identical" else "identical:")
            for m in g:
                facts = f"{m['width']}x{m['height']}, {m['bytes']:,} bytes, {m['taken'] or 'no date'}"
                why = m.get("why") or (m["evidence"][0]["why"] if m.get("evidence") else "")
                print(f"  {'keep' if m['keep'] else '    '}  {m['path']} ({facts}){': ' + why if why else ''}")


def _move_duplicates(index, found: dict, tiers: list[str], args: argparse.Namespace) -> int:
    from cbir import review

    moves = review.plan_moves(index.root, [g for t in tiers for g in found[t]], Path(args.move_to))
    if not args.apply:
        for m in moves:
            print(f"would move {m.describe()}")
        print(f"dry run: {len(moves)} files would move (the one marked keep in each group stays); add --apply to "
              "move them; cbir duplicates INDEX --undo puts them back")
        return 0
    done = review.move_duplicates(index, moves)
    for m in done:
        print(f"moved {m.describe()}")
    print(f"moved {len(done)} files to {args.move_to} and removed them from the index (log: "
          f"{index.directory / 'moves.jsonl'}); cbir duplicates {args.index} --undo puts them back")
    return 0


def _undo_moves(args: argparse.Namespace) -> int:
    from cbir import review
    from cbir.index import Index

    undone = review.undo_duplicate_moves(Index.open(args.index, device="cpu"))
    for m in undone.restored:
        print(f"restored {m.source}")
    for m, why in undone.refused:
        print(f"not restored {m.source}: {why}")
    print(f"{len(undone.restored)} files put back and indexed again" +
          (f"; {len(undone.refused)} could not be (still in the log)" if undone.refused else ""))
    return 0 if not undone.refused else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from webui.auth import is_loopback
    from webui.server import check_port

    check_port(args.port)
    token = args.token or os.environ.get("CBIR_TOKEN") or None
    if not is_loopback(args.host) and not token and not args.public:
        raise CbirError(f"--host {args.host} makes every image of the collection reachable from the network; set a "
                        "token (CBIR_TOKEN=... or --token ...) that visitors must give, or pass --public to share "
                        "it with anyone who can reach this machine")
    if args.writable and not is_loopback(args.host) and not token:
        raise CbirError(f"--writable on --host {args.host} would let anyone on the network add and remove images; "
                        "set a token (CBIR_TOKEN=...) that writers must give (--public does not cover writes)")
    from webui import create_app
    from webui.server import make_server
    from webui.warm import when_ready

    if args.max_batch < 1:
        raise CbirError("--max-batch is at least 1 (1: every query embedded alone)")
    app = create_app({"INDEXES": args.indexes, "DEVICE": args.device, "TOKEN": token, "WRITABLE": args.writable,
                      "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024), "MOVE_TO": args.move_to,
                      "BATCH_MAX": args.max_batch})
    server = make_server(app, host=args.host, port=args.port, threads=args.threads)
    served = f"serving {', '.join(app.extensions['cbir'].names)} on http://{args.host}:{server.effective_port}/"
    # listening already (health answers "warming"); "serving" once every query model has answered a search
    when_ready(app, lambda: print(f"{served}  (Ctrl+C stops)", flush=True))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cbir.encoders import PRECISIONS  # the parser's imports load neither torch nor faiss: --help stays quick
    from cbir.search.kinds import EXACT_UP_TO, INDEX_TYPES
    from cbir.version import __version__
    from indexer.options import DEFAULT_PRESET, ENGINES, PRESETS

    p = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval: index a folder of "
                                "images, then find the images most like a query image.")
    p.add_argument("--version", action="version", version=f"cbir {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="also show other libraries' messages (faiss, torch)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("index", help="embed every image in a folder and write an index")
    s.add_argument("dir", help="folder of images (searched recursively)")
    s.add_argument("--out", help="index folder to write (default: indexes/<folder name>)")
    s.add_argument("--encoder", help="encoder name (default efficientnet_lite0; with --update: the index's own), or "
                   "a model of a family: timm:NAME (any timm model), clip:ARCH (an OpenCLIP model: text search too)")
    s.add_argument("--weights", help="'imagenet' (default), 'none' (random), or a weights file; for timm:NAME and "
                   "clip:ARCH also a pretrained tag found in the Hugging Face cache (cbir encoders)")
    s.add_argument("--pooling", help="gem, avg, max or fc (default: the encoder's own)")
    s.add_argument("--model-kwargs", metavar="JSON", help="timm:NAME and clip:ARCH: arguments for the model's "
                   "constructor, recorded in the index, e.g. '{\"img_size\": 224}' for a DINOv2 at 224 px")
    s.add_argument("--batch-size", type=int, help="images per batch (default: 16 on a CPU, 64 on a GPU)")
    s.add_argument("--workers", type=int, help="decoding processes (default: by collection size and cores)")
    s.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N (card N)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching names/paths")
    s.add_argument("--rebuild", action="store_true", help="re-embed everything, replacing the index at --out "
                   "when the new one is complete")
    s.add_argument("--update", action="store_true", help="embed only new and changed files, drop deleted ones")
    s.add_argument("--verify", action="store_true", help="with --update: compare file contents (sha256), not "
                   "just size and modification time")
    s.add_argument("--index-type", choices=INDEX_TYPES,
                   help=f"search index: auto (default: exact up to {EXACT_UP_TO:,} vectors, above that approximate, "
                        "tuned to recall@10 >= 0.99 on the collection's own vectors), flat (exact); the others are "
                        "approximate")
    s.add_argument("--float16", action="store_true", help="store vectors as float16 (half the disk space)")
    s.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="encoder arithmetic: fp32, bf16, int8 (ONNX Runtime, calibrated on this collection), or "
                        "auto (default: the fastest mode that stays faithful to fp32 on a calibration sample)")
    s.add_argument("--preset", choices=PRESETS, help="a measured configuration (README: presets): "
                   f"{'; '.join(_describe_preset(name) for name in PRESETS)}. {DEFAULT_PRESET} is best at finding "
                   "the original of a copy; query expansion (qe) and database augmentation (dba) find better 'more "
                   "of this kind' neighbours")
    s.add_argument("--qe", type=int, metavar="K", help="alpha-query expansion at search time with the top K "
                   "neighbours (0: off, default; 2 is the published setting)")
    s.add_argument("--dba", type=int, metavar="K", help="alpha-database-side augmentation at index time with the top "
                   "K neighbours (0: off, default; 2 is the published setting)")
    s.add_argument("--on-disk", action="store_true", help="IVF-PQ index served from disk, built shard by shard, "
                   "re-ranked with float16 vectors read by row (for collections larger than RAM; 10,000 images or "
                   "more)")
    s.add_argument("--memory-budget", metavar="SIZE", help="auto index type: go on disk when the float32 vectors "
                   "would exceed this (e.g. 8G; default half of this machine's RAM)")
    s.add_argument("--engine", choices=ENGINES, default="local", help="local (default): this machine's "
                   "processes; ray: decode and embed on a Ray cluster (README: More than one machine)")
    s.add_argument("--ray-address", help="with --engine ray: the cluster to join (default: RAY_ADDRESS if set, else "
                   "a local cluster started for this run)")
    s.add_argument("--no-local-features", action="store_true", help="keep no local features per picture: indexing "
                   "is faster, and cbir search --copies computes them from the files instead (slower)")
    s.add_argument("--tags", metavar="FILE.csv", help="tags for pictures: a CSV with the header path,tag, then one "
                   "line per path (relative to DIR) and tag; added to the tags their XMP carries")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_index)

    s = sub.add_parser("search", help="find the images most like IMAGE, or matching --text, or both")
    s.add_argument("index", help="index folder (or a name under indexes/)")
    s.add_argument("image", nargs="?", help="query image file")
    s.add_argument("--text", help="a text query, e.g. 'a red bicycle' (an index of a CLIP model); with IMAGE too, "
                   "the pictures like IMAGE and the text together")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--device", default="auto")
    s.add_argument("--weights", help="where the index's weights file is now, if it moved")
    s.add_argument("--copies", action="store_true", help="rank verified copies of the query (edited, cropped, "
                   "mirrored versions, checked with local features) first, and say so")
    s.add_argument("--no-prepare", action="store_true", help="do not export the ONNX query model that makes later "
                   "searches of an fp32 index start faster")
    s.add_argument("--folder", help="only images in this folder (relative to the indexed folder) or below it")
    s.add_argument("--after", metavar="DATE", help="only images taken on or after DATE (YYYY-MM-DD; the camera's "
                   "date, else the file's)")
    s.add_argument("--before", metavar="DATE", help="only images taken before DATE")
    s.add_argument("--camera", help="only images from this camera (make, model or both, as cbir info lists them)")
    s.add_argument("--tag", action="append", help="only images with this tag (XMP keywords, --tags FILE.csv); "
                   "repeat for several: all of them")
    s.set_defaults(func=_cmd_search)

    s = sub.add_parser("train", help="train a siamese or autoencoder encoder on your own images")
    s.add_argument("kind", help="siamese or autoencoder (any recipe in cbir/training/)")
    s.add_argument("dir", help="folder of training images (class sub-folders give labels)")
    s.add_argument("--out", required=True, help="model file to write, e.g. models/siamese.pt")
    s.add_argument("--labels", default="auto", help="folders, none, or a CSV of file,label (default: folders "
                   "when DIR has class sub-folders)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--image-size", type=int, metavar="PX")
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from MODEL.last.pt")
    s.add_argument("--backbone", default="efficientnet_lite0",
                   help="siamese: efficientnet_lite0, resnet50, seed-cnn; autoencoder: efficientnet_lite0 "
                        "(frozen ImageNet trunk, default) or none (pixel autoencoder)")
    s.add_argument("--backbone-weights", help="siamese: imagenet (default), none, or a file for the backbone")
    s.add_argument("--emb-dim", type=int, default=256)
    s.add_argument("--margin", type=float, default=1.0, help="contrastive margin (Euclidean, unit sphere)")
    s.add_argument("--lr", type=float)
    s.add_argument("--patience", type=int, default=5, help="early stopping: epochs without a better val score")
    s.add_argument("--split", default="60,20,20", help="train,val,test percentages (stratified, seeded)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("bench", help="precision@k of every encoder on a labelled collection, side by side; or, "
                       "with --task copies, how well each finds the original from edited copies (no labels)")
    s.add_argument("dataset", help="folder with one sub-folder per class (or use --labels FILE.csv)")
    s.add_argument("--task", choices=["labels", "copies"], default="labels", help="labels (default): precision@k "
                   "by class; copies: recall of the source from edited copies of a seeded sample")
    s.add_argument("--sources", type=int, default=100, help="copies: pictures to edit (12 edits each)")
    s.add_argument("--encoders", default=DEFAULT_BENCH_ENCODERS,
                   help="comma-separated; NAME:none runs a torchvision encoder with random weights")
    s.add_argument("--presets", metavar="LIST", help="compare cbir index presets too, e.g. fast,balanced,best "
                   "(each indexed in fp32, evaluated through its query expansion); alone, replaces the default "
                   "encoders")
    s.add_argument("--labels", help="CSV of file,label instead of class folders")
    s.add_argument("--k", default="10,20", help="precision cut-offs (default 10,20)")
    s.add_argument("--split", default="60,20,20", help="train,val,test percentages")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--queries", choices=["test", "all"], default="test")
    s.add_argument("--out", default="bench-report", help="report folder (default ./bench-report)")
    s.add_argument("--device", default="auto")
    s.add_argument("--train-epochs", type=int, help="epochs for the trainable encoders (default: theirs)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("duplicates", help="byte-identical files, verified copies and burst shots of an index; "
                       "move all but one of each group out of the collection (and back)")
    s.add_argument("index")
    s.add_argument("--threshold", type=float, default=None, help="cosine similarity from which pairs are checked "
                   "(default 0.7); a pair is reported only when its local features verify it")
    s.add_argument("--json", action="store_true")
    s.add_argument("--not-duplicates", nargs="+", metavar="PATH", help="remember that these pictures (paths as "
                   "listed) are not duplicates: they are never shown together again")
    s.add_argument("--keep", action="append", metavar="PATH", help="keep this picture of its group instead of the "
                   "default (the largest, then the oldest)")
    s.add_argument("--move-to", metavar="DIR", help="move every picture of each group but the one to keep into DIR "
                   "(same relative paths; never overwrites). A dry run unless --apply")
    s.add_argument("--apply", action="store_true", help="with --move-to: really move (logged in the index folder)")
    s.add_argument("--tiers", metavar="LIST", help="with --move-to: which groups, from identical, near (verified "
                   "copies) and same_scene (burst shots); default identical,near")
    s.add_argument("--undo", action="store_true", help="put back every file moved by --move-to --apply, and into "
                   "the index")
    s.set_defaults(func=_cmd_duplicates)

    s = sub.add_parser("serve", help="serve the search page and JSON API for one or more indexes")
    s.add_argument("indexes", nargs="+", metavar="INDEX", help="index folders (the first is the default)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--public", action="store_true", help="serve a non-loopback --host without a token")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--threads", type=int, default=8, help="request threads (default 8)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (card N)")
    s.add_argument("--max-upload-mb", type=float, default=20.0)
    s.add_argument("--max-batch", type=int, default=16, help="embed concurrent queries together, at most this many "
                   "at once (default 16; 1 embeds each alone)")
    s.add_argument("--token", help="require this token from every visitor (better: set CBIR_TOKEN, which other "
                   "users of this machine cannot see in the process list)")
    s.add_argument("--writable", action="store_true", help="accept POST /api/images (add an image) and DELETE "
                   "/api/images/ID (remove one); needs a token on a network address")
    s.add_argument("--move-to", metavar="DIR", help="let the duplicate review page (/duplicates) move the other "
                   "pictures of a group into DIR (never deletes; cbir duplicates INDEX --undo puts them back)")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("info", help="describe an index")
    s.add_argument("index")
    s.add_argument("--json", action="store_true")
    s.add_argument("--show-skipped", type=int, default=10, metavar="N")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("watch", help="keep an index in step with a folder: new, changed, moved and deleted files are "
                       "committed within seconds (catches up first)")
    s.add_argument("dir", help="folder of images to watch (searched recursively)")
    s.add_argument("--out", help="index folder (default: indexes/<folder name>); built first if absent")
    s.add_argument("--encoder", help="for a new index (default efficientnet_lite0)")
    s.add_argument("--weights")
    s.add_argument("--device", default="auto")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    s.add_argument("--poll", action="store_true", help="poll the folder instead of inotify (network file systems)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar while catching up")
    s.set_defaults(func=_cmd_watch)

    s = sub.add_parser("compact", help="merge an index's segments into one (deleted rows dropped, search index "
                       "tuned again); no image is embedded again")
    s.add_argument("index")
    s.set_defaults(func=_cmd_compact)

    s = sub.add_parser("encoders", help="list encoders, their dimensions and whether their weights are here")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_encoders)
    for command in sub.choices.values():  # also after the command: cbir index DIR -v
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="also show other libraries' messages (faiss, torch)")
    return p


OUR_LOGGERS = ("cbir", "indexer", "webui")


class _Stderr(logging.StreamHandler):
    """Writes each record to sys.stderr as it is when the record comes, not as it was when the handler was made: a
    stream replaced since (pytest's capture of a test that ran `main`) may be closed, and writing to it printed
    "--- Logging error ---" with a traceback for every record a server thread logged later."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_handler: logging.Handler | None = None
DEFAULT_BENCH_ENCODERS = "efficientnet_lite0,resnet50,vgg16,siamese,autoencoder"


def _configure_logging(verbose: bool, timestamps: bool = False) -> None:
    """cbir's own messages at INFO on stderr (-q only hides progress bars); other libraries' only with --verbose.

    faiss, for one, reports at INFO which CPU build it could not load before it loads another: not a failure.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None:  # main() called again in one process (tests, notebooks): replace only our own
        root.removeHandler(_handler)
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s" if timestamps else "%(message)s"))
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if isinstance(getattr(args, "k", None), int) and args.k < 1:
        print("cbir: error: -k must be at least 1", file=sys.stderr)
        return 2
    warnings.simplefilter("default")
    _configure_logging(args.verbose, timestamps=args.command == "serve")
    with contextlib.suppress(AttributeError, ValueError):  # no such signal here, or not the main thread
        # over a file-size limit (ulimit -f) a write fails with EFBIG and is reported as such, not a core dump
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return func(args)
    except CbirError as exc:
        print(f"cbir: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cbir: interrupted; any existing index was left as it was", file=sys.stderr)
        return 130
    finally:
        _release_logging()


def _release_logging() -> None:
    """The command's handler goes when the command ends: a program (or a test) that called `main` does not keep
    printing what its other threads log later (a server's queue warnings, a warm-up finishing)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None


def run() -> None:
    """The `cbir` command: main(), then an immediate end of the process.

    Python's own shutdown of a process that has imported torch takes ~0.45 s on 2 cores (finalising thousands of
    modules) after every command. Everything cbir writes is closed and renamed into place before main() returns, and
    workers and clusters are stopped by then, so once the output is flushed the process ends with main's code.
    """
    code = main()
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to say
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()

"""Benchmark outputs: report.json (every number), report.md (table, protocol, machine), report.html
(self-contained: table, P@10 bar chart, sample queries with green/red frames per encoder)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cbir.errors import ImageError
from cbir.images import load_image

SAMPLE_QUERIES = 4


def _table(report: dict[str, Any]) -> list[str]:
    ks = report["protocol"]["ks"]
    head = ["encoder", *[f"P@{k}" for k in ks], "similar@10", "dissimilar@10", "mAP", "img/s", "build s",
            "query p50 ms", "query p95 ms", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in sorted(report["encoders"].items(), key=lambda kv: -kv[1]["precision_at_10"]):
        row = [name, *[f"{e[f'precision_at_{k}']:.4f}" for k in ks], f"{e['similar_at_10']:.2f}",
               f"{e['dissimilar_at_10']:.2f}", f"{e['mAP']:.4f}", f"{e['embed_images_per_s']:.1f}",
               f"{e['index_build_seconds']:.1f}", f"{e['query_ms_p50']:.2f}", f"{e['query_ms_p95']:.2f}",
               str(e.get("training_seconds", "-"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _per_class(report: dict[str, Any]) -> list[str]:
    names = sorted(report["encoders"])
    classes = sorted(next(iter(report["encoders"].values()))["per_class_precision_at_10"]) if names else []
    lines = ["| class | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{report['encoders'][n]['per_class_precision_at_10'][c]:.3f}"
                                             for n in names) + " |")
    return lines


def _bar_chart(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(report["encoders"].items(), key=lambda kv: kv[1]["precision_at_10"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.2))
    vals = [e["precision_at_10"] for _, e in items]
    colours = ["#9aa0a6" if n in ("colour_histogram", "random_cnn") or e.get("random_weights") else "#1a73e8"
               for n, e in items]
    ax.barh([n for n, _ in items], vals, color=colours)
    for i, v in enumerate(vals):
        ax.text(v + 0.01, i, f"{v:.3f}", va="center")
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("precision@10 (grey: baselines and random weights)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def thumb_url(root: Path, rel: str, px: int = 96) -> str:
    try:
        im = load_image(root / rel, draft=px)
    except ImageError:
        return ""
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_reports(report: dict[str, Any], out: Path, root: Path, label_of: dict[str, str]) -> None:
    """report.json, report.md, p_at_10.png and report.html (with sample queries) in `out`."""
    rankings = {n: e.pop("_ranking") for n, e in report["encoders"].items() if "_ranking" in e}
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text("\n".join(_markdown(report)))
    chart = _bar_chart(report)
    (out / "p_at_10.png").write_bytes(chart)
    p = report["protocol"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cbir bench</title><style>",
        "body{font:14px system-ui,sans-serif;margin:24px;color:#1c1e21}table{border-collapse:collapse}"
        "td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        ".row{display:flex;gap:4px;align-items:center;margin:4px 0}.row img{width:72px;height:72px;object-fit:cover;"
        "border:4px solid transparent}.q img{border-color:#1a73e8}.ok{border-color:#34a853!important}"
        ".bad{border-color:#d93025!important}.lab{width:160px;font-size:12px}",
        "</style></head><body>",
        f"<h1>cbir bench</h1><p>{html.escape(report['dataset'])}: {report['images']} images, "
        f"{report['classes']} classes; queries: {html.escape(p['queries'])}; seed {p['seed']}.</p>",
        _md_table_to_html(_table(report)),
        f"<h2>Precision@10</h2><img alt='P@10 per encoder' src='data:image/png;base64,"
        f"{base64.b64encode(chart).decode()}'>",
        "<h2>Sample queries</h2><p>Blue: query. Green: same label. Red: different label.</p>",
        *_sample_rows(rankings, root, label_of),
        "</body></html>",
    ]
    (out / "report.html").write_text("\n".join(parts))


def _markdown(report: dict[str, Any]) -> list[str]:
    p = report["protocol"]
    m = report["machine"]
    md = [
        "# cbir bench report", "",
        f"Collection: `{report['dataset']}`, {report['images']} images, {report['classes']} classes. "
        f"Run took {report['seconds']:.0f} s.", "",
        "## Protocol", "",
        f"- split train/val/test {p['split']} (stratified, seed {p['seed']}); queries: "
        f"{'the test split' if p['queries'] == 'test' else 'every image (leave-one-out)'}; gallery: every image;",
        "- the query itself is excluded from its results; a result is *similar* when its label equals the query's;",
        f"- trainable encoders: {p['trainable_encoders']}; cosine similarity, exact FAISS search.", "",
        "## Results", "", *_table(report), "",
        "## Precision@10 per class", "", *_per_class(report), "",
    ]
    if report["skipped"]:
        md += ["## Not run", ""] + [f"- {n}: {r}" for n, r in report["skipped"].items()] + [""]
    md += ["## Machine", "", f"{m['cores']} cores ({m['cpu']}), GPU: {m['gpu'] or 'none'}, Python {m['python']}, "
           f"torch {m['torch']}", ""]
    return md


def _sample_rows(rankings: dict[str, Any], root: Path, label_of: dict[str, str]) -> list[str]:
    """A few seeded queries, each with every encoder's top 10 as thumbnails marked right or wrong."""
    if not rankings:
        return []
    q_pos, _, _, paths = next(iter(rankings.values()))
    picks = np.random.default_rng(0).choice(len(q_pos), size=min(SAMPLE_QUERIES, len(q_pos)), replace=False)
    thumbs: dict[str, str] = {}

    def t(rel: str) -> str:
        if rel not in thumbs:
            thumbs[rel] = thumb_url(root, rel)
        return thumbs[rel]

    parts = []
    for qi in picks:
        qpath = paths[q_pos[qi]]
        parts.append(f"<h3>{html.escape(qpath)} ({html.escape(label_of.get(qpath, ''))})</h3>")
        for name, (qp, top, rel, pth) in rankings.items():
            cells = [f"<span class='q'><img src='{t(pth[qp[qi]])}' title='query'></span>"]
            for r in range(top.shape[1]):
                g = pth[top[qi, r]]
                cells.append(f"<img class='{'ok' if rel[qi, r] else 'bad'}' src='{t(g)}' title='{html.escape(g)}'>")
            parts.append(f"<div class='row'><span class='lab'>{html.escape(name)}</span>{''.join(cells)}</div>")
    return parts


def _md_table_to_html(lines: list[str]) -> str:
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not ln.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"

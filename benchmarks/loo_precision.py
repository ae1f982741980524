"""Leave-one-out precision@k and mAP of indexes, through the search API (label = first folder of the path).

    cbir index ../shared/data/animals4 --out indexes/animals4 [--preset best]
    python benchmarks/loo_precision.py indexes/animals4 [more indexes] -k 10

Every indexed image is a query by id, as "more like this" asks: its stored vector, the index's query expansion
(if any), itself left out. P@k comes from `Index.search_id` one query at a time; mAP from the same expanded
queries ranked against the whole collection. images/s is the index's own indexing rate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cbir import Index, metrics


def evaluate(index: Index, k: int) -> dict[str, float]:
    s = index.rows()
    assert s.vectors is not None
    labels = np.array([path.split("/")[0] for path in s.paths])
    started = time.perf_counter()
    hits = []
    for pos, id_ in enumerate(s.ids):
        found = index.search_id(int(id_), k=k)
        hits.append(np.mean([index.path_of(r.id).split("/")[0] == labels[pos] for r in found]))
    query_ms = (time.perf_counter() - started) * 1000 / len(s.ids)
    rows = np.arange(len(s.ids))
    queries = index.expand(s.vectors, [(int(i),) for i in s.ids])
    ranking = metrics.rank(queries, s.vectors, rows)
    rel = metrics.relevance(ranking, labels, labels)
    n_rel = np.array([(labels == lab).sum() - 1 for lab in labels])
    return {"p": float(np.mean(hits)), "map": float(metrics.average_precision(rel, n_rel).mean()),
            "ips": len(s.ids) / max(index.manifest.seconds, 1e-9), "query_ms": query_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("indexes", nargs="+")
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    print(f"| index | images | encoder | expansion | images/s (indexing) | LOO P@{args.k} | mAP | query ms |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.indexes:
        index = Index.open(path, device="cpu")
        r = evaluate(index, args.k)
        print(f"| {path} | {len(index)} | {index.encoder_config['name']} | {index.expansion.describe()} | "
              f"{r['ips']:.1f} | {r['p']:.4f} | {r['map']:.4f} | {r['query_ms']:.2f} |")


if __name__ == "__main__":
    main()

"""Label-free options for better neighbours, measured on one labelled folder (label = first folder of the path).

    python benchmarks/label_free_options.py --data ../shared/data/animals4 --work /tmp/cbir-options

Indexes efficientnet_lite0, efficientnet_lite2 and their fused encoder (fp32, `cbir index` code), embeds the mirror
image of every photo with each network, then scores leave-one-out P@10 with numpy on the vectors: plain, with
alpha-QE (k=2, alpha=3: the published setting) and with alpha-DBA + alpha-QE. Options: mirror-averaged vectors,
power normalisation, centring on the collection mean, fusing the standalone vectors against the fused encoder's
own, and the expansion's k. It decides what to build; the presets themselves are measured through the search API
(`cbir bench --presets`, `loo_precision.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from cbir import Index
from cbir.images import load_image


def normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def p_at_10(db: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> float:
    s = queries @ db.T
    np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :10]
    return float((labels[top] == labels[:, None]).mean())


def expand(src: np.ndarray, db: np.ndarray, k: int, alpha: float, with_self: bool) -> np.ndarray:
    s = src @ db.T
    if not with_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.clip(np.take_along_axis(s, idx, 1), 0, None) ** alpha
    return normalise(src * (0 if with_self else 1) + (w[..., None] * db[idx]).sum(1))


def scores(x: np.ndarray, labels: np.ndarray, k: int = 2) -> tuple[float, float, float]:
    """P@10 plain, with alpha-QE, with alpha-DBA + alpha-QE (as cbir applies them)."""
    d = expand(x, x, k + 1, 3.0, True)
    return p_at_10(x, x, labels), p_at_10(x, expand(x, x, k, 3.0, False), labels), \
        p_at_10(d, expand(d, d, k, 3.0, False), labels)


def vectors(data: Path, work: Path, encoder: str) -> tuple[Index, np.ndarray]:
    out = work / encoder.replace("+", "_")
    index = Index.open(out, device="cpu") if (out / "vectors.h5").is_file() else \
        Index.build(data, out=out, device="cpu", precision="fp32", encoder=encoder)
    assert index.rows().vectors is not None
    return index, np.asarray(index.rows().vectors, np.float32)


def mirrored(index: Index, data: Path, work: Path) -> np.ndarray:
    cache = work / f"{index.encoder_config['name']}-mirror.npy"
    if cache.is_file():
        return np.load(cache)
    enc, pre, paths = index.encoder, index.encoder.preprocess, list(index.rows().paths)
    out = [enc.embed([load_image(data / p, draft=pre.draft_size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                      for p in paths[i:i + 16]]) for i in range(0, len(paths), 16)]
    np.save(cache, np.concatenate(out))
    return np.load(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    i0, l0 = vectors(args.data, args.work, "efficientnet_lite0")
    i2, l2 = vectors(args.data, args.work, "efficientnet_lite2")
    fi, fused = vectors(args.data, args.work, "efficientnet_lite0+efficientnet_lite2")
    assert list(i0.rows().paths) == list(i2.rows().paths) == list(fi.rows().paths)
    labels = np.array([p.split("/")[0] for p in i0.rows().paths])
    m0, m2 = mirrored(i0, args.data, args.work), mirrored(i2, args.data, args.work)
    cat = lambda *parts: normalise(np.concatenate(parts, axis=1))  # noqa: E731
    power = lambda v, a: normalise(np.abs(v) ** a)  # noqa: E731  (the features are >= 0)
    centre = lambda v: normalise(v - v.mean(0, keepdims=True))  # noqa: E731
    rows = [
        ("efficientnet_lite0", l0), ("lite0, mirror-averaged", normalise(l0 + m0)),
        ("efficientnet_lite2", l2), ("lite2, mirror-averaged", normalise(l2 + m2)),
        ("lite0+lite2, the fused encoder (view 2)", fused),
        ("lite0+lite2, standalone vectors concatenated", cat(l0, l2)),
        ("lite0+lite2 fused, mirror-averaged parts", cat(normalise(l0 + m0), normalise(l2 + m2))),
        ("lite0+lite2 fused, power 0.5", cat(power(l0, 0.5), power(l2, 0.5))),
        ("lite0+lite2 fused, power 0.75", cat(power(l0, 0.75), power(l2, 0.75))),
        ("lite0+lite2 fused, parts centred", cat(centre(l0), centre(l2))),
    ]
    print(f"{len(labels)} photos, leave-one-out P@10 (k=2, alpha=3)")
    print("| option | plain | + alpha-QE | + alpha-DBA + alpha-QE |")
    print("|---|---|---|---|")
    for name, x in rows:
        print("| {} | {:.4f} | {:.4f} | {:.4f} |".format(name, *scores(x, labels)))
    print("\nThe fused encoder with alpha-DBA + alpha-QE, by k (alpha=3)")
    print("| k | " + " | ".join(str(k) for k in (1, 2, 3, 5, 7, 10)) + " |")
    print("|---" * 7 + "|")
    print("| P@10 | " + " | ".join(f"{scores(fused, labels, k)[2]:.4f}" for k in (1, 2, 3, 5, 7, 10)) + " |")


if __name__ == "__main__":
    main()

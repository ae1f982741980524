"""cbir bench: metric arithmetic on hand-made cases, and a full run on generated labelled images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cbir import metrics
from cbir.bench.run import BenchConfig, parse_encoders, run_bench
from cbir.errors import CbirError
from tests.test_training import labelled  # noqa: F401  (fixture: 3 classes x 12 generated images)


def test_precision_and_ap_on_a_hand_computed_case() -> None:
    # 1 query; ranking relevance: R N R N N  -> P@1=1, P@2=.5, P@3=2/3, P@5=.4; AP over 2 relevant = (1 + 2/3)/2
    rel = np.array([[True, False, True, False, False]])
    assert metrics.precision_at(rel, 1)[0] == 1.0
    assert metrics.precision_at(rel, 3)[0] == pytest.approx(2 / 3)
    assert metrics.precision_at(rel, 5)[0] == pytest.approx(0.4)
    assert metrics.average_precision(rel, np.array([2]))[0] == pytest.approx((1 + 2 / 3) / 2)
    # a relevant item never retrieved lowers AP: 3 relevant, 2 found
    assert metrics.average_precision(rel, np.array([3]))[0] == pytest.approx((1 + 2 / 3) / 3)


def test_ranking_excludes_the_query_and_breaks_ties_stably() -> None:
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    order = metrics.rank(g[[0]], g, np.array([0]))
    assert order.tolist() == [[1, 3, 2]]
    labels = np.array(["a", "a", "b", "b"])
    rel = metrics.relevance(order, labels[[0]], labels)
    assert rel.tolist() == [[True, False, False]]
    s = metrics.summarise(rel, np.array([1]), labels[[0]], [1, 2])
    assert s["precision_at_1"] == 1.0 and s["precision_at_2"] == 0.5 and s["mAP"] == 1.0
    assert s["similar_at_10"] == 1.0 and s["dissimilar_at_10"] == 2.0  # only 3 results exist


def test_encoder_list_parsing() -> None:
    assert parse_encoders("resnet50:none,efficientnet_lite0") == [
        ("resnet50", "none"), ("efficientnet_lite0", None), ("colour_histogram", None), ("random_cnn", None)]
    with pytest.raises(CbirError, match="unknown encoder"):
        parse_encoders("alexnet")


@pytest.fixture(scope="module")
def bench_run(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # noqa: F811
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(dataset=str(labelled), out=str(out), encoders="efficientnet_lite0,vgg16,autoencoder",
                      ks=(5, 10), seed=1, device="cpu", train_epochs=1, progress=False)
    return out, run_bench(cfg)


def test_bench_writes_every_output(bench_run: tuple[Path, dict]) -> None:
    out, report = bench_run
    for name in ("report.md", "report.json", "report.html", "split.csv", "p_at_10.png", "topk/efficientnet_lite0.csv"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report.json").read_text())
    assert {"efficientnet_lite0", "autoencoder", "colour_histogram", "random_cnn"} <= set(data["encoders"])
    e = data["encoders"]["efficientnet_lite0"]
    for key in ("precision_at_5", "precision_at_10", "similar_at_10", "dissimilar_at_10", "mAP",
                "per_class_precision_at_10", "embed_images_per_s", "index_build_seconds", "query_ms_p50",
                "query_ms_p95"):
        assert key in e, key
    assert e["similar_at_10"] + e["dissimilar_at_10"] == pytest.approx(10)
    assert data["encoders"]["autoencoder"]["training_seconds"] > 0
    assert "vgg16" in data["skipped"] and "vgg16:none" in data["skipped"]["vgg16"]
    md = (out / "report.md").read_text()
    assert "## Protocol" in md and "| efficientnet_lite0 |" in md and "## Machine" in md
    html = (out / "report.html").read_text()
    assert html.count("class='ok'") + html.count("class='bad'") >= 10 and "data:image/png;base64," in html
    with open(out / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 36 and {r["split"] for r in rows} == {"train", "val", "test"}
    n_test = sum(r["split"] == "test" for r in rows)
    assert e["queries"] == n_test


def test_bench_numbers_equal_those_of_the_index_vectors(bench_run: tuple[Path, dict]) -> None:
    from cbir import Index

    out, report = bench_run
    s = Index.open(out / "indexes" / "efficientnet_lite0").rows()
    with open(out / "split.csv") as fh:
        split = {r["file"]: (r["label"], r["split"]) for r in csv.DictReader(fh)}
    labels = np.array([split[p][0] for p in s.paths])
    q = np.array([i for i, p in enumerate(s.paths) if split[p][1] == "test"])
    sims = s.vectors[q] @ s.vectors.T
    sims[np.arange(len(q)), q] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    expected = (labels[top] == labels[q][:, None]).mean()
    assert report["encoders"]["efficientnet_lite0"]["precision_at_10"] == pytest.approx(expected)
    assert report["encoders"]["efficientnet_lite0"]["precision_at_10"] > \
        report["encoders"]["random_cnn"]["precision_at_10"] - 0.2  # sanity: a real encoder is not far worse


def test_random_weights_are_labelled_never_silent(labelled: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = BenchConfig(dataset=str(labelled), out=str(tmp_path), encoders="resnet50:none", ks=(10,), device="cpu",
                      queries="all", progress=False)
    report = run_bench(cfg)
    assert "resnet50 (random weights)" in report["encoders"]
    assert report["encoders"]["resnet50 (random weights)"]["random_weights"] is True
    assert report["encoders"]["resnet50 (random weights)"]["queries"] == 36
    # deterministic: the same run gives the same numbers
    again = run_bench(BenchConfig(dataset=str(labelled), out=str(tmp_path / "2"), encoders="resnet50:none",
                                  ks=(10,), device="cpu", queries="all", progress=False))
    for name in report["encoders"]:
        assert report["encoders"][name]["precision_at_10"] == again["encoders"][name]["precision_at_10"]
        assert report["encoders"][name]["mAP"] == again["encoders"][name]["mAP"]


def test_bench_from_the_command_line(labelled: Path, tmp_path: Path) -> None:  # noqa: F811
    from cbir.cli import main

    out = tmp_path / "r"
    assert main(["bench", str(labelled), "--encoders", "colour_histogram", "--k", "5,10", "--out", str(out),
                 "--device", "cpu", "-q"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert set(data["encoders"]) == {"colour_histogram", "random_cnn"}
    assert 0 <= data["encoders"]["colour_histogram"]["precision_at_10"] <= 1
    assert main(["bench", str(labelled), "--k", "0", "--out", str(out)]) == 2


def test_bench_compares_presets_through_their_query_expansion(labelled: Path, tmp_path: Path) -> None:  # noqa: F811
    """Presets are rows of the same report; a preset with query expansion is scored as search answers it."""
    from cbir import Index

    report = run_bench(BenchConfig(dataset=str(labelled), out=str(tmp_path), encoders="", ks=(10,), device="cpu",
                                   progress=False, presets="fast,balanced"))
    fast, balanced = report["encoders"]["preset fast"], report["encoders"]["preset balanced"]
    assert fast["expansion"] == "none" and "alpha-QE k=2" in balanced["expansion"]
    for row in (fast, balanced):
        assert row["embed_images_per_s"] > 0 and row["query_ms_p50"] > 0 and 0 <= row["mAP"] <= 1
    index = Index.open(tmp_path / "indexes" / "preset-balanced", device="cpu")
    with open(tmp_path / "split.csv") as fh:
        split = {r["file"]: (r["label"], r["split"]) for r in csv.DictReader(fh)}
    hits = []
    for path in index.rows().paths:
        if split[path][1] == "test":
            found = index.search_id(index.id_of(path), k=10)
            hits.append(np.mean([split[r.path][0] == split[path][0] for r in found]))
    assert balanced["precision_at_10"] == pytest.approx(float(np.mean(hits)))
    assert "| preset balanced |" in (tmp_path / "report.md").read_text()
    with pytest.raises(CbirError, match="unknown preset"):
        run_bench(BenchConfig(dataset=str(labelled), out=str(tmp_path / "x"), encoders="", presets="fastest"))

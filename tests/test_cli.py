"""The `cbir` command: index, search (text and JSON), info, encoders, and its error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbir.cli import main


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "sample"
    assert main(["index", str(samples), "--out", str(out), "--device", "cpu", "-q"]) == 0
    return out


def test_index_prints_a_summary(samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(samples / "cat"), "--out", str(tmp_path / "cats"), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "indexed 4 images, skipped 0" in out and "images/s" in out
    assert "efficientnet_lite0" in err and "1280-d" in err


def test_search_text_and_json(cli_index: Path, samples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(cli_index), str(samples / "rocket" / "rocket.jpg")]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 10 and "rocket/rocket.jpg" in lines[0]
    assert main(["search", str(cli_index), str(samples / "rocket" / "rocket.jpg"), "-k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in data["results"]] == [1, 2, 3]
    assert data["results"][0]["path"] == "rocket/rocket.jpg" and data["results"][0]["score"] > 0.999
    assert set(data["results"][0]) == {"rank", "id", "path", "score"}


def test_info_and_encoders(cli_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(cli_index)]) == 0
    out = capsys.readouterr().out
    assert "36 (0 skipped)" in out and "efficientnet_lite0" in out and "sha256" in out
    assert main(["info", str(cli_index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 36
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "vgg16" in out and "resnet50" in out and "efficientnet_lite0" in out and "missing" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "/no/such/folder"], "folder not found"),
        (["search", "/no/such/index", "x.jpg"], "no index at"),
        (["index", ".", "--encoder", "nope"], "unknown encoder"),
        (["index", ".", "--encoder", "vgg16"], "vgg16-397923af.pth"),
        (["index", ".", "--device", "cuda"], "no CUDA GPU"),
        (["serve", "/no/such/index", "--port", "99999"], "--port 99999 is not a TCP port"),
        (["serve", "/no/such/index", "--port", "-1"], "--port -1 is not a TCP port"),
    ],
)
def test_errors_are_one_clear_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    if argv[-1] == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_index_of_a_folder_without_images_fails_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no picture here")
    assert main(["index", str(tmp_path / "texts"), "--out", str(tmp_path / "idx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cbir: error: found no image to index") and "1 .txt (not an image)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "idx").exists()


def test_search_with_missing_query_and_bad_k(cli_index: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(cli_index), "/no/such.jpg"]) == 2
    assert "query image not found" in capsys.readouterr().err
    assert main(["search", str(cli_index), "/no/such.jpg", "--copies"]) == 2
    assert "query image not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a picture")
    assert main(["search", str(cli_index), str(tmp_path / "notes.txt"), "--copies"]) == 2
    assert "cbir: error: cannot use the query image: not an image" in capsys.readouterr().err
    assert main(["search", str(cli_index), "/no/such.jpg", "-k", "0"]) == 2
    assert "-k must be at least 1" in capsys.readouterr().err


def test_console_script_runs_as_a_real_process(cli_index: Path, samples: Path) -> None:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "cbir", "search", str(cli_index),
                           str(samples / "coffee" / "coffee_crop.jpg"), "--json", "-k", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = [r["path"] for r in json.loads(proc.stdout)["results"]]
    assert paths[0] == "coffee/coffee_crop.jpg" and all(p.startswith("coffee/") for p in paths)

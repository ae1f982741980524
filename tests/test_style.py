"""The code base stays ruff-clean (the linter is part of the test extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_imports_without_loading_models() -> None:
    """Importing the packages must be cheap: no torch, timm, h5py or faiss loaded by `import cbir, indexer, webui`
    (each loads what it needs when it is used: a Ray decode worker imports indexer, a search process cbir), nor by
    the command's parser, which names the index types, precisions and presets those packages define."""
    code = ("import sys, cbir, indexer, webui, cbir.encoders, cbir.cli\n"
            "cbir.cli.build_parser()\n"
            "heavy = [m for m in ('torch', 'timm', 'faiss', 'h5py') if m in sys.modules]\n"
            "print('loaded: ' + ','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "loaded:", out.stdout + out.stderr

"""Shared fixtures: real pictures (the bundled samples), generated bad files, and one built index."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_until_closed
from tests.tiny_models import clip_index, tiny  # noqa: F401  (fixtures: tiny models of each encoder family)

# Never reach for the network from a test, and keep torchvision's cache inside the test run.
os.environ["CBIR_OFFLINE"] = "1"

SAMPLES = Path(__file__).resolve().parent.parent / "cbir" / "samples"


@pytest.fixture(autouse=True, scope="session")
def _isolated_torch_home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("torch_home")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    os.environ["CBIR_CACHE"] = str(tmp_path_factory.mktemp("cbir_cache"))  # int8 models made by tests
    yield home
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old


@pytest.fixture(autouse=True, scope="session")
def _no_stray_log_records():
    """Records that server threads log after their test has ended (waitress's "Task queue depth is 2" while a
    browser still loads thumbnails, a warm-up finishing) are dropped, not printed among the dots: a NullHandler keeps
    logging's last-resort handler from printing them. During a test, pytest captures records as usual."""
    root = logging.getLogger()
    quiet = logging.NullHandler()
    root.addHandler(quiet)
    yield
    root.removeHandler(quiet)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def good_and_bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sample photos plus one file of every bad kind (see badfiles.py)."""
    from tests.badfiles import write_bad_files

    root = tmp_path_factory.mktemp("collection")
    shutil.copytree(SAMPLES, root / "photos", ignore=shutil.ignore_patterns("*.py", "*.md"))
    write_bad_files(root / "bad")
    return root


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory: pytest.TempPathFactory, good_and_bad: Path):
    from cbir import Index

    out = tmp_path_factory.mktemp("idx") / "sample"
    return Index.build(good_and_bad, out=out, encoder="efficientnet_lite0", device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def start_server():
    """start_server(index_dirs, **config) -> base URL of the real app under waitress on 127.0.0.1 (any free port),
    set up exactly as `cbir serve` sets it up; every server started is closed at the end of the session."""
    import threading

    from webui import create_app
    from webui.server import make_server

    servers = []

    def start(indexes: list[Path], **config) -> str:
        app = create_app({"INDEXES": [str(p) for p in indexes], "DEVICE": "cpu", **config})
        srv = make_server(app, host="127.0.0.1", port=0, threads=4)
        threading.Thread(target=run_until_closed, args=(srv,), daemon=True).start()
        servers.append(srv)
        assert app.extensions["cbir_warm"].ready.wait(300), "the server did not warm up"  # as `cbir serve` waits
        return f"http://127.0.0.1:{srv.effective_port}"

    yield start
    for srv in servers:
        srv.close()

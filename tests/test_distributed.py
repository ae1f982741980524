"""`cbir index --engine ray` on a real two-node Ray cluster (127.0.0.1, 1 CPU each) gives the one-machine index;
a killed driver resumes with only what was missing; a local cluster dies with its driver; an S3 source (a local
S3-compatible server) gives the same index."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbir import Index
from indexer import BuildOptions, build, guardian
from indexer.work import WorkDir
from tests.badfiles import jpeg_bytes, photo

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the test cluster listens on 127.0.0.1 only (read on import)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # and reports nothing over the network
N = 60
ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", guardian.VAR)}


@pytest.fixture(scope="module")
def cluster() -> str:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20,
                                                      "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1")
    assert c.address.startswith("127.0.0.1:"), c.address
    c.wait_for_nodes()
    yield c.address
    c.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raydata")
    for i in range(N):
        (root / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(photo((320, 240), seed=100 + i)))
    (root / "broken.jpg").write_text("not a picture")
    return root


@pytest.fixture(scope="module")
def local_index(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "idx"
    build(folder, out, BuildOptions(encoder="efficientnet_lite0", precision="fp32", device="cpu"))
    return out


def _index(source: str, out: Path, *extra: str, env: dict | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cbir", "index", source, "--out", str(out), "--encoder", "efficientnet_lite0",
           "--precision", "fp32", "--engine", "ray", "--batch-size", "4", "-q", *extra]
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def assert_same_index(got: Path, want: Path) -> None:
    """Per path the same vector (cosine >= 0.9999) and the same top-10; the same skipped files and reasons."""
    a, b = Index.open(want, device="cpu"), Index.open(got, device="cpu")
    assert sorted(a.rows().paths) == sorted(b.rows().paths)
    assert a.skipped == b.skipped
    assert [s[0] for s in b.skipped] == ["broken.jpg"] and "not an image" in b.skipped[0][1]
    for path in a.rows().paths:
        ia, ib = a.id_of(path), b.id_of(path)
        assert float(a.vector_of(ia) @ b.vector_of(ib)) >= 0.9999
        assert [r.path for r in a.search_id(ia, k=10)] == [r.path for r in b.search_id(ib, k=10)]


def test_two_node_cluster_gives_the_one_machine_index(cluster, folder, local_index, tmp_path):
    out = tmp_path / "ray"
    text = _finish(_index(str(folder), out, "--ray-address", cluster))
    assert f"indexed {N} images, skipped 1" in text
    # each embedding actor says where it ran (a GPU actor: which card), and the counts cover every image
    where = re.findall(r"(\S+: cpu, \d+ threads) \((\d+) images\)", text.split("ray: embedded on ", 1)[1])
    assert where and sum(int(n) for _, n in where) == N + 1, text
    assert_same_index(out, local_index)
    assert not (out / ".work").exists()


def _chunk_paths(out: Path) -> set[str]:
    done = WorkDir(out, {}).done()
    return set(done)


def _kill_after_first_chunks(proc: subprocess.Popen, out: Path, chunks: int = 2) -> None:
    deadline = time.monotonic() + 240
    while len(list((out / ".work").glob("chunk-*.npz"))) < chunks:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "no chunk written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_driver_resumes_with_only_the_missing_files(cluster, folder, local_index, tmp_path):
    out = tmp_path / "ray"
    _kill_after_first_chunks(_index(str(folder), out, "--ray-address", cluster), out)
    done = _chunk_paths(out)
    assert 0 < len(done) < N + 1
    manifest = [line.split("\t") for line in (out / ".work" / "files.tsv").read_text().splitlines()]
    listed = [(int(size), path) for size, _mtime, path in manifest]  # every file, sorted, with its size and mtime
    assert listed == [(p.stat().st_size, p.name) for p in sorted(folder.iterdir())]
    text = _finish(_index(str(folder), out, "--ray-address", cluster))
    resumed = int(re.search(r"resumed: (\d+) images", text).group(1))
    embedded = int(re.search(r"(\d+) embedded now", text).group(1))
    assert resumed == len(done) and embedded == N + 1 - len(done), text
    assert_same_index(out, local_index)


def _tree(root: int) -> dict[int, str]:
    """Every live process under `root`: pid -> command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int((entry / "stat").read_text().rpartition(")")[2].split()[1]), []).append(
                    int(entry.name))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            with contextlib.suppress(OSError):
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    with contextlib.suppress(OSError, IndexError):
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return False


def test_a_local_cluster_dies_with_its_killed_driver(folder, tmp_path):
    """Killed while Ray's raylet has just started its agents (DashboardAgent, RuntimeEnvAgent: they run without the
    run's tag and lived on for about 90 s): every process of the run is gone within 5 s."""
    out = tmp_path / "ray"
    proc = _index(str(folder), out, env={**ENV, guardian.VAR: f"test{os.getpid()}"})
    deadline = time.monotonic() + 240
    while not any("DashboardAgent" in c for c in _tree(proc.pid).values()):
        assert proc.poll() is None and time.monotonic() < deadline, "Ray's agents never started"
        time.sleep(0.05)
    tree = _tree(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while (alive := {c for p, c in tree.items() if _running(p) and "indexer.guardian" not in c}) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes of the killed run still alive after 5 s: {alive}"
    said = proc.stdout.read() if proc.stdout else ""
    assert "ray: starting a local cluster" in said  # cbir's own line; Ray's banners only with --verbose:
    assert "Token authentication" not in said and ".cc:" not in said, said


@pytest.fixture(scope="module")
def s3(folder: Path):
    """A moto S3 server on 127.0.0.1 holding the folder under s3://photos/set1/."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY":
           "test", "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="photos")
    for f in folder.iterdir():
        client.upload_file(str(f), "photos", f"set1/{f.name}")
    yield env
    server.stop()


def test_s3_source_gives_the_same_index(cluster, s3, local_index, tmp_path):
    out = tmp_path / "s3"
    text = _finish(_index("s3://photos/set1", out, "--ray-address", cluster, env={**ENV, **s3}))
    assert f"indexed {N} images, skipped 1" in text
    # each embedding actor says where it ran (a GPU actor: which card), and the counts cover every image
    where = re.findall(r"(\S+: cpu, \d+ threads) \((\d+) images\)", text.split("ray: embedded on ", 1)[1])
    assert where and sum(int(n) for _, n in where) == N + 1, text
    assert_same_index(out, local_index)
    assert Index.open(out, device="cpu").manifest.settings.root == "s3://photos/set1"


def test_a_missing_s3_prefix_is_a_clear_error(s3, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cbir", "index", "s3://nobucket/x", "--out", str(tmp_path / "o")],
                          env={**ENV, **s3}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "s3://nobucket/x" in proc.stderr and "Traceback" not in proc.stderr


def test_vectors_are_l2_normalised_float32(cluster, folder, tmp_path):
    out = tmp_path / "ray"
    _finish(_index(str(folder), out, "--ray-address", cluster))
    v = Index.open(out, device="cpu").rows().vectors
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_on_disk_shards_filled_by_ray_tasks_match_local(cluster, tmp_path):
    from cbir.search import ondisk
    from cbir.search import store as store_mod
    from cbir.search.plan import ONDISK, SearchPlan
    from cbir.search.searcher import VectorSearch
    from indexer import distributed

    n, dim = ondisk.MIN_VECTORS, 16
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    writer = store_mod.VectorWriter(tmp_path / "vectors.h5", dim, {"vector_dtype": "float16"}, dtype="float16",
                                    rows=n)
    zeros = np.zeros(n, np.int64)
    writer.append(x.astype(np.float16), [f"{i}.jpg" for i in range(n)], zeros, zeros, ids=range(n))
    writer.close({"ids_are_rows": True})
    engine = distributed.connect(cluster)
    try:
        (tmp_path / "ray").mkdir()
        ondisk.build(tmp_path / "vectors.h5", tmp_path / "ray" / "faiss.index", tmp_path / "ray", shard_rows=n // 4,
                     mapper=engine.map)
    finally:
        engine.close()
    (tmp_path / "here").mkdir()
    ondisk.build(tmp_path / "vectors.h5", tmp_path / "here" / "faiss.index", tmp_path / "here", shard_rows=n // 4)
    plan = SearchPlan(ONDISK, {"nprobe": 16, "k_factor": 4})
    x16 = x.astype(np.float16).astype(np.float32)
    found = [VectorSearch(ondisk.load(tmp_path / d / "faiss.index"), plan, exact_rows=lambda ids: x16[ids])
             .search(x[:100], 10)[1] for d in ("ray", "here")]
    np.testing.assert_array_equal(found[0], found[1])


def test_a_ray_address_where_nothing_listens_is_a_quick_clear_error(folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cbir", "index", str(folder), "--out", str(tmp_path / "o"),
                           "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "-q"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 30
    assert not (tmp_path / "o" / "manifest.json").exists()

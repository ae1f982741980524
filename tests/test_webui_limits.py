"""Uploads over the limit get the JSON 413 with its message from every client, not a connection reset."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cbir import Index

MB = 1024 * 1024


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, samples: Path, start_server) -> str:
    out = tmp_path_factory.mktemp("limits") / "sample"
    Index.build(samples / "cat", out=out, device="cpu")
    return start_server([out])  # the default limit, 20 MB, as `cbir serve` has it


@pytest.mark.parametrize("size_mb", [21, 60])
def test_urllib_gets_the_json_413(url: str, size_mb: int) -> None:
    req = urllib.request.Request(f"{url}/api/search", data=b"\xff" * (size_mb * MB),
                                 headers={"Content-Type": "image/jpeg"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 413
    body = json.loads(info.value.read())
    assert body["status"] == 413 and "too large" in body["error"] and "20 MB" in body["error"]


@pytest.mark.parametrize("size_mb", [21, 60])
def test_requests_gets_the_json_413(url: str, size_mb: int) -> None:
    requests = pytest.importorskip("requests")
    resp = requests.post(f"{url}/api/search", files={"image": ("big.jpg", b"\xff" * (size_mb * MB), "image/jpeg")},
                         timeout=60)
    assert resp.status_code == 413
    assert "too large" in resp.json()["error"]


def test_a_huge_declared_body_is_refused_at_once_and_others_are_served(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 10737418240\r\n\r\n")  # 10 GB declared, nothing sent
        reply = s.recv(4096).decode(errors="replace")
    assert time.monotonic() - started < 1.0
    assert reply == "" or reply.split(" ", 2)[1] == "413", reply[:200]
    with urllib.request.urlopen(f"{url}/api/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"

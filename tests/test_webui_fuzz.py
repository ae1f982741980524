"""Bounded fuzzing of the upload API on a real server (waitress on 127.0.0.1): no 500s, no crash,
bounded memory."""

from __future__ import annotations

import http.client
import random
import socket
import time
from pathlib import Path

import pytest

from cbir import Index
from tests.badfiles import bomb_png, jpeg_bytes, photo

REQUESTS = 160
BUDGET_S = 90
LIMIT = 1024 * 1024
GOOD_K = ("10", "3", "")
# What each kind of upload may get back, with a valid k (any bad k: 400, or 413 for a body over the limit).
ALLOWED = {"random bytes": {400}, "truncated": {200, 400}, "wrong type": {415}, "malformed multipart": {200, 400},
           "bit flips": {200, 400}, "bomb": {400}, "too big": {413}, "valid": {200}}


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, samples: Path, start_server) -> int:
    out = tmp_path_factory.mktemp("fuzz") / "sample"
    Index.build(samples / "cat", out=out, device="cpu")
    url = start_server([out], MAX_CONTENT_LENGTH=LIMIT)
    return int(url.rsplit(":", 1)[1])


def cases(rng: random.Random) -> list[tuple[str, dict[str, str], bytes]]:
    good = jpeg_bytes(photo(seed=1))
    out: list[tuple[str, dict[str, str], bytes]] = []
    for _ in range(REQUESTS):
        kind = rng.randrange(8)
        if kind == 0:
            body = rng.randbytes(rng.randrange(0, 5000))
            out.append(("random bytes", {"Content-Type": rng.choice(["image/jpeg", "image/png", "image/webp"])}, body))
        elif kind == 1:
            out.append(("truncated", {"Content-Type": "image/jpeg"}, good[: rng.randrange(1, len(good))]))
        elif kind == 2:
            out.append(("wrong type", {"Content-Type": rng.choice(["text/plain", "application/json", "x/y", ""])},
                        good))
        elif kind == 3:
            b = "b" + str(rng.randrange(10**6))
            parts = [f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n".encode(),
                     good[: rng.randrange(len(good))], rng.choice([f"\r\n--{b}--\r\n".encode(), b"", b"--\r\n"])]
            ctype = rng.choice([f"multipart/form-data; boundary={b}", "multipart/form-data",
                                "multipart/form-data; boundary=other"])
            out.append(("malformed multipart", {"Content-Type": ctype}, b"".join(parts)))
        elif kind == 4:
            flipped = bytearray(good)
            for _ in range(20):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            out.append(("bit flips", {"Content-Type": "image/jpeg"}, bytes(flipped)))
        elif kind == 5:
            out.append(("bomb", {"Content-Type": "image/png"}, bomb_png(rng.randrange(15000, 40000), 20000)))
        elif kind == 6:
            out.append(("too big", {"Content-Type": "image/jpeg"}, b"\xff" * (LIMIT + rng.randrange(1, 10**5))))
        else:
            out.append(("valid", {"Content-Type": "image/jpeg"}, good))
    return out


def test_fuzzed_uploads_never_500_and_memory_stays_bounded(server: int) -> None:
    rng = random.Random(1234)
    start_rss = None
    seen: dict[tuple[str, bool], set[int]] = {}
    deadline = time.monotonic() + BUDGET_S
    for i, (name, headers, body) in enumerate(cases(rng)):
        assert time.monotonic() < deadline, "fuzzing took too long"
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
        k = rng.choice([*GOOD_K, "0", "-1", "abc", "100000"])
        try:
            conn.request("POST", f"/api/search?k={k}", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        finally:
            conn.close()
        seen.setdefault((name, k in GOOD_K), set()).add(status)
        if i == 20:
            start_rss = rss_mb()
    assert start_rss is not None and rss_mb() - start_rss < 300
    assert {name for name, good in seen if good} == set(ALLOWED), "every kind must be drawn with a valid k"
    for (name, good_k), statuses in seen.items():
        allowed = ALLOWED[name] if good_k else {400, 413}
        assert statuses <= allowed, (name, "k ok" if good_k else "bad k", statuses)


def test_huge_declared_size_is_refused_without_reading_it(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=30) as s:
        s.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 1000000000000\r\n\r\nshort body")
        reply = s.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") or reply.startswith("HTTP/1.0 413"), reply[:200]
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    conn.request("GET", "/api/health")
    assert conn.getresponse().status == 200  # still alive

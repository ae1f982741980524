"""The production server for the app (waitress), set up so that every client gets its answer.

An upload over MAX_CONTENT_LENGTH must get the JSON 413, not a reset: if the server stopped reading at the
limit and closed, a client still sending its body (urllib, requests: anything without `Expect: 100-continue`)
would see "connection reset" and never read the answer. So waitress takes bodies up to a hard cap well above
the limit (buffered to a temporary file, not memory), the app answers 413 once the body is in, and only a body
declared above the cap is refused at once, before it is read, with the connection closed.
"""

from __future__ import annotations

from flask import Flask
from waitress import create_server
from waitress.server import BaseWSGIServer

from cbir.errors import CbirError

CAP_FACTOR = 4  # read up to 4x the upload limit ...
CAP_MIN_EXTRA = 64 * 1024 * 1024  # ... and at least 64 MB over it, then stop reading


def body_cap(limit: int) -> int:
    """The largest request body the server reads in order to answer it (with a 413 when over `limit`)."""
    return max(CAP_FACTOR * limit, limit + CAP_MIN_EXTRA)


def check_port(port: int) -> None:
    """Refuse a port outside 0-65535: the socket layer would take 99999 modulo 65536 and serve on 34463, unsaid."""
    if not 0 <= port <= 65535:
        raise CbirError(f"--port {port} is not a TCP port: give one from 1 to 65535 (0: any free port)")


def make_server(app: Flask, host: str = "127.0.0.1", port: int = 5000, threads: int = 8) -> BaseWSGIServer:
    """A waitress server for `app` (port 0: any free port, see `.effective_port`); `.run()` serves."""
    check_port(port)
    return create_server(app, host=host, port=port, threads=threads,
                         max_request_body_size=body_cap(int(app.config["MAX_CONTENT_LENGTH"])))

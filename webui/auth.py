"""Access control: with a token set, every page, API call, image and thumbnail needs it.

The token comes as `Authorization: Bearer TOKEN` (scripts) or from a small login form that sets an HttpOnly,
SameSite=Strict cookie (people). The cookie holds an HMAC of the token, never the token itself; every comparison
is in constant time; the token never travels in a URL, so it never reaches a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from flask import Blueprint, Flask, current_app, jsonify, redirect, render_template, request

COOKIE = "cbir_session"
OPEN = ("auth.login", "static", "pages.favicon")  # what a person needs to reach the login form

auth = Blueprint("auth", __name__)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _session_value(token: str) -> str:
    return hmac.new(token.encode(), b"cbir-session-v1", hashlib.sha256).hexdigest()


def authorised() -> bool:
    token = current_app.config.get("TOKEN")
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return hmac.compare_digest(cookie.encode(), _session_value(token).encode())


def _guard():
    if request.endpoint in OPEN or authorised():
        return None
    if request.path.startswith("/api/"):
        return jsonify(error="this server needs a token: send Authorization: Bearer TOKEN", status=401), 401
    if request.path in ("/", "/compare"):
        return render_template("login.html", error=None), 401
    return "401 Unauthorized: log in at /login", 401


@auth.route("/login", methods=["GET", "POST"])
def login():
    token = current_app.config.get("TOKEN")
    if request.method == "GET":
        return render_template("login.html", error=None), (200 if token else 404)
    given = request.form.get("token", "")
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return render_template("login.html", error="That token is not right."), 401
    resp = redirect("/", code=303)
    resp.set_cookie(COOKIE, _session_value(token), httponly=True, samesite="Strict", secure=request.is_secure,
                    max_age=30 * 24 * 3600)
    return resp


def install(app: Flask) -> None:
    app.register_blueprint(auth)
    app.before_request(_guard)

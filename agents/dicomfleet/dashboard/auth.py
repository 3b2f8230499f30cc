"""Log users in to the dashboard: one login user, signed session cookies, HTTP basic auth for tools.

Pages need a session; the JSON API and /metrics also take HTTP basic auth so
``dicomfleet status`` and Prometheus can read them. Repeated failed logins
from one address are refused for a while.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import threading
import time

from flask import request, session
from flask.sessions import SecureCookieSessionInterface

from dicomfleet.agent.repeats import RepeatedProblems

log = logging.getLogger(__name__)

MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0


class ForwardedSchemeSessions(SecureCookieSessionInterface):
    """Signed cookie sessions whose Secure flag follows the request's scheme.

    Behind a TLS reverse proxy the scheme comes from X-Forwarded-Proto, which
    the proxy middleware applies only for trusted proxy addresses.
    """

    def get_cookie_secure(self, app) -> bool:
        return request.is_secure


class LoginGuard:
    """Checks the login user's password and throttles addresses that keep failing; thread-safe."""

    def __init__(self, login: str, password: str):
        self.login = login
        self._password = password
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}
        self.problems = RepeatedProblems(log)

    def locked_out(self, address: str) -> bool:
        """Return True while ADDRESS failed MAX_FAILURES times within FAILURE_WINDOW_S."""
        now = time.monotonic()
        with self._lock:
            recent = [moment for moment in self._failures.get(address, []) if now - moment < FAILURE_WINDOW_S]
            if recent:
                self._failures[address] = recent
            else:
                self._failures.pop(address, None)
            return len(recent) >= MAX_FAILURES

    def check(self, user: str, password: str, address: str) -> bool:
        """Return True when USER and PASSWORD are the login's; log and count a failure otherwise."""
        user_ok = hmac.compare_digest(user.encode("utf-8"), self.login.encode("utf-8"))
        password_ok = hmac.compare_digest(password.encode("utf-8"), self._password.encode("utf-8"))
        if user_ok and password_ok:
            with self._lock:
                self._failures.pop(address, None)
            self.problems.clear(("login", address), f"Login from {address} succeeded after failures.")
            return True

        with self._lock:
            self._failures.setdefault(address, []).append(time.monotonic())
        self.problems.report(("login", address), f"Failed dashboard login for user {user[:40]!r} from {address}.")
        return False


def basic_credentials() -> tuple[str, str] | None:
    """Return the user and password of the request's HTTP basic auth header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, separator, password = decoded.partition(":")
    if not separator:
        return None
    return user, password


def start_session(user: str) -> None:
    """Mark the current session as logged in as USER, with a fresh CSRF token."""
    session.clear()
    session["user"] = user
    session["login_at"] = time.time()
    session["csrf"] = secrets.token_urlsafe(24)
    session.permanent = True


def session_user(lifetime_s: float) -> str | None:
    """Return the logged-in user of the current session, or None when there is none or it expired."""
    user = session.get("user")
    login_at = session.get("login_at")
    if not isinstance(user, str) or not isinstance(login_at, (int, float)):
        return None
    if time.time() - login_at > lifetime_s:
        return None
    return user


def csrf_token() -> str:
    """Return the session's CSRF token, creating one for an anonymous session (the login form)."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        session["csrf"] = token
    return token


def csrf_valid(submitted: str | None) -> bool:
    """Return True when SUBMITTED is the session's CSRF token."""
    token = session.get("csrf")
    if not isinstance(token, str) or not submitted:
        return False
    return hmac.compare_digest(token.encode("utf-8"), submitted.encode("utf-8"))

"""The dashboard's web application: login, fleet page, machine page, thumbnails, heartbeats, JSON and metrics.

Pages are rendered on the server; the only script is the browser's own
refresh. ``create_app`` takes a Runtime holding everything the routes read.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import threading
import urllib.parse

import pymongo.errors
from flask import Flask, Response, abort, jsonify, redirect, render_template, request, session, url_for
from werkzeug.middleware.proxy_fix import ProxyFix

from dicomfleet import __version__
from dicomfleet.agent.repeats import RepeatedProblems
from dicomfleet.dashboard import auth, fleet, metrics, timefmt
from dicomfleet.dashboard import state as states
from dicomfleet.dashboard.config import DashboardConfig
from dicomfleet.dashboard.heartbeats import (
    HeartbeatBook,
    HeartbeatRejected,
    bearer_token,
    check_token,
    parse_heartbeat,
)
from dicomfleet.dashboard.orthanc import OrthancWatch, PreviewCache, PreviewUnavailable
from dicomfleet.dashboard.studies import ActivityWatch, MachineActivity, StudyIndex

log = logging.getLogger(__name__)

HEARTBEAT_PATH = "/api/v1/heartbeats/"
# Requests other than heartbeats (the login form above all) are small.
MAX_REQUEST_BYTES = 64 * 1024

NO_PREVIEW_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96" viewBox="0 0 96 96">'
    '<rect width="96" height="96" fill="#222"/>'
    '<text x="48" y="52" fill="#aaa" font-family="sans-serif" font-size="11" text-anchor="middle">'
    'no preview</text></svg>'
)


@dataclasses.dataclass
class Runtime:
    """Everything the routes read: configuration, secrets, heartbeats, studies and Orthanc."""

    config: DashboardConfig
    guard: auth.LoginGuard
    session_key: str
    book: HeartbeatBook
    studies: StudyIndex
    orthanc: OrthancWatch
    previews: PreviewCache
    # The background study counts; None runs the aggregation for every view.
    activity: ActivityWatch | None = None
    problems: RepeatedProblems = dataclasses.field(default_factory=lambda: RepeatedProblems(log))

    def _activity(self, now: datetime.datetime) -> tuple[dict[str, MachineActivity], datetime.datetime | None,
                                                          str | None]:
        if self.activity is not None:
            snapshot = self.activity.snapshot()
            return snapshot.activity, snapshot.taken_at, snapshot.error

        try:
            activity = self.studies.activity(fleet.day_start(now))
        except pymongo.errors.PyMongoError as exception:
            error = f"MongoDB does not answer, so study counts are missing: {exception}"
            self.problems.report("studies", error)
            return {}, None, error
        self.problems.clear("studies", "MongoDB answers the study queries again.")
        return activity, now, None

    def view(self) -> tuple[fleet.FleetView, str | None]:
        """Return the fleet view now, and why study counts are missing or old when MongoDB failed."""
        now = fleet.local_now(self.config)
        activity, counted_at, error = self._activity(now)
        view = fleet.build_view(self.config, self.book.latest(), activity, self.orthanc.snapshot(), now,
                                counted_at)
        return view, error


class TrustedProxies:
    """WSGI middleware that applies X-Forwarded-For, -Proto, -Host, -Port and -Prefix only from trusted addresses."""

    def __init__(self, app, trusted: tuple[str, ...]):
        self.app = app
        self.trusted = frozenset(trusted)
        self.forwarded = ProxyFix(app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)

    def __call__(self, environ, start_response):
        if environ.get("REMOTE_ADDR") in self.trusted:
            return self.forwarded(environ, start_response)
        return self.app(environ, start_response)


def _local_path(target: str | None) -> str | None:
    """Return TARGET when it is a path on this site (no scheme, no host), else None."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def create_app(runtime: Runtime) -> Flask:
    """Return the dashboard's Flask application for RUNTIME."""
    config = runtime.config
    app = Flask(__name__)
    app.secret_key = runtime.session_key
    app.session_interface = auth.ForwardedSchemeSessions()
    app.config.update(
        SESSION_COOKIE_NAME="dicomfleet_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=config.session_lifetime_s),
        MAX_CONTENT_LENGTH=max(MAX_REQUEST_BYTES, config.max_heartbeat_bytes * 4),
    )
    app.wsgi_app = TrustedProxies(app.wsgi_app, config.trusted_proxies)  # type: ignore[method-assign]
    zone = config.zone()
    rejections = RepeatedProblems(log)
    open_rejections: dict[str, set] = {}
    rejection_lock = threading.Lock()

    @app.template_filter("duration")
    def duration_filter(seconds):
        return timefmt.duration(seconds)

    @app.template_filter("size")
    def size_filter(number):
        return timefmt.size(number)

    @app.template_filter("moment")
    def moment_filter(value, now=None):
        return timefmt.moment(value, zone, now)

    @app.context_processor
    def globals_for_templates():
        return {"site": config.site, "version": __version__, "user": auth.session_user(config.session_lifetime_s),
                "csrf_token": auth.csrf_token}

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                    "frame-ancestors 'none'; form-action 'self'")
        if request.path.startswith(("/fleet", "/machines", "/api/", "/metrics")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def page_login_required(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            if auth.session_user(config.session_lifetime_s) is None:
                target = request.script_root + request.full_path.rstrip("?")
                return redirect(url_for("login", next=target, _external=True))
            return view(*args, **kwargs)
        return wrapped

    def tool_login_required(view):
        """Accept a session or HTTP basic auth; respond 401 with a Basic challenge otherwise."""
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            if auth.session_user(config.session_lifetime_s) is not None:
                return view(*args, **kwargs)
            address = request.remote_addr or "-"
            if runtime.guard.locked_out(address):
                return jsonify(error="too many failed logins from this address; wait five minutes"), 429
            credentials = auth.basic_credentials()
            if credentials is not None and runtime.guard.check(*credentials, address):
                return view(*args, **kwargs)
            answer = jsonify(error="log in with the dashboard's user (HTTP basic auth)")
            answer.status_code = 401
            answer.headers["WWW-Authenticate"] = 'Basic realm="dicomfleet dashboard", charset="UTF-8"'
            return answer
        return wrapped

    @app.route("/")
    def index():
        return redirect(url_for("fleet_page", _external=True))

    @app.route("/healthz")
    def health():
        return jsonify(status="ok", version=__version__)

    @app.route("/login", methods=["GET", "POST"])
    def login():
        target = _local_path(request.values.get("next")) or url_for("fleet_page")
        error = None
        status = 200
        if request.method == "POST":
            address = request.remote_addr or "-"
            if not auth.csrf_valid(request.form.get("csrf")):
                error = "The login form expired; please log in again."
                status = 400
            elif runtime.guard.locked_out(address):
                error = "Too many failed logins from this address; wait five minutes and try again."
                status = 429
            elif runtime.guard.check(request.form.get("user", ""), request.form.get("password", ""), address):
                auth.start_session(config.login)
                log.info("User %s logged in from %s.", config.login, address)
                return redirect(request.host_url.rstrip("/") + target)
            else:
                error = "Wrong user name or password."
                status = 401
        return render_template("login.html", error=error, next=target), status

    @app.route("/logout", methods=["POST"])
    def logout():
        if auth.csrf_valid(request.form.get("csrf")):
            log.info("User %s logged out.", session.get("user"))
            session.clear()
        return redirect(url_for("login", _external=True))

    @app.route("/fleet")
    @page_login_required
    def fleet_page():
        view, error = runtime.view()
        rows = sorted(view.rows, key=lambda row: (-states.SEVERITY[row.judgement.state], row.machine.id))
        return render_template("fleet.html", view=view, rows=rows, error=error, states=states,
                               heartbeat_age=fleet.heartbeat_age)

    @app.route("/machines/<machine_id>")
    @page_login_required
    def machine_page(machine_id: str):
        machine = config.machine(machine_id)
        if machine is None:
            abort(404)
        view, error = runtime.view()
        (row,) = [candidate for candidate in view.rows if candidate.machine.id == machine_id]
        try:
            recent = runtime.studies.recent(machine_id)
        except pymongo.errors.PyMongoError as exception:
            error = f"MongoDB does not answer, so recent studies are missing: {exception}"
            recent = []
        return render_template("machine.html", view=view, row=row, machine=machine, recent=recent, error=error,
                               orthanc_ui=config.orthanc.public_url + "/app/explorer.html#study?uuid=",
                               heartbeat_age=fleet.heartbeat_age)

    @app.route("/thumbnails/<study_id>.png")
    @page_login_required
    def thumbnail(study_id: str):
        try:
            image = runtime.previews.preview(study_id)
        except PreviewUnavailable:
            response = Response(NO_PREVIEW_SVG, mimetype="image/svg+xml")
            response.headers["Cache-Control"] = "private, max-age=300"
            return response
        response = Response(image, mimetype="image/png")
        response.headers["Cache-Control"] = "private, max-age=86400"
        return response

    @app.route("/api/v1/fleet")
    @tool_login_required
    def fleet_json():
        view, error = runtime.view()
        document = view.to_json()
        document["error"] = error
        return jsonify(document)

    @app.route("/metrics")
    @tool_login_required
    def metrics_text():
        text = metrics.render_metrics(lambda: runtime.view()[0], runtime.book)
        return Response(text, mimetype="text/plain; version=0.0.4; charset=utf-8")

    def reject(rejected: HeartbeatRejected, machine_label: str, address: str):
        runtime.book.count_rejection(str(rejected.status))
        key = (rejected.status, machine_label, address)
        with rejection_lock:
            open_rejections.setdefault(machine_label, set()).add(key)
        rejections.report(key, f"Rejected a heartbeat for machine {machine_label} from {address} with HTTP "
                               f"{rejected.status}: {rejected.reason}.")
        answer = jsonify(error=rejected.reason)
        answer.status_code = rejected.status
        if rejected.status == 401:
            answer.headers["WWW-Authenticate"] = 'Bearer realm="dicomfleet heartbeats"'
        return answer

    @app.route(HEARTBEAT_PATH + "<machine_id>", methods=["POST"])
    def heartbeat(machine_id: str):
        address = request.remote_addr or "-"
        label = machine_id[:40] if machine_id.isprintable() else repr(machine_id[:40])
        received_at = datetime.datetime.now(datetime.timezone.utc)

        try:
            machine = config.machine(machine_id)
            if machine is None or not machine.sends_heartbeats:
                raise HeartbeatRejected(404, "no machine with this id sends heartbeats at this site; "
                                             "check the agent's configuration against the inventory")
            if not check_token(machine, bearer_token(request.headers.get("Authorization"))):
                raise HeartbeatRejected(401, "missing or wrong heartbeat token for this machine")
            length = request.content_length
            if length is not None and length > config.max_heartbeat_bytes:
                raise HeartbeatRejected(413, f"the body has {length} bytes, over the maximum of "
                                             f"{config.max_heartbeat_bytes}")
            if request.mimetype != "application/json":
                raise HeartbeatRejected(415, "the body must be JSON sent as application/json")
            raw = request.stream.read(config.max_heartbeat_bytes + 1)
            if len(raw) > config.max_heartbeat_bytes:
                raise HeartbeatRejected(413, f"the body is over the maximum of {config.max_heartbeat_bytes} bytes")
            parsed = parse_heartbeat(machine, raw, address, received_at)
        except HeartbeatRejected as rejected:
            return reject(rejected, label, address)

        day = received_at.astimezone(zone).date().isoformat()
        runtime.book.record(parsed, day)
        with rejection_lock:
            cleared = open_rejections.pop(machine.id, set())
        for key in cleared:
            rejections.clear(key, f"Machine {machine.id} sends accepted heartbeats again.")
        log.debug("Heartbeat from machine %s (%s): %d queued, %d failed.", machine.id, address,
                  parsed.files_queued, parsed.files_failed)
        return jsonify(accepted=True, machine=machine.id)

    @app.errorhandler(404)
    def not_found(_error):
        if request.path.startswith("/api/"):
            return jsonify(error="not found"), 404
        return render_template("error.html", message="This page does not exist."), 404

    @app.errorhandler(413)
    def too_large(_error):
        return jsonify(error=f"the request body is over the maximum of {app.config['MAX_CONTENT_LENGTH']} bytes"), 413

    @app.errorhandler(405)
    def wrong_method(_error):
        return jsonify(error=f"{request.method} is not allowed here"), 405

    return app

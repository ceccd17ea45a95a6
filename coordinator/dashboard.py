"""The coordinator's read-only web dashboard and Prometheus ``/metrics`` (Starlette on uvicorn,
in a background thread). ``/`` is one page with no build step; it follows ``/events``
(server-sent events: the state whenever it changes, at least every 15 s). ``/api/state`` is the
same state as JSON. On loopback no token is needed; anywhere else one is (``Authorization:
Bearer TOKEN`` or ``?token=TOKEN``), generated when none is given."""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources

from cahfp.errors import CAHFPError
from coordinator.monitor import Monitor

PUSH_INTERVAL = 0.5  # seconds: events closer together reach a page as one update


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``PORT``, on loopback) as a host and a port; one line when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        msg = f"--dashboard expects HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}"
        raise CAHFPError(msg) from None
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(monitor: Monitor, token: str | None):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import HTMLResponse, Response, StreamingResponse
    from starlette.routing import Route

    page = resources.files("coordinator").joinpath("dashboard.html").read_text()

    async def index(request):
        return HTMLResponse(page)

    memo: dict = {}

    def cached() -> tuple[int, str]:
        """The state as JSON, made at most once per change and per second (however many pages
        and scrapers ask): the rounds' thread is not held up by serialising it."""
        now = time.monotonic()
        if memo.get("version") != monitor.version or now - memo.get("at", 0.0) > 1.0:
            snap = monitor.snapshot()
            memo.update(version=snap["version"], at=now, text=json.dumps(snap))
        return memo["version"], memo["text"]

    async def state(request):
        return Response(cached()[1], media_type="application/json")

    async def metrics(request):
        monitor.snapshot()  # refreshes the boards-online gauge
        return Response(generate_latest(monitor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def events(request):
        import anyio

        async def stream():
            while True:
                version, text = cached()
                yield f"data: {text}\n\n"
                await anyio.to_thread.run_sync(monitor.wait, version, 15.0)
                await anyio.sleep(PUSH_INTERVAL)  # a burst of events goes out as one
                if await request.is_disconnected():
                    return

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    class TokenCheck(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            given = request.query_params.get("token", "")
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return Response("a dashboard token is needed (?token=...)\n", status_code=401)
            return await call_next(request)

    middleware = [Middleware(TokenCheck)] if token else []
    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/events", events),
        Route("/metrics", metrics),
    ]
    return Starlette(routes=routes, middleware=middleware)


@dataclass
class Dashboard:
    """A running dashboard: its URL (with the token) and how to stop it."""

    url: str
    token: str | None
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(monitor: Monitor, address: str, token: str | None = None) -> Dashboard:
    """Start the dashboard on ``address`` (``HOST:PORT``; port 0 picks a free one). Off
    loopback a token is required: ``token``, else a new random one."""
    import uvicorn

    host, port = parse_address(address)
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    config = uvicorn.Config(
        make_app(monitor, token),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,  # open event streams do not hold the shutdown
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="cahfp-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise CAHFPError(f"the dashboard could not listen on {host}:{port} (in use?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    return Dashboard(url, token, server, thread)

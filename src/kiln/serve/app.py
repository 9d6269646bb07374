"""`kiln serve`: the FastAPI app (create_app) and the uvicorn server around it.

Middleware, outermost first: access log with X-Request-Id (JSON lines), API keys (fail-closed), body
size limit. Probes: /health is live as soon as the process answers; /ready is 503 until every model is
loaded and warmed up, and again while draining. SIGTERM stops admitting (503), lets in-flight requests
finish within --drain-timeout, ends the rest with finish_reason "abort", and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.errors import InvalidParameterError, KilnError
from kiln.serve.auth import ApiKeyMiddleware, load_digests
from kiln.serve.deploy import Router
from kiln.serve.limits import BodyLimitMiddleware
from kiln.serve.protocol import error_body, error_code
from kiln.serve.registry import Registry, Version
from kiln.serve.routes import ApiError, engine_stopped_error, router
from kiln.serve.state import ServeConfig, ServerState
from kiln.serve.worker import EngineStopped

access_log = logging.getLogger("kiln.access")


MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rb"[\x20-\x7e]{1,%d}" % MAX_REQUEST_ID_CHARS)


def _request_id(sent: bytes) -> tuple[str, str | None]:
    """The request's id, and the client's X-Request-Id when it was refused (to log beside the id that replaced it).
    A sent id is echoed byte for byte when it is 1 to MAX_REQUEST_ID_CHARS printable ASCII characters; any other
    (non-ASCII, control characters, too long) is replaced by a generated one, whole: an id cut short or re-encoded
    would match no log line of the client's or a proxy's."""
    if not sent:
        return uuid.uuid4().hex, None
    if _REQUEST_ID.fullmatch(sent):
        return sent.decode("ascii"), None
    return uuid.uuid4().hex, sent.decode("utf-8", "backslashreplace")[:MAX_REQUEST_ID_CHARS]


class AccessLogMiddleware:
    """One JSON line per request on stderr, and the request id echoed in X-Request-Id (the client's, or one generated
    when it sent none or one that cannot be echoed as it is: see _request_id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent_id = next((v for k, v in reversed(scope["headers"]) if k.lower() == b"x-request-id"), b"")
        request_id, refused_id = _request_id(sent_id)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state = scope.get("state", {})
            access_log.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "request_id": request_id, "method": scope["method"],
                "path": scope["path"], "status": status, "ms": round(1000 * (time.perf_counter() - start), 1),
                "key": state.get("key_id"), "client": scope["client"][0] if scope.get("client") else None,
                **({"refused_request_id": refused_id} if refused_id is not None else {}),
            }))


class HeadAsGetMiddleware:
    """HEAD answered as GET is, without the body, on every route that answers GET: load balancers probe /health and
    /ready with HEAD, and FastAPI's routes answer only the methods they name (405 for HEAD). The headers, its
    Content-Length included, are GET's, as HTTP asks of HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        # the state dict is shared, so what the inner middleware put in it (the API key's id) reaches the access log
        # (and the method sent is kept, for a refusal to name it)
        await self.app({**scope, "method": "GET", "state": scope.setdefault("state", {}), "kiln.sent_method": "HEAD"},
                       receive, without_body)


def _param_of(error: dict[str, Any]) -> str | None:
    context = error.get("ctx", {})
    if "param" in context:  # a check of the whole body names the place it found wrong (None: the body itself)
        return str(context["param"]) if context["param"] is not None else None
    location = [str(p) for p in error.get("loc", ()) if p != "body"]
    return ".".join(location) or None


def _message_of(error: dict[str, Any]) -> str:
    """The error's own sentence: a ValueError raised in one of our validators is the message alone, without the
    "Value error, " that pydantic puts before it."""
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ") if error.get("type") == "value_error" else message


_JSON_KINDS = {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean", int: "a JSON number",
               float: "a JSON number", type(None): "JSON null"}


def _whole_body_error(error: dict[str, Any], content_type: str | None) -> tuple[int, str, str] | None:
    """Status, message and code of a refusal of the body as a whole, which pydantic words as a refusal of a field
    named "body" ("body: Input should be a valid dictionary or object to extract fields from"): a body that was not
    read as JSON for its Content-Type (curl -d sends a form's), an empty one, or JSON that is not an object. None
    for an error in a field."""
    if tuple(error.get("loc", ())) != ("body",):
        return None
    value = error.get("input")
    if isinstance(value, bytes):  # FastAPI reads JSON only under a JSON Content-Type; this is the raw body
        sent = f"its Content-Type is {content_type!r}" if content_type else "it has no Content-Type"
        return 415, f"the body was not read as JSON, as {sent}; send it with Content-Type: application/json", \
            "unsupported_media_type"
    if error.get("type") == "missing":
        return 400, "the body is empty; send one JSON object", "invalid_json"
    kind = _JSON_KINDS.get(type(value))
    if kind is not None:
        return 400, f"the body is {kind}, not an object; send one JSON object", "invalid_json"
    return None


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """Why the body could not be read as JSON, when FastAPI's reading of it failed for a reason other than its syntax
    (answered with a generic "There was an error parsing the body", the real error as its cause): bytes that are not
    UTF-8, or arrays and objects nested deeper than the parser recurses. None for any other HTTP error."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (f"the body is not valid UTF-8 (byte {cause.start} is 0x{cause.object[cause.start]:02x}); send JSON "
                "encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return "the body's JSON nests arrays or objects too deeply to be read; send a flatter JSON object"
    return None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        whole = _whole_body_error(first, request.headers.get("content-type"))
        if whole is not None:
            status, message, code = whole
            return JSONResponse(error_body(message, "invalid_request_error", None, code), status)
        if first.get("type") == "json_invalid":  # its location is the character where the JSON broke, not a field
            where = first.get("loc", ("body", "?"))[-1]
            return JSONResponse(error_body(f"the body is not valid JSON (it breaks at character {where}); send one "
                                           "JSON object", "invalid_request_error", None, "invalid_json"), 400)
        param = _param_of(first)
        # the message is built from the error's fields, never str(exc), so nothing internal leaks
        message = f"{param or 'body'}: {_message_of(first)}" if first else "invalid request body"
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(KilnError)
    async def kiln_error(_: Request, exc: KilnError) -> JSONResponse:
        # the field at fault, when the error names one (a rating out of range): clients show it beside that field
        param = exc.param if isinstance(exc, InvalidParameterError) else None
        return JSONResponse(error_body(str(exc), "invalid_request_error", param, error_code(exc)), 400)

    @app.exception_handler(EngineStopped)
    async def engine_stopped(_: Request, exc: EngineStopped) -> JSONResponse:
        return engine_stopped_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unreadable = _unreadable_body(exc)
        if unreadable is not None:
            return JSONResponse(error_body(unreadable, "invalid_request_error", None, "invalid_json"), 400)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            return JSONResponse(error_body(f"there is no {request.url.path[:200]} here; the API's routes are "
                                           f"{', '.join(API_ROUTES)}", "not_found_error", code="unknown_route"), 404)
        if exc.status_code == 405:
            allowed = (headers or {}).get("Allow", (headers or {}).get("allow", ""))
            method = request.scope.get("kiln.sent_method", request.method)  # HEAD, not the GET it was answered as
            return JSONResponse(error_body(f"{method} is not allowed on {request.url.path}; use "
                                           f"{allowed or 'another method'}", "invalid_request_error",
                                           code="method_not_allowed"), 405, headers)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code, headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("kiln.serve").exception("unhandled error")
        return JSONResponse(error_body("internal error; the server log has the details", "server_error"), 500)


def create_app(config: ServeConfig) -> FastAPI:
    registry = Registry() if config.registry else None
    state = ServerState(config=config, router=Router(config.engine(), config.precision, registry, config.runtime,
                                                                (config.draft, config.speculate)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state))
        loader.add_done_callback(lambda task: _keep_load_error(state, task))
        follower = asyncio.create_task(_follow_registry(state)) if registry else None
        try:
            yield
        finally:
            state.draining = True
            for task in (loader, follower):
                if task is not None:
                    task.cancel()
            state.router.stop()

    app = FastAPI(title="kiln", version="1", lifespan=lifespan)
    app.state.kiln = state
    if config.guardrails:
        from kiln.serve.guardrails import GuardrailConfigError, load_guardrails

        # the registry's names (those it has versions of, live or not) when it says what is served
        served = sorted({v.name for v in registry.versions()}) if registry else list(config.models)
        for spec in config.guardrails:  # FILE for every model, or NAME=FILE for one
            name, _, path = spec.rpartition("=") if "=" in spec else ("*", "", spec)
            if name != "*" and name not in served:
                # a misspelt NAME left its model without the filters the operator asked for, without a word
                how = ("a name the registry has versions of (`kiln registry list`)" if registry else "a -m value")
                raise GuardrailConfigError(f"--guardrails {spec!r} names model {name!r}, which is not served (models: "
                                           f"{', '.join(served) or 'none'}); use {how} as NAME, or FILE for all")
            state.guardrails[name] = load_guardrails(Path(path))
    if config.log_requests:
        from kiln.serve.feedback import FeedbackStore

        state.feedback = FeedbackStore()
    install_handlers(app)
    app.include_router(router)

    @app.get("/health")
    async def health() -> Response:
        faults = [f"{d.name}@{d.version}: {d.worker.fault}" for d in state.router.deployments() if d.worker.fault]
        if faults:  # a liveness probe failing here gets the process restarted
            return JSONResponse(error_body("; ".join(faults), "server_error", code="engine_stopped"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if any(d.worker.fault for d in state.router.deployments()):
            return JSONResponse(error_body("not ready: an engine stopped", "unavailable_error", code="engine_stopped"),
                                503)
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "models": list(state.router.routes)})
        reason = "draining" if state.draining else "loading"
        return JSONResponse(error_body(f"not ready: {reason}", "unavailable_error", code=reason), 503,
                            {"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        for dep in state.router.deployments():
            labels = (dep.name, dep.version)
            stats = dep.worker.stats
            state.metrics.queue_depth.labels(*labels).set(stats.waiting)
            state.metrics.running.labels(*labels).set(stats.running)
            state.metrics.kv_usage.labels(*labels).set(stats.kv_used_fraction)
            drafter = dep.worker.engine.drafter
            if drafter is not None:
                state.metrics.count_speculation(labels, drafter.stats)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # added innermost first: access log (outermost), HEAD as GET, counting, API keys, body limit, then the routes
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key_file is not None:
        app.add_middleware(ApiKeyMiddleware, digests=load_digests(config.api_key_file))
    app.add_middleware(_Counting, state=state)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(AccessLogMiddleware)
    return app


class _Counting:
    """Counts every response by route and status (after auth and limits, so refusals count too)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.state.metrics.requests.labels(_route_label(scope), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _route_label(scope: Scope) -> str:
    """A response's route label: the template of the route that answered it (GET /v1/models/org/name counts as
    /v1/models/{model_id}, not "other"), or, for a refusal before routing (a key, the body limit), its path when it
    is a route's; "other" for any other path, so that the label's values stay few."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str):
        return re.sub(r":[^}]*}", "}", template)  # without the convertor: {model_id:model_id}
    return scope["path"] if scope["path"] in KNOWN_ROUTES else "other"


API_ROUTES = ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "POST /tokenize",
              "POST /detokenize", "POST /v1/feedback", "GET /health", "GET /ready", "GET /metrics")
KNOWN_ROUTES = frozenset(route.split()[1] for route in API_ROUTES)


async def _load(state: ServerState) -> None:
    config = state.config
    if config.registry:
        changes = await asyncio.to_thread(state.router.sync_registry)
        if not state.router.routes:
            logging.getLogger("kiln.serve").error("the registry has no live model; `kiln registry add` one")
    else:
        for name in config.models:
            await asyncio.to_thread(state.router.add_static, name)
        changes = list(config.models)
    logging.getLogger("kiln.serve").info("serving %s", ", ".join(changes))
    state.ready = bool(state.router.routes)


def _keep_load_error(state: ServerState, loader: asyncio.Task[None]) -> None:
    """A failed start-up load ends the server (DrainingServer.on_tick) and serve() raises its error: left in the
    task, it went unseen while the server stayed up, never ready, without a word."""
    if not loader.cancelled() and loader.exception() is not None:
        state.load_error = loader.exception()


def _not_loaded(log: logging.Logger, version: Version, error: KilnError) -> None:
    log.error("registry: %s version %s not loaded (%s); the versions served before it go on", version.name,
              version.version, error)


async def _follow_registry(state: ServerState) -> None:
    log = logging.getLogger("kiln.serve")
    while True:
        await asyncio.sleep(state.config.registry_poll_s)
        if not state.ready or state.draining:
            continue
        try:
            for change in await asyncio.to_thread(state.router.sync_registry, partial(_not_loaded, log)):
                log.info("registry: %s", change)
        except Exception:  # noqa: BLE001 -- an error left in this task (a locked registry file) ended the following
            log.exception("registry: could not follow the registry; trying again in %s s", state.config.registry_poll_s)


ABORT_GRACE_S = 2.0  # after the drain deadline, time to send the aborted requests' last chunks before exiting


class DrainingServer(uvicorn.Server):
    """uvicorn that, on SIGTERM/SIGINT, first marks the app as draining so /ready and new requests get 503."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.kiln_state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn cancels what still runs at its timeout, which cuts streams mid-body and answers the rest with a
        # plain-text 500; at the drain deadline end the generations instead (finish_reason "abort"), so every
        # client gets a complete response, and give uvicorn ABORT_GRACE_S more to send them
        def abort() -> None:
            for dep in self.kiln_state.router.deployments():
                dep.worker.abort_requests()

        deadline = asyncio.get_running_loop().call_later(self.kiln_state.config.drain_timeout_s, abort)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    async def on_tick(self, counter: int) -> bool:
        if self.kiln_state.load_error is not None:  # nothing to serve: stop, and serve() says why
            return True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.kiln_state.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a drained SIGTERM is a clean exit (0), not a death by signal
            self._captured_signals.remove(sig)


def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; returns the exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    app = create_app(config)
    state: ServerState = app.state.kiln
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=math.ceil(config.drain_timeout_s + ABORT_GRACE_S),
                                           access_log=False), state)
    server.run()
    if state.load_error is not None:  # a KilnError becomes the CLI's one line and exit code 2
        raise state.load_error
    return 0

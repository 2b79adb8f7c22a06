"""The OpenAI-compatible HTTP app: ``build_app(model, dispatcher, config, loads)``.

Request path: read the body (``max_body_bytes``, 413 beyond; within ``body_timeout_s`` of the
headers, else 408 and the connection closed; a client that closes mid-body is a 499, counted
and logged as such, not an internal error) -> msgspec decode (400 on bad
JSON or types) -> chat template + tokenization (in a thread pool for bodies over
``inline_preprocess_bytes`` that need the tokenizer; token-id prompts are checked inline)
-> route and open one worker
stream per choice (503 when shed or no worker) -> SSE stream or whole response. A client
disconnect, streaming or not, cancels the request task; closing the streams aborts the engine
requests. With ``api_key`` set, every ``/v1`` call (and ``/metrics`` with ``protect_metrics``)
needs ``Authorization: Bearer <key>`` (the scheme in any case, as RFC 7235 says).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from tokenmill.core.errors import ClientDisconnectedError, RequestTimeoutError
from tokenmill.frontend import errors
from tokenmill.frontend.metrics import FrontendMetrics
from tokenmill.frontend.preprocess import (
    ServedModel,
    needs_tokenizer,
    prepare_chat,
    prepare_completion,
)
from tokenmill.frontend.request_log import RequestLog, RequestStages
from tokenmill.frontend.responses import Collector, ResponseMeta, StreamFormatter, Usage, sse
from tokenmill.frontend.responses_api import (
    ResponsesCollector,
    ResponsesStream,
    prepare_responses,
    response_fields,
)
from tokenmill.frontend.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    decode_request,
    unknown_fields,
)
from tokenmill.frontend.serving import (
    EventSource,
    ServeContext,
    engine_requests,
    merge,
    open_streams,
)
from tokenmill.frontend.sse import SSE_DONE, SSEResponse, cancel_on_disconnect
from tokenmill.routing.dispatch import Dispatcher
from tokenmill.runtime.wire import WorkerLoad

log = logging.getLogger(__name__)

JSON = "application/json"


@dataclass(frozen=True)
class FrontendConfig:
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 60.0  # from the headers to the body's last byte; 408 after
    request_timeout_s: float | None = 600.0
    tokenizer_threads: int = 2
    # bodies up to this size are preprocessed on the event loop (~0.1 ms for 4 KiB): the
    # thread-pool hand-off would cost more; larger ones go to the pool
    inline_preprocess_bytes: int = 4096
    retry_after_s: float = 1.0
    migration_limit: int = 3
    allow_pinning: bool = False  # honour the per-request ``router.worker_id``
    request_log: str | None = None  # a path: one JSON line of stage times per request
    protect_metrics: bool = False  # /metrics needs the API key too
    # max_tokens of a chat request that sets none (capped by what the context leaves);
    # None: the rest of the context
    max_tokens_default: int | None = None


@dataclass(frozen=True)
class _Kind:
    name: str  # the endpoint label in metrics
    chat: bool
    schema: type
    prepare: Callable[[ServedModel, Any, int | None], Any]  # (model, request, max_tokens_default)
    id_prefix: str
    responses_api: bool = False  # /v1/responses: its own response shapes and events


CHAT = _Kind("chat_completions", True, ChatCompletionRequest, prepare_chat, "chatcmpl-")
COMPLETION = _Kind("completions", False, CompletionRequest, prepare_completion, "cmpl-")
RESPONSES = _Kind("responses", True, ResponsesRequest, prepare_responses, "resp-", True)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(errors.encode(obj), status, headers, media_type=JSON)


@dataclass(frozen=True)
class _Served:
    """One model this frontend serves: its tokenizer/limits, dispatcher and serving context."""

    model: ServedModel
    dispatcher: Dispatcher
    ctx: ServeContext
    token_text: Callable[[int], str]
    token_bytes: Callable[[int], bytes] | None  # raw bytes (logprobs); None: text's UTF-8


class Frontend:
    """The app's state and handlers (one per app). Serves one model or several
    (``add_model``); a request without ``model`` goes to the first one."""

    def __init__(
        self,
        model: ServedModel,
        dispatcher: Dispatcher,
        config: FrontendConfig,
        metrics: FrontendMetrics,
        loads: Callable[[], Iterable[WorkerLoad]],
    ):
        self.config, self.metrics, self.loads = config, metrics, loads
        self.pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")
        self.request_log = RequestLog(config.request_log) if config.request_log else None
        self.served: dict[str, _Served] = {}
        self.add_model(model, dispatcher)
        self.model, self.dispatcher = model, dispatcher  # the first (default) model

    def add_model(self, model: ServedModel, dispatcher: Dispatcher) -> None:
        """Serves ``model`` through ``dispatcher`` too (a model card seen in discovery)."""
        ctx = ServeContext(
            model,
            dispatcher,
            self.metrics,
            self.config.request_timeout_s,
            self.config.migration_limit,
        )
        dispatcher.set_observer(self.metrics.observe_route)
        raw = getattr(model.tokenizer, "token_bytes", None)
        token_bytes = None if raw is None else functools.lru_cache(maxsize=65536)(raw)
        self.served[model.name] = _Served(
            model, dispatcher, ctx, ctx.decoders[False].one, token_bytes
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.request_log is not None:
            self.request_log.close()

    def error(self, exc: BaseException) -> Response:
        status, obj, headers = errors.classify(exc, self.config.retry_after_s)
        if status == RequestTimeoutError.status:  # the rest of the body may still come
            headers = {**headers, "connection": "close"}
        return json_response(obj, status, headers)

    async def complete(self, request: Request, kind: _Kind) -> Response:
        self.metrics.inflight.inc()
        stages = RequestStages(kind.name)
        try:
            response = await self._complete(request, kind, stages)
        except Exception as exc:
            response = self.error(exc)
            stages.error = type(exc).__name__
            if isinstance(exc, ClientDisconnectedError):
                log.info("%s: the client closed the connection (499)", kind.name)
        finally:
            self.metrics.inflight.dec()
        self.metrics.requests.labels(kind.name, str(response.status_code), stages.model).inc()
        stages.status = response.status_code
        if not stages.streaming:  # a stream logs itself when it ends
            self._log(stages)
        return response

    async def _complete(self, request: Request, kind: _Kind, stages: RequestStages) -> Response:
        arrival = stages.arrival
        self.authorize(request)
        raw = await self._read_body(request)
        stages.body = time.monotonic()
        req = decode_request(raw, kind.schema)
        if log.isEnabledFor(logging.DEBUG) and (extra := unknown_fields(raw, kind.schema)):
            log.debug("ignoring unknown request fields %s", extra)
        served = self._served_for(req.model)
        stages.model = served.model.name
        max_tokens = self.config.max_tokens_default
        if len(raw) <= self.config.inline_preprocess_bytes or not needs_tokenizer(req):
            prepared = kind.prepare(served.model, req, max_tokens)
        else:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self.pool, kind.prepare, served.model, req, max_tokens
            )
        meta = ResponseMeta(kind.id_prefix + uuid.uuid4().hex, served.model.name, kind.chat)
        stages.id = meta.id
        usage = Usage(prepared.n, sum(len(p) for p in prepared.prompts))
        stages.usage = usage
        self._check_router(prepared.router)
        requests = engine_requests(prepared, meta.id)
        streams = await open_streams(served.ctx, requests, arrival, prepared.router)
        stages.routed = time.monotonic()
        stages.instances = [s.instances for s in streams]
        events = merge(streams)
        if prepared.stream:
            fmt: Any = (
                ResponsesStream(meta, response_fields(req))
                if kind.responses_api
                else StreamFormatter(
                    meta,
                    served.token_text,
                    prepared.include_usage,
                    served.token_bytes,
                    prepared.tools,
                )
            )
            stages.streaming = True
            return SSEResponse(self._sse_body(events, fmt, usage, len(streams), stages))
        collector: Any = (
            ResponsesCollector(meta, response_fields(req), usage)
            if kind.responses_api
            else Collector(
                meta, served.token_text, len(streams), usage, served.token_bytes, prepared.tools
            )
        )
        try:
            async with cancel_on_disconnect(request.receive):
                while True:
                    try:
                        batch = await events.next_batch()
                    except StopAsyncIteration:
                        break
                    stages.first_token = stages.first_token or time.monotonic()
                    for event in batch:
                        collector.add(event)
        finally:
            await events.aclose()
        self._count_usage(served.model.name, usage)
        return json_response(collector.response())

    async def _sse_body(
        self,
        events: EventSource,
        fmt: StreamFormatter,
        usage: Usage,
        num_choices: int,
        stages: RequestStages,
    ) -> AsyncIterator[bytes]:
        """The SSE frames of each batch of events as one ``bytes``; the last ``bytes`` ends
        with ``[DONE]`` and carries the last events, the usage chunk (or the error event).
        Logs the request once the last frames were sent or the client went away."""
        last, sent = b"", False
        try:
            try:
                while True:
                    try:
                        batch = await events.next_batch()
                    except StopAsyncIteration:
                        break
                    stages.first_token = stages.first_token or time.monotonic()
                    for event in batch:
                        usage.add(event)
                    if usage.num_finished == num_choices:
                        last = fmt.chunks(batch)
                        break
                    yield fmt.chunks(batch)
                    stages.first_write = stages.first_write or time.monotonic()
                if fmt.include_usage:
                    last += fmt.usage_chunk(usage)
                self._count_usage(stages.model, usage)
            except Exception as exc:  # any error (not only tokenmill's), as classify maps it
                last = sse(errors.classify(exc)[1])
                stages.error = type(exc).__name__
            finally:
                await events.aclose()
            yield last + getattr(fmt, "done", SSE_DONE)
            stages.first_write = stages.first_write or time.monotonic()
            sent = True
        finally:
            if not sent and stages.error is None:
                stages.error = "client_disconnected"
            self._log(stages)

    def _log(self, stages: RequestStages) -> None:
        if self.request_log is not None:
            self.request_log.write(stages)

    def _count_usage(self, model: str, usage: Usage) -> None:
        self.metrics.observe_usage(
            model, usage.num_prompt_tokens, usage.num_completion_tokens, usage.num_cached_tokens
        )

    def authorize(self, request: Request) -> None:
        """Raises a 401 unless no key is set or the request has ``Authorization: Bearer
        <key>`` (the scheme's case does not matter)."""
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), key.encode()
        )
        if not ok:
            raise errors.HttpError(401, "invalid or missing API key", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        """The whole body: 413 past ``max_body_bytes``, ``RequestTimeoutError`` (408) when
        it takes longer than ``body_timeout_s``, ``ClientDisconnectedError`` (499) when the
        client closes before its end."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {self.config.body_timeout_s:g} s"
            ) from None
        except ClientDisconnect:
            raise ClientDisconnectedError("client closed the connection mid-body") from None
        return b"".join(chunks)

    def _check_router(self, options: Any) -> None:
        if options is not None and options.worker_id and not self.config.allow_pinning:
            raise errors.HttpError(
                400,
                "pinning a request to a worker needs the server flag --allow-pinning",
                param="router.worker_id",
            )

    def _served_for(self, name: str | None) -> _Served:
        served = self.served.get(self.model.name if name is None else name)
        if served is None:
            raise errors.HttpError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return served

    def models(self, request: Request) -> Response:
        self.authorize(request)
        cards = [
            _card(s.model) for s in self.served.values() if s.dispatcher.has_instances()
        ]  # no live worker: not listed
        return json_response({"object": "list", "data": cards})

    def model_card(self, request: Request, model_id: str) -> Response:
        """One model of ``models``' list (``GET /v1/models/{id}``); a 404 for any other."""
        self.authorize(request)
        served = self.served.get(model_id)
        if served is None or not served.dispatcher.has_instances():
            raise errors.HttpError(
                404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
            )
        return json_response(_card(served.model))

    def health(self) -> Response:
        if any(s.dispatcher.has_instances() for s in self.served.values()):
            return json_response({"status": "ok"})
        return json_response({"status": "no worker serving"}, 503)

    def render_metrics(self, request: Request) -> Response:
        if self.config.protect_metrics:
            self.authorize(request)
        return Response(self.metrics.render(self.loads()), media_type="text/plain; version=0.0.4")


def _card(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "tokenmill",
        "max_model_len": model.context_length,
    }


def _too_large(limit: int) -> errors.HttpError:
    return errors.HttpError(413, f"request body larger than {limit} bytes", code="body_too_large")


class FastPathApp:
    """The ASGI app served: ``POST`` to the two completion paths goes straight to the
    ``Frontend`` (no routing table, middleware wrappers around every ``send``, or dependency
    resolution: they cost more CPU per streamed token than the rest of the path); anything
    else (lifespan, other routes, other methods) goes to the FastAPI app."""

    def __init__(self, app: FastAPI, front: Frontend):
        self.app, self.front, self.state = app, front, app.state
        self._routes = {
            "/v1/chat/completions": CHAT,
            "/v1/completions": COMPLETION,
            "/v1/responses": RESPONSES,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self._routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        response = await self.front.complete(Request(scope, receive), kind)
        await response(scope, receive, send)


def build_app(
    model: ServedModel,
    dispatcher: Dispatcher,
    config: FrontendConfig | None = None,
    loads: Callable[[], Iterable[WorkerLoad]] = tuple,
    metrics: FrontendMetrics | None = None,
) -> FastPathApp:
    metrics = metrics or FrontendMetrics()
    front = Frontend(model, dispatcher, config or FrontendConfig(), metrics, loads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        front.close()

    app = FastAPI(title="tokenmill", lifespan=lifespan, openapi_url=None, docs_url=None)
    app.state.frontend = front

    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return json_response(errors.body(str(exc.detail), "invalid_request_error"), exc.status_code)

    async def _any_error(request: Request, exc: Exception) -> Response:
        return front.error(exc)

    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _any_error)
    _add_routes(app, front)
    return FastPathApp(app, front)


def _add_routes(app: FastAPI, front: Frontend) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await front.complete(request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await front.complete(request, COMPLETION)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await front.complete(request, RESPONSES)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            return front.models(request)
        except errors.HttpError as exc:
            return front.error(exc)

    @app.get("/v1/models/{model_id:path}")  # a name may hold slashes (org/model)
    async def model(request: Request, model_id: str) -> Response:
        try:
            return front.model_card(request, model_id)
        except errors.HttpError as exc:
            return front.error(exc)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:  # sync: rendered in a pool thread
        try:
            return front.render_metrics(request)
        except errors.HttpError as exc:
            return front.error(exc)

    app.get("/health")(front.health)
    app.get("/live")(lambda: json_response({"status": "alive"}))

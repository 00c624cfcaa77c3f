"""The OpenAI-compatible HTTP server (FastAPI): ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events), ``GET /health`` and ``GET /metrics``.

Every generation goes through the request contract of the flavors (:func:`mlflow_edge.flavors._common.parse_request`)
and the model's bounded queue: a full queue is a 429, a model that is not loaded a 503, a bad request a 400 with one
line; none of them touches the loaded model. A client that goes away mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from mlflow.exceptions import MlflowException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from mlflow_edge.errors import first_line
from mlflow_edge.flavors._common import Completion, parse_request
from mlflow_edge.serving.metrics import ServerMetrics
from mlflow_edge.serving.models import Job, ModelHolder, QueueFull, ServedModel
from mlflow_edge.serving.openai_api import (
    ChatRequest,
    ChunkWriter,
    CompletionRequest,
    chat_body,
    completion_body,
    error_body,
    validation_message,
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask: output tokens (``max_tokens``), prompt tokens, and requests queued or running."""

    max_tokens: int = 512
    max_prompt_tokens: int | None = None  # None: the model's context less one
    max_queue: int = 16


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(holder: ModelHolder, limits: Limits, metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    _describe(metrics, holder.current)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, holder.check_soon)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP here
            pass
        holder.start_watch()
        yield
        holder.close()

    app = FastAPI(title="mlflow-edge", lifespan=lifespan)
    app.state.holder, app.state.limits, app.state.metrics = holder, limits, metrics

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.url.path if request.url.path in _ROUTES else "other"
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        return response

    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/v1/completions", _completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", _chat_completions, methods=["POST"])
    return app


_ROUTES = {"/health", "/v1/models", "/metrics", "/v1/completions", "/v1/chat/completions"}


def _describe(metrics: ServerMetrics, model: ServedModel) -> None:
    metrics.describe_model(model.ref.name, model.ref.alias, model.ref.version, model.info)


def on_reload(metrics: ServerMetrics):
    """The holder's reload callback: count it, describe the new model, say what happened in one line."""
    def record(outcome: str, model: ServedModel | None, error: str | None) -> None:
        metrics.reloads.labels(outcome=outcome).inc()
        if model is not None:
            _describe(metrics, model)
            print(f"mlflow-edge: serving {model.ref.name} version {model.ref.version} "
                  f"({model.info.get('backend')}, {model.info.get('precision')})", flush=True)
        else:
            print(f"mlflow-edge: warning: kept the served version: {error}", flush=True)
    return record


# -- plain routes ---------------------------------------------------------------------------------------------------
async def _health(request: Request) -> dict[str, Any]:
    holder: ModelHolder = request.app.state.holder
    model = holder.current
    return {"status": "ok", "model": model.ref.name, "alias": model.ref.alias, "version": model.ref.version,
            **model.info, "pending": model.pending, "last_reload_error": holder.last_error}


async def _models(request: Request) -> dict[str, Any]:
    model = request.app.state.holder.current
    return {"object": "list", "data": [{"id": model.ref.name, "object": "model", "created": 0,
                                        "owned_by": "mlflow-edge", **model.info}]}


async def _metrics(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.metrics
    metrics.queued.set(request.app.state.holder.current.pending)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- generation routes ----------------------------------------------------------------------------------------------
async def _completions(request: Request) -> Response:
    return await _generation(request, CompletionRequest)


async def _chat_completions(request: Request) -> Response:
    return await _generation(request, ChatRequest)


async def _generation(request: Request, kind: type[CompletionRequest] | type[ChatRequest]) -> Response:
    started = time.perf_counter()
    metrics: ServerMetrics = request.app.state.metrics
    metrics.inflight.inc()
    streaming = False
    try:
        body = await _parsed(request, kind)
        prompts = _prompt_ids(request.app.state.holder.current, body, request.app.state.limits)
        contract = _contract(body, request.app.state.holder.current, request.app.state.limits)
        if body.stream:
            job = _submit(request, prompts[0], contract)  # a full queue is still an HTTP 429
            streaming = True
            return StreamingResponse(_stream(request, body, job, started), media_type="text/event-stream")
        completions = [await _run(request, ids, contract, started) for ids in prompts]
        answer = (chat_body(body.model, completions[0]) if isinstance(body, ChatRequest)
                  else completion_body(body.model, completions))
        return JSONResponse(answer)
    except RequestError as exc:
        return JSONResponse(error_body(exc.status, str(exc)), status_code=exc.status)
    finally:
        if not streaming:
            _finished(metrics, request.url.path, started)


def _finished(metrics: ServerMetrics, route: str, started: float) -> None:
    metrics.inflight.dec()
    metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


async def _parsed(request: Request, kind: type[CompletionRequest] | type[ChatRequest]):
    try:
        payload = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {first_line(exc)}") from exc
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        body = kind.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(400, validation_message(exc)) from exc
    model = request.app.state.holder.current
    if body.model not in (model.ref.name, f"{model.ref.name}@{model.ref.alias}", model.ref.uri):
        raise RequestError(404, f"model '{body.model}' is not served here (serving '{model.ref.name}')")
    if isinstance(body, CompletionRequest) and body.stream and len(body.prompts()) != 1:
        raise RequestError(400, "a streamed completion takes one prompt")
    return body


def _prompt_ids(model: ServedModel, body: CompletionRequest | ChatRequest, limits: Limits) -> list[list[int]]:
    generator = model.generator
    try:
        if isinstance(body, ChatRequest):
            prompts = [generator.chat_ids([m.as_template_message() for m in body.messages])]
        else:
            prompts = [generator.prompt_ids(text) for text in body.prompts()]
    except MlflowException as exc:
        raise RequestError(400, first_line(exc)) from exc
    if not prompts:
        raise RequestError(400, "no prompt given")
    limit = limits.max_prompt_tokens or generator.context_tokens - 1
    for ids in prompts:
        if len(ids) > min(limit, generator.context_tokens - 1):
            raise RequestError(400, f"the prompt of {len(ids)} tokens is longer than this server's limit of "
                                    f"{min(limit, generator.context_tokens - 1)} tokens")
    return prompts


def _contract(body: CompletionRequest | ChatRequest, model: ServedModel, limits: Limits):
    params = body.contract_params()
    if params.get("max_tokens", 0) > limits.max_tokens:
        raise RequestError(400, f"max_tokens must be at most {limits.max_tokens} (this server's limit), "
                                f"got {params['max_tokens']}")
    try:
        return parse_request(params, model.generator.context_tokens)
    except MlflowException as exc:
        raise RequestError(400, first_line(exc)) from exc


def _submit(request: Request, ids: list[int], contract) -> Job:
    loop = asyncio.get_running_loop()
    job = Job(ids=ids, request=contract, loop=loop, events=asyncio.Queue())
    try:
        request.app.state.holder.submit(job, request.app.state.limits.max_queue)
    except QueueFull as exc:
        raise RequestError(429, f"server busy: {exc}") from exc
    return job


async def _run(request: Request, ids: list[int], contract, started: float) -> Completion:
    job = _submit(request, ids, contract)
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                request.app.state.metrics.observe_generation(value, started)
                return value
            if kind == "error":
                raise _as_request_error(value)
    finally:
        job.cancelled.set()  # a cancelled request (client gone) stops its generation


def _as_request_error(exc: BaseException) -> RequestError:
    if isinstance(exc, MlflowException):
        return RequestError(400, first_line(exc))
    return RequestError(500, f"generation failed: {type(exc).__name__}: {first_line(exc)}")


async def _stream(request: Request, body: CompletionRequest | ChatRequest, job: Job,
                  started: float) -> AsyncIterator[str]:
    metrics: ServerMetrics = request.app.state.metrics
    writer = ChunkWriter(body.model, chat=isinstance(body, ChatRequest))
    try:
        if (opening := writer.opening()) is not None:
            yield _event(opening)
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield _event(writer.delta(value))
            elif kind == "done":
                metrics.observe_generation(value, started)
                yield _event(writer.finish(value.finish_reason))
                if body.include_usage:
                    yield _event(writer.usage(value))
                break
            else:
                error = _as_request_error(value)
                yield _event(error_body(error.status, str(error)))
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the generation stops at its next token
        job.cancelled.set()
        _finished(metrics, request.url.path, started)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

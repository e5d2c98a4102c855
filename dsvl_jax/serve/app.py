"""The HTTP application (Starlette): `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

A request is read up to the body limit (413 beyond it, whatever Content-Length claims), parsed
(`protocol`), prepared in a worker thread (`rows.prepare`: images decoded, prompt tokenised and checked
against the context) and only then queued for the batcher, so a bad request is answered with a 4xx and
an OpenAI-style error body without touching the model, and the server goes on serving. Streaming
responses are server-sent events (`data: {chunk}` ... `data: [DONE]`), as the OpenAI client reads them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from dsvl_jax.serve import protocol as P
from dsvl_jax.serve import rows as R
from dsvl_jax.serve.batcher import Batcher, Job, Overloaded

DEFAULT_MAX_BODY = 32 * 1024 * 1024


@dataclasses.dataclass
class ServeConfig:
    model_name: str
    max_new_tokens: int = 1024  # the default and the cap of max_tokens
    images_first: bool = False  # move a user turn's images in front of its text (DeepSeek-VL's own layout)
    max_images: Optional[int] = None  # None: as many as the context holds
    max_body_bytes: int = DEFAULT_MAX_BODY
    local_image_root: Optional[str] = None  # None: local image paths are refused


class _TooLarge(Exception):
    pass


def _error(e: P.RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(processor, batcher: Batcher, config: ServeConfig) -> Starlette:
    """The application around a started (or soon started) `batcher`; `processor` prepares requests."""
    max_images = R.default_max_images(processor.config) if config.max_images is None else config.max_images
    context = processor.config.text.max_position_embeddings
    created = int(time.time())

    async def health(request: Request) -> JSONResponse:
        stats = dict(batcher.stats, sizes={str(k): v for k, v in sorted(batcher.stats["sizes"].items())})
        return JSONResponse({"status": "ok", "model": config.model_name, "waiting": batcher.waiting, **stats})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model",
                                                         "created": created, "owned_by": "dsvl_jax"}]})

    def prepare(chat: P.ChatRequest) -> tuple:
        # Above the server's cap, max_tokens is cut to it (eval harnesses ask for 1024-2048 by default);
        # a budget the context cannot hold is an error, as OpenAI reports it.
        budget = min(chat.max_tokens or config.max_new_tokens, config.max_new_tokens)
        try:
            if chat.max_tokens is None:  # no budget asked: whatever the context leaves, up to the default
                probe = R.prepare(processor, chat.conversation, max_new_tokens=1, max_images=max_images,
                                  system_prompt=chat.system_prompt)
                budget = min(budget, context - probe.prompt_tokens)
                if budget < 1:
                    raise R.PrepareError(f"the prompt has {probe.prompt_tokens} tokens and fills the model context "
                                         f"of {context} positions", "context_length_exceeded")
                return probe, budget
            return R.prepare(processor, chat.conversation, max_new_tokens=budget, max_images=max_images,
                             system_prompt=chat.system_prompt), budget
        except R.PrepareError as e:
            param = "max_tokens" if e.code == "context_length_exceeded" else "messages"
            raise P.RequestError(str(e), param=param, code=e.code) from None

    async def chat_completions(request: Request):
        try:
            raw = await _read_body(request, config.max_body_bytes)
        except _TooLarge:
            return _error(P.RequestError(f"the request body is larger than this server accepts "
                                         f"({config.max_body_bytes} bytes)", code="request_too_large", status=413))
        except ClientDisconnect:
            return JSONResponse(P.error_body("client disconnected"), status_code=400)
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise P.RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
            chat = P.parse_chat(body, model=config.model_name, local_root=config.local_image_root,
                                images_first=config.images_first)
            prepared, budget = await run_in_threadpool(prepare, chat)
        except P.RequestError as e:
            return _error(e)
        job = Job(prepared, budget, chat.temperature, chat.top_p, chat.seed, chat.stop, chat.stream,
                  asyncio.get_running_loop(), asyncio.Queue())
        try:
            batcher.submit(job)
        except Overloaded as e:
            return _error(P.RequestError(str(e), code="server_overloaded", status=503, kind="server_error"))
        cid = P.completion_id()
        if chat.stream:
            return StreamingResponse(_events(job, cid, config.model_name, chat.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "done":
                    return JSONResponse(P.completion_body(cid, config.model_name, payload["text"],
                                                          payload["finish_reason"], payload["prompt_tokens"],
                                                          payload["completion_tokens"]))
                if kind == "error":
                    return JSONResponse(P.error_body(payload, kind="server_error"), status_code=500)
        finally:
            job.cancelled = True  # a no-op once done; drops the job if the client left while it waited

    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(P.error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                         code=str(exc.status_code)), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: the client still gets the error in the shape it parses.
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}", kind="server_error"),
                            status_code=500)

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: server_error})


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _events(job: Job, cid: str, model: str, include_usage: bool):
    """The stream: the role, the text as it becomes final, the finish reason, usage if asked, [DONE]."""
    try:
        yield _sse(P.chunk_body(cid, model, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield _sse(P.chunk_body(cid, model, {"content": payload}))
            elif kind == "done":
                yield _sse(P.chunk_body(cid, model, {}, payload["finish_reason"]))
                if include_usage:
                    yield _sse(P.chunk_body(cid, model, {}, usage_=P.usage(payload["prompt_tokens"],
                                                                          payload["completion_tokens"])))
                break
            else:
                yield _sse(P.error_body(payload, kind="server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True

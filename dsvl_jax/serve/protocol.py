"""The OpenAI chat completions schema: a request body checked and turned into a DeepSeek-VL conversation, and
the response, stream chunk and error bodies the OpenAI client reads.

Accepted: `model` (must name the served model), `messages` (system / developer / user / assistant; content
a string or a list of {"type": "text"} and {"type": "image_url", "image_url": {"url": ...}} parts, images
in user turns only, each one an `<image_placeholder>` where it stands), `max_tokens` (or
`max_completion_tokens`), `temperature` (0, the default here, is greedy: OpenAI's default is 1),
`top_p`, `seed`, `stop` (a string or up to 4), `stream`, `stream_options.include_usage`, `n` = 1.
Other OpenAI fields are accepted and ignored, as servers of open models do.

Images: `data:image/<type>;base64,...` URIs; local files (a path or file:// URL) only when the server
was started with a folder for them, and only inside it; web URLs are refused (the server fetches nothing).
Every problem is a `RequestError` carrying the HTTP status and an OpenAI-style error body.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import time
import uuid
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from dsvl_jax.processing.chat import IMAGE_TAG

MAX_STOP_STRINGS = 4


class RequestError(ValueError):
    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.code, self.status, self.kind = param, code, status, kind

    def body(self) -> dict:
        return error_body(str(self), kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass
class ChatRequest:
    conversation: list  # official format: alternating User / Assistant, images in "images", empty last turn
    system_prompt: Optional[str]  # None: the model's default
    max_tokens: Optional[int]  # None: the server's default
    temperature: float  # 0: greedy
    top_p: Optional[float]
    seed: Optional[int]
    stop: tuple
    stream: bool
    include_usage: bool


# ---- images ---------------------------------------------------------------------------------------
def image_source(url: Any, param: str, local_root: Optional[str]):
    """An image_url's url → bytes (data URI) or a checked local path."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", param=param)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise RequestError("expected a data URI 'data:image/<type>;base64,<payload>'", param=param,
                               code="invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"the image's base64 payload is malformed ({e})", param=param,
                               code="invalid_base64") from None
        if not data:
            raise RequestError("the image's data URI is empty", param=param, code="invalid_image_url")
        return data
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise RequestError("image URLs are not fetched by this server; send the image as a data: URI",
                           param=param, code="invalid_image_url")
    if local_root is None:
        raise RequestError("local image paths are off on this server (start it with --allow-local-images DIR); "
                           "send a data: URI", param=param, code="invalid_image_url")
    path = unquote(urlparse(url).path) if scheme == "file" else url
    root = os.path.realpath(local_root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise RequestError("image path is outside the folder this server may read", param=param,
                           code="invalid_image_url")
    return real


# ---- messages -------------------------------------------------------------------------------------
def _content(content: Any, role: str, where: str, local_root: Optional[str], images_first: bool = False
             ) -> tuple[str, list]:
    """(text with one placeholder per image where the image was, or all in front, image sources)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError("content must be a string or a list of parts", param=f"{where}.content")
    text, images = [], []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError("a text part needs a string 'text'", param=param)
            text.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise RequestError(f"images go in user messages, not {role}", param=param)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            images.append(image_source(url, f"{param}.image_url.url", local_root))
            if not images_first:
                text.append(IMAGE_TAG)
        else:
            raise RequestError(f"unsupported content part type {kind!r} (expected 'text' or 'image_url')",
                               param=param)
    return (IMAGE_TAG * len(images) if images_first else "") + "".join(text), images


def conversation_of(messages: Any, local_root: Optional[str], images_first: bool = False
                    ) -> tuple[list, Optional[str]]:
    """OpenAI messages → (official conversation ending with an empty assistant turn, system prompt).
    Consecutive messages of one role are joined with a newline."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError("each message must be an object", param=where)
        role = m.get("role")
        if role in ("system", "developer"):
            text, _ = _content(m.get("content"), "system", where, local_root)
            system.append(text)
            continue
        if role not in ("user", "assistant"):
            raise RequestError(f"role {role!r}: expected system, user or assistant", param=f"{where}.role")
        text, images = _content(m.get("content"), role, where, local_root, images_first)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
            turns[-1]["images"] += images
        else:
            turns.append({"role": role, "content": text, "images": images})
    if not turns or turns[0]["role"] != "user":
        raise RequestError("the conversation must start with a user message (after any system message)",
                           param="messages")
    if turns[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", param="messages")
    conversation = [{"role": "User" if t["role"] == "user" else "Assistant", "content": t["content"],
                     **({"images": t["images"]} if t["images"] else {})} for t in turns]
    conversation.append({"role": "Assistant", "content": ""})
    return conversation, ("\n".join(system) if system else None)


# ---- settings -------------------------------------------------------------------------------------
def _number(body: dict, key: str, lo: float, hi: float, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"{key} must be a number in [{lo}, {hi}], got {value!r}", param=key)
    return float(value)


def _integer(body: dict, key: str, lo: int, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise RequestError(f"{key} must be an integer ≥ {lo}, got {value!r}", param=key)
    return value


def parse_chat(body: Any, *, model: str, local_root: Optional[str] = None, images_first: bool = False
               ) -> ChatRequest:
    """A decoded JSON body → `ChatRequest`; raises `RequestError`. `images_first`: each user message's
    images go in front of its text (harnesses such as lmms-eval send the text first)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("model") != model:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError("'model' is required", param="model")
        raise RequestError(f"the model {name!r} does not exist; this server serves {model!r}", param="model",
                           code="model_not_found", status=404)
    conversation, system = conversation_of(body.get("messages"), local_root, images_first)
    if _integer(body, "n", 1, 1) != 1:
        raise RequestError("n > 1 is not supported", param="n")
    max_tokens = _integer(body, "max_completion_tokens", 1, None)
    max_tokens = _integer(body, "max_tokens", 1, max_tokens)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", param="stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    top_p = _number(body, "top_p", 0.0, 1.0, None)
    if top_p == 0.0:
        raise RequestError("top_p must be > 0", param="top_p")
    return ChatRequest(conversation, system, max_tokens, _number(body, "temperature", 0.0, 2.0, 0.0), top_p,
                       _integer(body, "seed", 0, None), tuple(stop), stream, bool(options.get("include_usage")))


# ---- responses ------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model: str, delta: dict, finish_reason: Optional[str] = None,
               usage_: Optional[dict] = None) -> dict:
    """One stream chunk; with `usage_` it is the final usage chunk (no choices), as OpenAI sends it."""
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body

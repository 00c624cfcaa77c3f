"""The OpenAI request and response shapes the server speaks, mapped onto the one request contract of every flavor.

Requests are checked by pydantic models that refuse unknown fields: OpenAI's ``model``, ``prompt``/``messages``,
``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop`` (a string or a list),
``seed``, ``stream``, ``stream_options.include_usage``, ``n`` (1), ``user``, and the extensions ``top_k`` and
``repetition_penalty`` that other OpenAI-compatible LLM servers accept too. ``presence_penalty`` or
``frequency_penalty`` other than 0, ``logprobs`` and ``echo`` are refused as unsupported rather than ignored. Unset
params take the contract's defaults (greedy, 64 tokens), which differ from OpenAI's (temperature 1, 16 tokens for
completions).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlflow_edge.flavors._common import Completion


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[None, False] = None

    def contract_params(self) -> dict[str, Any]:
        """The request contract's params this request sets (unset ones take the contract's defaults)."""
        params = {"max_tokens": self.output_limit(), "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                  "stop": [self.stop] if isinstance(self.stop, str) else self.stop}
        return {name: value for name, value in params.items() if value is not None}

    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: Literal[False] = False
    suffix: None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_message(error: ValidationError) -> str:
    """The first problem of a refused request body, as one line naming the field."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if not isinstance(part, int) or len(first["loc"]) > 1)
    if first["type"] == "extra_forbidden":
        return f"unknown param '{field}'"
    if first["type"] == "missing":
        return f"missing param '{field}'"
    if first["type"] == "literal_error" and field in ("n", "presence_penalty", "frequency_penalty", "logprobs",
                                                      "echo", "suffix"):
        return f"param '{field}' is not supported by this server (got {first.get('input')!r})"
    return f"invalid param '{field}': {first['msg']}"


# -- responses ------------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_body(model: str, completions: list[Completion]) -> dict[str, Any]:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for i, c in enumerate(completions)],
            "usage": usage(completions)}


def chat_body(model: str, completion: Completion) -> dict[str, Any]:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": usage([completion])}


class ChunkWriter:
    """The server-sent event chunks of one streamed completion or chat completion."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.head = {"id": new_id("chatcmpl" if chat else "cmpl"),
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}

    def opening(self) -> dict[str, Any] | None:
        """The chat stream's first chunk (the assistant role); none for completions."""
        return self._chunk({"role": "assistant", "content": ""}, None) if self.chat else None

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text} if self.chat else text, None)

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk({} if self.chat else "", reason)

    def usage(self, completion: Completion) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage([completion])}

    def _chunk(self, content: Any, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice.update({"delta": content} if self.chat else {"text": content})
        return {**self.head, "choices": [choice]}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}

"""The OpenAI API's request shapes (validated strictly), its error bodies, and response builders.

Unknown fields are accepted and ignored, as clients send fields a local model has no use for
(`user`, `metadata`, ...); fields we read are type-checked without coercion ("5" is not 5)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.generate import Delta, TokenLogprob
from lmforge.sampling import SamplingError, SamplingParams


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields both generation routes take. Sampling fields are type-checked here and range-checked
    once, by SamplingParams (`sampling_params`); vLLM's top_k, min_p and repetition_penalty too."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "'stop' takes at most 4 sequences", param="stop")
        return tuple(stop)

    def sampling_params(self, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        """The request's SamplingParams; a value out of range is a 400 naming its field."""
        with sampling_errors():
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=self.logit_bias or (),
                seed=self.seed,
                stop=self.stops(),
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )


@contextmanager
def sampling_errors():
    """SamplingError -> ApiError 400 with the option's name as `param`."""
    try:
        yield
    except SamplingError as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


def _param(loc: tuple, data) -> str | None:
    """The dotted path of `loc` through the request `data` (union branch labels dropped)."""
    parts, node = [], data
    for key in loc:
        if isinstance(node, dict) and isinstance(key, str) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif isinstance(node, dict) and isinstance(key, str) and not parts:
            parts.append(key)  # a missing top-level field
            break
        else:
            break
        parts.append(str(key))
    return ".".join(parts) or None


def parse(model: type[BaseModel], raw: bytes):
    """Decode and validate a JSON body; ApiError 400 with the first problem otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"], data)
        where = f"'{param}'" if param else "the request"
        code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
        raise ApiError(400, f"invalid {where}: {err['msg']}", param=param, code=code) from None


# ---- responses ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(infos: list[TokenLogprob], token_text) -> dict:
    def entry(token, logprob):
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in infos]
    }


def completion_logprobs(infos: list[TokenLogprob], token_text, offset: int) -> dict:
    tokens = [token_text(i.token) for i in infos]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in infos],
        "top_logprobs": [{token_text(t): lp for t, lp in i.top} for i in infos],
        "text_offset": offsets,
    }


def merge(deltas: list[Delta]) -> tuple[str, list[TokenLogprob], Delta]:
    """All of a sequence's deltas: its text, its tokens' logprobs and the last delta."""
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.logprobs], deltas[-1]


class ChatFormat:
    """How /v1/chat/completions shapes a reply: whole (`choice`) or as stream chunks."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, logprobs: bool, token_text):
        self.logprobs, self.token_text = logprobs, token_text

    def opening(self) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def chunk(self, d: Delta) -> dict:
        return {
            "index": 0,
            "delta": {"content": d.text} if d.text else {},
            "logprobs": chat_logprobs(d.logprobs, self.token_text) if self.logprobs else None,
            "finish_reason": d.finish_reason,
        }

    def choice(self, text: str, infos: list[TokenLogprob], finish_reason: str) -> dict:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(infos, self.token_text) if self.logprobs else None,
            "finish_reason": finish_reason,
        }


class CompletionFormat:
    """How /v1/completions shapes a reply (with `echo`, the prompt's text before it)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, logprobs: bool, token_text, echo: str = ""):
        self.logprobs, self.token_text, self.echo = logprobs, token_text, echo
        self.offset = len(echo)  # where the next streamed chunk's text starts

    def opening(self) -> list[dict]:
        return [{"index": 0, "text": self.echo, "logprobs": None, "finish_reason": None}] if self.echo else []

    def chunk(self, d: Delta) -> dict:
        out = {
            "index": 0,
            "text": d.text,
            "finish_reason": d.finish_reason,
            "logprobs": completion_logprobs(d.logprobs, self.token_text, self.offset) if self.logprobs else None,
        }
        self.offset += len(d.text)
        return out

    def choice(self, text: str, infos: list[TokenLogprob], finish_reason: str) -> dict:
        return {
            "index": 0,
            "text": self.echo + text,
            "finish_reason": finish_reason,
            "logprobs": completion_logprobs(infos, self.token_text, len(self.echo)) if self.logprobs else None,
        }

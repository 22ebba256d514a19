"""The OpenAI API's request shapes (validated strictly), its error bodies, and response builders.

Unknown fields are accepted and ignored, as clients send fields a local model has no use for
(`user`, `metadata`, ...); fields we read are type-checked without coercion ("5" is not 5)."""
from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.server.sequence import Delta, TokenLogprob


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
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
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "'stop' takes at most 4 sequences", param="stop")
        return tuple(stop)

    def biases(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id below {vocab_size}", param="logit_bias")
            if not -100 <= bias <= 100:
                raise ApiError(400, f"logit_bias for {key} must be in [-100, 100]", param="logit_bias")
            out.append((int(key), float(bias)))
        return tuple(out)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]]
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
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(infos: list[TokenLogprob], token_text) -> dict:
    def entry(token, logprob):
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                        for i in infos]}


def completion_logprobs(infos: list[TokenLogprob], token_text, offset: int) -> dict:
    tokens = [token_text(i.token) for i in infos]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [i.logprob for i in infos],
            "top_logprobs": [{token_text(t): lp for t, lp in i.top} for i in infos], "text_offset": offsets}


def merge(deltas: list[Delta]) -> tuple[str, list[TokenLogprob], Delta]:
    """All of a sequence's deltas: its text, its tokens and the last delta."""
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.tokens], deltas[-1]

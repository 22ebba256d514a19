"""The OpenAI API's request shapes (validated strictly), its error bodies, and response builders.

No field is silently ignored: each one OpenAI defines is honoured, or declared here as harmless
to ignore (`user`, `metadata`, ... : the README's field table), or answered with a 400 naming it;
so is any unknown field. Fields are type-checked without coercion ("5" is not 5)."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.generate import Delta, TokenLogprob
from lmforge.sampling import SamplingError, SamplingParams, response_format_options
from lmforge.tokenizer import lone_surrogate_at


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
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # harmless: lmforge never pads chunks


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # lmforge always enforces the schema
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # lmforge always enforces a required call's arguments


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class _Common(_Strict):
    """Fields both generation routes take. Sampling fields are type-checked here and range-checked
    once, by SamplingParams (`sampling_params`); vLLM's top_k, min_p, repetition_penalty and
    guided_json / guided_regex / guided_grammar (sent in the OpenAI client's `extra_body`) too."""

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
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    user: str | None = None  # harmless: identifies the end user to OpenAI
    metadata: dict | None = None  # harmless: tags stored requests; lmforge stores nothing

    def constraints(self) -> list[tuple[str, dict]]:
        """The output constraints the request asks for: (request field, SamplingParams options)."""
        given = (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_grammar", "grammar"))
        return [(field, {option: getattr(self, field)}) for field, option in given if getattr(self, field) is not None]

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "'stop' takes at most 4 sequences", param="stop")
        return tuple(stop)

    def sampling_params(
        self, max_tokens: int, logprobs: bool, top_logprobs: int, constraints: list[tuple[str, dict]]
    ) -> SamplingParams:
        """The request's SamplingParams, with at most one of `constraints` ((request field, options));
        a value out of range is a 400 naming its field."""
        if len(constraints) > 1:
            raise ApiError(
                400,
                f"give one output constraint, not {' and '.join(f for f, _ in constraints)}",
                param=constraints[1][0],
            )
        field, options = constraints[0] if constraints else (None, {})
        with sampling_errors(dict.fromkeys(options, field)):
            return SamplingParams(
                **options,
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
def sampling_errors(fields: dict | None = None):
    """SamplingError -> ApiError 400 with the option's name as `param`, or the request field
    it came from (`fields`: option -> field, e.g. json_schema -> response_format)."""
    try:
        yield
    except SamplingError as e:
        raise ApiError(400, str(e), param=(fields or {}).get(e.param, e.param), code="invalid_value") from None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    # llama.cpp's default, not OpenAI's: a small model asked for "one or more" calls repeats them
    parallel_tool_calls: bool = False
    modalities: list[Literal["text"]] | None = None  # text is all lmforge answers with
    store: bool | None = None  # harmless: lmforge stores nothing
    service_tier: str | None = None  # harmless: one tier here
    prompt_cache_key: str | None = None  # harmless: a routing hint for OpenAI's caches
    safety_identifier: str | None = None  # harmless: identifies the end user to OpenAI

    def constraints(self) -> list[tuple[str, dict]]:
        """The guided_* fields and response_format as (request field, SamplingParams options)."""
        found = super().constraints()
        if self.response_format is None:
            return found
        with sampling_errors():
            options = response_format_options(self.response_format.model_dump(by_alias=True, exclude_none=True))
        return [("response_format", options), *found] if options else found


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int = Field(1, ge=1, le=1)


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


def _param(loc: tuple, data) -> str | None:
    """The dotted path of `loc` through the request `data` (union branch labels dropped)."""
    parts, node = [], data
    for n, key in enumerate(loc):
        if isinstance(node, dict) and isinstance(key, str) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif isinstance(node, dict) and isinstance(key, str) and n == len(loc) - 1:
            parts.append(key)  # a missing field
            break
        elif isinstance(key, str):
            continue  # a union branch's label
        else:
            break
        parts.append(str(key))
    return ".".join(parts) or None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


def _lone_surrogate(data) -> str | None:
    """The dotted path of the first string (key or value) in `data` holding a lone UTF-16
    surrogate, which JSON's \\uXXXX escapes can spell but UTF-8 cannot; None when there is none."""
    todo = [((), data)]
    while todo:
        path, node = todo.pop()
        if isinstance(node, dict):
            items = list(node.items())
            if any(not _utf8(k) for k, _ in items):
                return ".".join(path) or "(a key)"
            todo += [((*path, k), v) for k, v in reversed(items)]
        elif isinstance(node, list):
            todo += [((*path, str(i)), v) for i, v in reversed(list(enumerate(node)))]
        elif isinstance(node, str) and not _utf8(node):
            return ".".join(path)
    return None


# a \uD800-\uDFFF escape, or the surrogate's raw (surrogatepass) UTF-8 bytes
_SURROGATE_SPELLING = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _may_hold_surrogates(raw: bytes | str) -> bool:
    """Whether the JSON text `raw` can decode to a lone surrogate: it spells one as an escape, or
    as the raw bytes json.loads lets through (it decodes with 'surrogatepass'), or it is not UTF-8
    (where a scan of the bytes would not see them). Far cheaper than walking the decoded value."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    elif json.detect_encoding(raw) != "utf-8":
        return True
    return _SURROGATE_SPELLING.search(raw) is not None


def _utf8(text: str) -> bool:
    return lone_surrogate_at(text) is None


def parse(model: type[BaseModel], raw: bytes):
    """Decode and validate a JSON body; ApiError 400 with the first problem otherwise."""
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    bad = _lone_surrogate(data) if _may_hold_surrogates(raw) else None
    if bad is not None:
        raise ApiError(
            400,
            f"invalid '{bad}': it holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
            "send valid Unicode",
            param=bad,
            code="invalid_value",
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        unsupported = [x for x in errors if x["type"] == "extra_forbidden"]
        err = (unsupported or errors)[0]
        param = _param(err["loc"], data)
        if unsupported:
            raise ApiError(
                400,
                f"'{param}' is not supported by lmforge; remove it (the README lists every field and what it does)",
                param=param,
                code="unsupported_parameter",
            ) from None
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
    """How /v1/chat/completions shapes a reply: whole (`choice`) or as stream chunks (`chunks`).
    With tools (`plan`, a lmforge.tools.ToolPlan) the reply is held until it ends, then given as
    content or as tool calls (finish_reason "tool_calls"), streamed as OpenAI streams them."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, logprobs: bool, token_text, plan=None):
        self.logprobs, self.token_text, self.plan = logprobs, token_text, plan
        self.held: list[str] = []

    def opening(self) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def chunks(self, d: Delta) -> list[dict]:
        logprobs = chat_logprobs(d.logprobs, self.token_text) if self.logprobs else None
        if self.plan is None:
            if not (d.text or d.finish_reason or logprobs and d.logprobs):
                return []
            delta = {"content": d.text} if d.text else {}
            return [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason}]
        self.held.append(d.text)
        if d.finish_reason is None:
            return []
        content, calls = self.plan.parse("".join(self.held))
        if not calls:
            return [
                {"index": 0, "delta": {"content": content or ""}, "logprobs": None, "finish_reason": d.finish_reason}
            ]
        out = []
        for i, c in enumerate(calls):
            head = {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
            args = {"index": i, "function": {"arguments": c.arguments}}
            out += [
                {"index": 0, "delta": {"tool_calls": [x]}, "logprobs": None, "finish_reason": None}
                for x in (head, args)
            ]
        return [*out, {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]

    def choice(self, text: str, infos: list[TokenLogprob], finish_reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        if self.plan is not None:
            content, calls = self.plan.parse(text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ]
                finish_reason = "tool_calls"
        return {
            "index": 0,
            "message": message,
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

    def chunks(self, d: Delta) -> list[dict]:
        if not (d.text or d.finish_reason or self.logprobs and d.logprobs):
            return []
        logprobs = completion_logprobs(d.logprobs, self.token_text, self.offset) if self.logprobs else None
        self.offset += len(d.text)
        return [{"index": 0, "text": d.text, "finish_reason": d.finish_reason, "logprobs": logprobs}]

    def choice(self, text: str, infos: list[TokenLogprob], finish_reason: str) -> dict:
        return {
            "index": 0,
            "text": self.echo + text,
            "finish_reason": finish_reason,
            "logprobs": completion_logprobs(infos, self.token_text, len(self.echo)) if self.logprobs else None,
        }

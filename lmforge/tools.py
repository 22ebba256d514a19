"""Tool calls: how a chat template's family writes a call, the grammar that forces a call (for
tool_choice "required" or a named tool), and the parser that reads calls back out of a reply.

A template that knows tools (it reads the `tools` variable) gets them as transformers passes
them, and its family's call syntax (Hermes/Qwen2.5 `<tool_call>`, Mistral `[TOOL_CALLS]`,
Phi-4-mini `<|tool_call|>`, Llama 3.x JSON) is parsed. A template that does not (SmolLM2's) is
given the tools in a system message and answers in JSON, `{"tool_calls": [...]}` or
`{"content": "..."}`, constrained by a schema, as llama.cpp's generic tool format does.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lmforge.constrain import JSON_OPTIONS
from lmforge.errors import LmforgeError
from lmforge.sampling import CONSTRAINTS


class ToolError(LmforgeError):
    """A tool definition or tool_choice that cannot be used; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: an id, the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class CallSyntax:
    """How a template family writes calls: text around them, one object per call or a JSON list,
    and the key of the arguments."""

    name: str
    marker: str  # a piece of the chat template that tells the family apart
    start: str
    end: str
    as_list: bool
    args_key: str = "arguments"


SYNTAXES = (
    CallSyntax("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>", False),  # Qwen2.5, Hermes, SmolLM3
    CallSyntax("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]", "", True),
    CallSyntax("phi4", "<|tool_call|>", "<|tool_call|>", "<|/tool_call|>", True),
    CallSyntax("llama3", "<|python_tag|>", "", "", False, "parameters"),  # Llama 3.1+: a bare JSON object
)
GENERIC_PROMPT = (
    "You can call these tools (JSON Schema of each function's arguments):\n{tools}\n"
    'Answer in JSON only: {{"tool_calls": [{{"name": ..., "arguments": {{...}}}}]}} to call tools, '
    'or {{"content": "..."}} to answer the user directly.'
)


def _call_schema(tool: dict, args_key: str) -> dict:
    fn = tool["function"]
    args = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, args_key: args},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


@dataclass
class ToolPlan:
    """What a request with tools does: the messages and tools the template renders, the output
    constraint (SamplingParams options), and how the reply is read back."""

    messages: list[dict]
    template_tools: list[dict] | None
    constraint: dict = field(default_factory=dict)
    syntax: CallSyntax | None = None  # None: the generic JSON reply
    calls: bool = True  # False for tool_choice "none": the reply is all content

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply."""
        return parse_calls(text, self.syntax) if self.calls else (text, [])

    def options(self, options: dict) -> dict:
        """Sampling options with this plan's output constraint; one the caller gave as well is refused."""
        given = [k for k in CONSTRAINTS if options.get(k) is not None]
        if self.constraint and given:
            raise ToolError("tools", f"tools with this tool_choice constrain the output; drop {given[0]}")
        return {**options, **self.constraint}


def plan_tools(
    template: str, messages: list[dict], tools: list[dict], choice="auto", parallel: bool = False
) -> ToolPlan:
    """The ToolPlan for OpenAI-style `tools` and `tool_choice` ("auto", "none", "required" or
    {"type": "function", "function": {"name": ...}}) on a chat template."""
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ToolError("tools", "tool names must be unique")
    if isinstance(choice, dict):
        wanted = choice["function"]["name"]
        if wanted not in names:
            raise ToolError("tool_choice", f"tool_choice names '{wanted}', which is not among the tools")
        callable_tools = [t for t in tools if t["function"]["name"] == wanted]
    else:
        callable_tools = tools
    native = "tools" in template
    syntax = next((s for s in SYNTAXES if s.marker in template), SYNTAXES[-1]) if native else None
    force = choice == "required" or isinstance(choice, dict)
    if native:
        constraint = {"grammar": _call_grammar(syntax, callable_tools, parallel)} if force else {}
        return ToolPlan(messages, tools, constraint, syntax, calls=choice != "none")
    if choice == "none":  # earlier calls still read as the JSON the model saw; no tools offered
        return ToolPlan(_generic_messages(messages, None), None, {}, None, calls=False)
    system = GENERIC_PROMPT.format(tools=json.dumps([t["function"] for t in tools], indent=1))
    return ToolPlan(
        _generic_messages(messages, system), None, {"json_schema": _generic_schema(callable_tools, force, parallel)}
    )


def _call_grammar(syntax: CallSyntax, tools: list[dict], parallel: bool) -> str:
    """A Lark grammar (llguidance's, with %json) for one call, or several when parallel."""
    call = {"anyOf": [_call_schema(t, syntax.args_key) for t in tools], "x-guidance": JSON_OPTIONS}
    if syntax.as_list:
        body = {"type": "array", "items": call, "minItems": 1, "x-guidance": JSON_OPTIONS}
        if not parallel:
            body["maxItems"] = 1
        return f"start: {json.dumps(syntax.start)} %json {json.dumps(body)} {json.dumps(syntax.end)}\n"
    one = f"{json.dumps(syntax.start)} call {json.dumps(syntax.end)}" if syntax.start else "call"
    rule = f'({one} "\\n")* {one}' if parallel and syntax.start else one
    return f"start: {rule}\ncall: %json {json.dumps(call)}\n"


def _generic_schema(tools: list[dict], force: bool, parallel: bool) -> dict:
    calls = {"type": "array", "items": {"anyOf": [_call_schema(t, "arguments") for t in tools]}, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    call_reply = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if force:
        return call_reply
    text_reply = {
        "type": "object",
        "properties": {"content": {"type": "string"}},
        "required": ["content"],
        "additionalProperties": False,
    }
    return {"anyOf": [call_reply, text_reply]}


def _generic_messages(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation for a template that knows no tools: the tools in the system message (when
    `system` is given), earlier calls as the JSON the model is asked to write, tool results as a
    user turn naming the call they answer."""
    out, names = [], {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                for c in m["tool_calls"]
            ]
            names.update((c.get("id"), c["function"]["name"]) for c in m["tool_calls"])
            if system is None:  # no calls asked for: the earlier ones in words
                said = "; ".join(f"calling {c['name']} with {json.dumps(c['arguments'])}" for c in calls)
                out.append({"role": "assistant", "content": said[0].upper() + said[1:] + "."})
            else:
                out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif m["role"] == "tool":
            name = names.get(m.get("tool_call_id"), "the tool")
            out.append({"role": "user", "content": f"Result of {name}: {m.get('content') or ''}"})
        elif m["role"] == "assistant" and system is not None:  # replies as the JSON the model is asked for
            out.append({"role": "assistant", "content": json.dumps({"content": m.get("content") or ""})})
        else:
            out.append(dict(m))
    if system is None:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _arguments(value) -> dict:
    """A call's arguments as an object: OpenAI sends JSON text, templates want the object."""
    if isinstance(value, dict):
        return value
    try:
        args = json.loads(value)
    except (TypeError, ValueError):
        args = None
    if not isinstance(args, dict):
        raise ToolError("messages", f"a tool call's arguments must be a JSON object, got {str(value)[:80]!r}")
    return args


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to a template that knows tools: call arguments as
    objects (templates write them with tojson)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                {
                    "type": "function",
                    "id": c.get("id"),
                    "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
                }
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _call(name: str, arguments) -> ToolCall:
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments))


def parse_calls(text: str, syntax: CallSyntax | None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply: calls written in `syntax` (None: the generic JSON reply);
    text that holds no call is all content."""
    if syntax is None:
        try:
            reply = json.loads(text)
        except ValueError:
            return text, []
        if isinstance(reply, dict) and isinstance(reply.get("tool_calls"), list):
            return None, [_call(c["name"], c["arguments"]) for c in reply["tool_calls"] if _is_call(c, "arguments")]
        content = reply.get("content") if isinstance(reply, dict) else None
        return content if isinstance(content, str) else text, []
    start = text.find(syntax.start) if syntax.start else _json_start(text)
    if start < 0:
        return text, []
    content = text[:start].replace("<|python_tag|>", "").strip() or None
    objects = _json_values(text[start + len(syntax.start) :])
    items = [x for o in objects for x in (o if isinstance(o, list) else [o])]
    calls = [_call(c["name"], c[syntax.args_key]) for c in items if _is_call(c, syntax.args_key)]
    return (content, calls) if calls else (text, [])


def _is_call(obj, args_key: str) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get(args_key), dict)


def _json_start(text: str) -> int:
    m = re.match(r"\s*(<\|python_tag\|>)?\s*\{", text)
    return m.end() - 1 if m else -1


def _json_values(text: str) -> list:
    """The JSON values that follow one another in `text` (separators and tags between them skipped)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        m = re.compile(r"[\[{]").search(text, i)
        if not m:
            return values
        try:
            value, i = decoder.raw_decode(text, m.start())
        except ValueError:
            return values
        values.append(value)

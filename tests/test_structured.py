"""Structured output and tool calls. The guarantee is tested where the model's quality cannot help:
tiny random-weight models of each architecture, sampled at temperature 1, under the server's
continuous batching, every output checked by `jsonschema` or `re`. The API is tested with the
official `openai` client against a real server on the default model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.structured_cases import REGEXES, SCHEMAS
from tests.test_errors import assert_user_error, run_cli
from tests.test_server import NAME

ARCHS = [
    ("llama", "float32", False, None),
    ("mistral", "float32", False, None),
    ("qwen2", "float32", False, None),
    ("phi3", "float32", False, None),
    ("gemma3", "float32", False, None),
]
SEEDS = range(5)


def run_batched(engine, tokenizer, requests: list[tuple[list[int], object]], max_batch: int = 4) -> list:
    """Every (prompt ids, SamplingParams) through the server's BatchScheduler: (text, finish reason)."""
    from lmforge.server.batching import BatchScheduler, Failed, Handle

    results: dict[int, list] = {i: [] for i in range(len(requests))}
    done = threading.Event()
    lock = threading.Lock()

    def sink(i):
        def put(item):
            with lock:
                results[i].append(item)
                if all(r and (isinstance(r[-1], Failed) or r[-1].finish_reason) for r in results.values()):
                    done.set()

        return put

    sched = BatchScheduler(engine, max_batch=max_batch, max_queue=len(requests) + 1).start()
    try:
        for i, (ids, params) in enumerate(requests):
            assert sched.submit(Handle(tokenizer, ids, params, engine.eos_token_ids, engine.vocab_size, sink(i)))
        assert done.wait(600), "the batch did not finish"
    finally:
        sched.close()
    failed = [r[-1] for r in results.values() if isinstance(r[-1], Failed)]
    assert not failed, failed[0]
    return [("".join(d.text for d in results[i]), results[i][-1].finish_reason) for i in range(len(requests))]


@pytest.mark.parametrize("case", ARCHS, ids=[c[0] for c in ARCHS])
def test_random_models_always_produce_valid_output(case, tiny_factory, tmp_path):
    """30 schemas and 6 regexes x 5 seeds at temperature 1 on a random model, 4 rows batched:
    every output parses and validates (or matches), and every one ends by itself (not by length)."""
    from lmforge.export.convert import convert
    from lmforge.generate import fit_to_context
    from lmforge.runtime.ort import OrtEngine
    from lmforge.sampling import SamplingParams
    from lmforge.tokenizer import Tokenizer

    folder = convert(tiny_factory(case), tmp_path / "m", progress=False)
    engine, tok = OrtEngine(folder), Tokenizer.from_folder(folder)
    ids = tok.encode("Output:")
    cases = [("json_schema", s) for s in SCHEMAS] + [("regex", r) for r in REGEXES]
    requests = [
        (
            ids,
            fit_to_context(
                len(ids),
                SamplingParams(max_tokens=400, temperature=1.0, seed=seed, **{kind: value}),
                engine.context_length,
            ),
        )
        for kind, value in cases
        for seed in SEEDS
    ]
    outputs = run_batched(engine, tok, requests)
    wrong = []
    for (text, finish), (kind, value, seed) in zip(outputs, [(k, v, s) for k, v in cases for s in SEEDS]):
        try:
            assert finish == "stop", f"ended by {finish}"
            if kind == "regex":
                assert re.fullmatch(value, text), "does not match"
            else:
                jsonschema.validate(json.loads(text), value, format_checker=jsonschema.FormatChecker())
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            wrong.append(f"{kind} {json.dumps(value)[:70]} seed {seed}: {str(e).splitlines()[0]}: {text[:80]!r}")
    assert not wrong, f"{len(wrong)} of {len(outputs)} outputs wrong:\n" + "\n".join(wrong)


# ---- the default model behind the OpenAI API --------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def pydantic_models():
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    Short = Field(max_length=30)  # bounded strings: a small model may otherwise write on to max_tokens

    class City(BaseModel):
        name: str = Short
        country: str = Short
        population: int = Field(ge=0, le=50_000_000)

    class Person(BaseModel):
        name: str = Short
        age: int = Field(ge=0, le=120)
        email: str | None = None

    class Address(BaseModel):
        street: str = Short
        city: str = Short

    class Company(BaseModel):
        name: str = Short
        address: Address

    class TodoList(BaseModel):
        items: list[Annotated[str, Field(max_length=40)]] = Field(min_length=1, max_length=4)

    class Sentiment(BaseModel):
        label: Literal["positive", "negative", "neutral"]
        score: int = Field(ge=0, le=10)

    class Book(BaseModel):
        title: str = Short
        year: int = Field(ge=1400, le=2030)
        tags: list[Literal["fiction", "history", "science", "poetry"]] = Field(max_length=3)

    class Code(BaseModel):
        code: str = Field(pattern=r"^[A-Z]{2}[0-9]{3}$")

    class Point(BaseModel):
        x: int = Field(ge=-100, le=100)
        y: int = Field(ge=-100, le=100)

    class Route(BaseModel):
        start: Point
        end: Point
        name: str | None = Field(None, max_length=20)

    class Answer(BaseModel):
        answer: bool
        reason: str = Field(max_length=60)

    return [City, Person, Company, TodoList, Sentiment, Book, Code, Route, Answer, Address]


PROMPTS = [
    "Tell me about Paris.",
    "Describe a person you know.",
    "Describe a small software company.",
    "Plan my day.",
    "I loved this movie!",
    "Recommend a book.",
    "Give me a product code.",
    "Describe a trip from home to work.",
    "Is water wet?",
    "Where do you live?",
    "Tell me about Tokyo.",
    "Describe your best friend.",
    "Describe a bakery.",
    "Plan a party.",
    "The food was cold.",
    "Name a classic novel.",
    "Make up an order code.",
    "Draw a line.",
    "Is the sun a star?",
    "Give me an address in Rome.",
]


def test_openai_parse_gives_objects_for_every_schema(client):
    """client.chat.completions.parse with 10 pydantic schemas over 20 prompts (4 at a time)."""
    models = pydantic_models()

    def ask(i):
        model = models[i % len(models)]
        r = client.chat.completions.parse(
            model=NAME,
            messages=[{"role": "user", "content": PROMPTS[i]}],
            response_format=model,
            temperature=0.7,
            seed=i,
            max_tokens=300,
        )
        return model, r.choices[0]

    with ThreadPoolExecutor(4) as pool:
        for model, choice in pool.map(ask, range(len(PROMPTS))):
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, model), choice


def test_json_object_and_guided_fields(server):
    def chat(**extra):
        body = {
            "messages": [{"role": "user", "content": "Describe a cat."}],
            "max_tokens": 200,
            "temperature": 0,
            **extra,
        }
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]

    obj = json.loads(chat(response_format={"type": "json_object"})["message"]["content"])
    assert isinstance(obj, dict)
    assert re.fullmatch(r"[0-9]{2}", chat(guided_regex="[0-9]{2}")["message"]["content"])
    assert chat(guided_grammar='start: "meow" | "purr"')["message"]["content"] in ("meow", "purr")
    r = httpx.post(
        server.url + "/v1/completions",
        timeout=120,
        json={"prompt": "The answer is", "guided_regex": "(yes|no)", "max_tokens": 5},
    ).json()
    assert r["choices"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client, stream):
    """A forced call, its result as a tool message, then the final answer; streamed or not."""

    def create(messages, **kw):
        if not stream:
            return client.chat.completions.create(
                model=NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=120, **kw
            ).choices[0]
        calls, content, finish = {}, "", None
        for chunk in client.chat.completions.create(
            model=NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=120, stream=True, **kw
        ):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for c in delta.tool_calls or []:  # OpenAI's streamed shape: id and name first, arguments after
                entry = calls.setdefault(c.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = c.id or entry["id"]
                entry["name"] += (c.function and c.function.name) or ""
                entry["arguments"] += (c.function and c.function.arguments) or ""
            finish = chunk.choices[0].finish_reason or finish
        return finish, content, [calls[i] for i in sorted(calls)]

    first = create(WEATHER, tool_choice="required")
    if stream:
        finish, _, calls = first
        call = {
            "id": calls[0]["id"],
            "type": "function",
            "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]},
        }
    else:
        finish, calls = first.finish_reason, first.message.tool_calls
        call = calls[0].model_dump()
    assert finish == "tool_calls" and len(calls) == 1 and call["function"]["name"] in ("get_weather", "add")
    json.loads(call["function"]["arguments"])
    history = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "22 degrees and sunny"},
    ]
    final = create(history, tool_choice="none")
    text = final[1] if stream else final.message.content
    assert (final[0] if stream else final.finish_reason) in ("stop", "length") and text


def test_named_tool_is_always_called_with_valid_arguments(client):
    for q in ("What is 2 plus 3?", "Hello!", "What is the weather in Oslo?"):
        r = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": q}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            temperature=1.0,
            seed=3,
            max_tokens=80,
        )
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


BAD = [  # (body fields, param) — each a 400 naming the field
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
        "response_format",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 2}},
            }
        },
        "response_format",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "[0-9"}, "guided_regex"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"guided_regex": "a", "guided_json": {"type": "object"}}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content.0.image_url",
    ),
]


def test_bad_structured_requests_are_400s_and_other_streams_go_on(server):
    from tests.test_server import assert_openai_error

    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": 200,
        "temperature": 0.8,
        "stream": True,
        "logit_bias": {"0": -100, "2": -100},
    }
    pieces = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as running:
        lines = running.iter_lines()
        for fields, param in BAD:
            pieces.append(next(lines))
            r = httpx.post(
                server.url + "/v1/chat/completions", timeout=60, json={"messages": WEATHER, "max_tokens": 8, **fields}
            )
            assert_openai_error(r, 400, param)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in pieces + rest)


def test_harmless_fields_are_accepted(server):
    body = {
        "messages": WEATHER,
        "max_tokens": 4,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "modalities": ["text"],
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "parallel_tool_calls": False,
        "stream_options": None,
        "n": 1,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "best_of": 1, "user": "u"}, timeout=60
    )
    assert r.status_code == 200, r.text


# ---- library, CLI and batch --------------------------------------------------------------------


def test_library_cli_and_batch_constraints(reference, int4_folder, tmp_path):
    from lmforge.model import ChatReply

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    text = reference.generate("What is 6 times 7?", json_schema=schema, max_tokens=40)
    jsonschema.validate(json.loads(text), schema)
    assert (
        re.fullmatch("[0-9]+", reference.generate("What is 6 times 7?", regex="[0-9]+", max_tokens=4))
        or reference.last.finish_reason == "length"
    )
    reply = reference.chat(WEATHER, tools=TOOLS, tool_choice="required", max_tokens=80)
    assert isinstance(reply, ChatReply) and reply.tool_calls and reply.tool_calls[0].name in ("get_weather", "add")

    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "run",
            str(int4_folder),
            "-p",
            "What is 6 times 7?",
            "--json-schema",
            tmp_path / "s.json",
            "--max-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout[:-1] == text
    assert_user_error(run_cli("run", int4_folder, "-p", "x", "--regex", "[0-9"), "regex does not compile")
    assert_user_error(
        run_cli("run", int4_folder, "-p", "x", "--json-schema", tmp_path / "missing.json"), "cannot read JSON schema"
    )

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {
            "id": 1,
            "prompt": "What is 6 times 7?",
            "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        },
        {"id": 2, "messages": WEATHER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 80},
        {"id": 3, "prompt": "x", "json_schema": {"type": "strng"}},
    ]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "batch", str(int4_folder), str(inp), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    recs = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert recs[1]["text"] == text
    assert recs[2]["finish_reason"] == "tool_calls" and recs[2]["tool_calls"][0]["name"] in ("get_weather", "add")
    assert "does not compile" in recs[3]["error"]


# ---- other engines and template families -------------------------------------------------------

HERMES_TEMPLATE = (  # Qwen2.5's way of offering tools and reading calls and results back, in short
    "{%- if tools %}<|im_start|>system\nYou may call functions. <tools>\n{%- for t in tools %}{{ t | tojson }}\n"
    '{%- endfor %}</tools>\nReturn calls as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call><|im_end|>\n'
    "{%- endif %}{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{%- elif m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "<|im_end|>\n{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_llamacpp_engine_is_constrained_too(default_model_path):
    pytest.importorskip("llama_cpp")
    from lmforge.model import load

    model = load(default_model_path, engine="llamacpp", threads=2)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "rank": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    for seed in range(3):
        text = model.generate("Name a city.", json_schema=schema, temperature=1.0, seed=seed, max_tokens=60)
        jsonschema.validate(json.loads(text), schema)
    assert re.fullmatch("(yes|no)", model.generate("Is it?", regex="(yes|no)", max_tokens=4))


def test_a_template_that_knows_tools_gets_them_and_its_calls_are_read(tiny_factory, tmp_path):
    """Hermes/Qwen2.5-style template on a random-weight model: tools and history rendered by the
    template itself; a required call is constrained to the family's syntax and always parses."""
    from lmforge.export.convert import convert
    from lmforge.generate import fit_to_context
    from lmforge.model import ChatReply, load
    from lmforge.sampling import SamplingParams

    tools = [
        {
            "type": "function",
            "function": {
                "name": "w",
                "parameters": {
                    "type": "object",
                    "properties": {"c": {"type": "string", "maxLength": 6}},
                    "required": ["c"],
                    "additionalProperties": False,
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "a": {"type": "integer", "minimum": -9, "maximum": 9},
                        "b": {"type": "integer", "minimum": -9, "maximum": 9},
                    },
                    "required": ["a", "b"],
                    "additionalProperties": False,
                },
            },
        },
    ]
    from tests.test_errors import edited_copy

    # the tiny llama with room for a prompt that lists tools (its own context is 256 tokens)
    folder = convert(
        edited_copy(tiny_factory, tmp_path, "config.json", max_position_embeddings=1024), tmp_path / "m", progress=False
    )
    model = load(folder)
    model.chat_template = HERMES_TEMPLATE
    history = [
        {"role": "user", "content": "Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"c": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
        {"role": "user", "content": "1+2?"},
    ]
    plan = model.plan_tools(history, tools, "required")
    ids = model.prompt_ids(messages=plan.messages, tools=plan.template_tools)
    prompt = model.tokenizer.decode(ids)
    assert '"name": "add"' in prompt and '<tool_call>\n{"name": "w", "arguments": {"c": "Oslo"}}' in prompt
    assert "<tool_response>\n-3" in prompt and plan.syntax.name == "hermes"
    room = fit_to_context(len(ids), SamplingParams(max_tokens=1000), model.engine.context_length).max_tokens
    assert room >= 60, (len(ids), room)
    for seed in range(5):
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            reply = model.chat(history, tools=tools, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=room)
            assert isinstance(reply, ChatReply) and len(reply.tool_calls) == 1, reply
            call = reply.tool_calls[0]
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)
            assert choice == "required" or call.name == "add"


@pytest.mark.parametrize(
    "syntax,text,content,calls",
    [
        (
            "hermes",
            'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
            "Let me check.",
            [("f", {"a": 1}), ("g", {})],
        ),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', None, [("f", {"a": 1})]),
        ("phi4", '<|tool_call|>[{"name": "f", "arguments": {"x": "y"}}]<|/tool_call|>', None, [("f", {"x": "y"})]),
        ("llama3", '<|python_tag|>{"name": "f", "parameters": {"a": 2}}', None, [("f", {"a": 2})]),
        ("llama3", "Paris is the capital.", "Paris is the capital.", []),
        ("hermes", "<tool_call>\n{not json", "<tool_call>\n{not json", []),
        (None, '{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}', None, [("f", {"a": 1})]),
        (None, '{"content": "Hello"}', "Hello", []),
    ],
)
def test_tool_calls_are_read_per_family(syntax, text, content, calls):
    from lmforge.tools import SYNTAXES, parse_calls

    got_content, got = parse_calls(text, next((s for s in SYNTAXES if s.name == syntax), None))
    assert got_content == content and [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)

"""Every sampling option on every path: `lmforge run`, `Model.generate`, the server's two routes
(the official request shapes over a real uvicorn server) and `lmforge batch` accept the same
options under the same names and give the same text for the same seed. Each option is checked
to change the text, so a path that ignored it would fail."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.test_server import NAME, Server

PROMPT = "Write a sentence about the sea."
SAMPLED = {"temperature": 0.9, "seed": 3}

# (id, options, the options it must differ from): one option moves at a time
CASES = [
    ("greedy", {"temperature": 0.0}, None),
    ("seed", {**SAMPLED}, {"temperature": 0.0}),
    ("other-seed", {"temperature": 0.9, "seed": 4}, SAMPLED),
    ("top_p", {**SAMPLED, "top_p": 0.5}, SAMPLED),
    ("top_k", {**SAMPLED, "top_k": 3}, SAMPLED),
    ("min_p", {**SAMPLED, "min_p": 0.2}, SAMPLED),
    ("repetition_penalty", {"temperature": 0.0, "repetition_penalty": 1.5}, {"temperature": 0.0}),
    ("presence_penalty", {"temperature": 0.0, "presence_penalty": 2.0}, {"temperature": 0.0}),
    ("frequency_penalty", {"temperature": 0.0, "frequency_penalty": 2.0}, {"temperature": 0.0}),
    ("logit_bias", {"temperature": 0.0, "logit_bias": {"FIRST": -100}}, {"temperature": 0.0}),
    ("stop", {"temperature": 0.0, "stop": ["STOP"]}, {"temperature": 0.0}),
    ("max_tokens", {"temperature": 0.0, "max_tokens": 5}, {"temperature": 0.0}),
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model in this process, the greedy reply's first token and a stop string from it."""
    from lmforge.model import cached_onnx, load

    folder = cached_onnx(NAME, "cpu-int4", progress=False)
    model = load(folder, threads=1)
    greedy = list(model.stream_generate(model.prompt_ids(PROMPT), model_params(model, {"temperature": 0.0})))
    text = "".join(r.text for r in greedy)
    words = text.split()
    assert len(words) > 4, text
    return folder, model, {"FIRST": str(greedy[0].token), "STOP": " " + words[3]}


def resolve(options: dict, marks: dict) -> dict:
    """Options with the placeholders filled and max_tokens defaulted."""
    out = json.loads(json.dumps(options))
    if "logit_bias" in out:
        out["logit_bias"] = {marks[k]: v for k, v in out["logit_bias"].items()}
    if "stop" in out:
        out["stop"] = [marks[s] for s in out["stop"]]
    return {"max_tokens": MAX_TOKENS, **out}


def model_params(model, options):
    from lmforge.sampling import SamplingParams

    return SamplingParams.from_options({"max_tokens": MAX_TOKENS, **options})


def cli_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "logit_bias":
            flags += [a for t, b in value.items() for a in ("--logit-bias", f"{t}={b}")]
        elif key == "stop":
            flags += [a for s in value for a in ("--stop", s)]
        else:
            flags += [flag, str(value)]
    return flags


def test_every_option_gives_the_same_text_on_every_path(setup, tmp_path):
    folder, model, marks = setup
    cases = [(name, resolve(opts, marks), resolve(base, marks) if base else None) for name, opts, base in CASES]
    ids = model.prompt_ids(PROMPT)

    library = {name: model.generate(PROMPT, **opts) for name, opts, _ in cases}
    for name, _, base in cases:  # each option changes the text: a path ignoring it would fail below
        if base is not None:
            assert library[name] != model.generate(PROMPT, **base), name
    assert not library["stop"].endswith(marks["STOP"]) and library["stop"] in library["greedy"]

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": name, "prompt": PROMPT, **opts}) + "\n" for name, opts, _ in cases))
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "batch", str(folder), str(inp), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    batch = {rec["id"]: rec["text"] for rec in map(json.loads, out.read_text().splitlines())}

    server = Server(folder, "--name", NAME, "--max-batch", 4, "--threads", 2, log=tmp_path / "serve.log")
    try:
        chat, completion = {}, {}
        for name, opts, _ in cases:
            body = {"model": NAME, **opts}
            got = httpx.post(
                server.url + "/v1/chat/completions",
                timeout=60,
                json={**body, "messages": [{"role": "user", "content": PROMPT}]},
            ).json()
            chat[name] = got["choices"][0]["message"]["content"]
            got = httpx.post(server.url + "/v1/completions", timeout=60, json={**body, "prompt": ids}).json()
            completion[name] = got["choices"][0]["text"]
    finally:
        server.stop()

    for name, opts, _ in cases:
        r = subprocess.run(
            [sys.executable, "-m", "lmforge", "run", str(folder), "-p", PROMPT, *cli_flags(opts)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        got = {"cli": r.stdout[:-1], "batch": batch[name], "chat": chat[name], "completion": completion[name]}
        assert got == {k: library[name] for k in got}, name


@pytest.mark.parametrize(
    "options,param",
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 5}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_a_bad_option_is_the_same_user_error_everywhere(setup, tmp_path, options, param):
    """One validation: the library raises SamplingError naming the option, batch records it."""
    from lmforge.batch import Item, generate_record
    from lmforge.sampling import SamplingError

    _, model, _ = setup
    with pytest.raises(SamplingError) as e:
        model.generate(PROMPT, **options)
    assert e.value.param == param and param in str(e.value)
    rec = generate_record(model, Item(1, "x", {"prompt": PROMPT, **options}))
    assert rec["error"] == str(e.value)


def test_logit_bias_past_the_vocabulary_and_unknown_options(setup):
    from lmforge.sampling import SamplingError

    _, model, _ = setup
    with pytest.raises(SamplingError, match="below 49152"):
        model.generate(PROMPT, logit_bias={49152: 1.0})
    with pytest.raises(SamplingError, match="unknown sampling option 'temprature'"):
        model.generate(PROMPT, temprature=0.5)

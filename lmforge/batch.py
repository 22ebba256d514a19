"""`lmforge batch`: JSONL in, JSONL out, resumable.

Each input line `{"id": ..., "prompt" | "messages": ..., sampling fields}` gives one output line
`{"id": ..., "text": ..., "finish_reason": ..., "usage": ...}`. Records are appended and flushed
(fsync) as they finish, under a file lock; a rerun after a crash or `kill -9` reads what is there
(dropping a torn last line), skips ids already done, and so never writes an id twice. A bad
input line becomes an error record and the job goes on (an error record is final for its id, like
any record: fix the line and give it a new id to rerun it). One job writes an output at a time.
With `ray`, the same job runs as a Ray Data pipeline with one engine per actor, on a local Ray or
a cluster.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError, writing
from lmforge.progress import Progress
from lmforge.sampling import OPTION_NAMES, SamplingParams, response_format_options
from lmforge.speculative import DRAFT_MAX, check_options

log = logging.getLogger(__name__)
SAMPLING = tuple(sorted(OPTION_NAMES))  # every SamplingParams option, under its own name
OPENAI_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls")


@dataclass
class Item:
    """One input line: its number, its id (or None), the request, or why it cannot run."""

    line: int
    id: object = None
    request: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        return json.dumps(self.id) if self.id is not None else f"line:{self.line}"


def parse_lines(path: Path) -> Iterator[Item]:
    """Items of the input file; malformed lines come back with `error` set."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Item(n, error=f"line {n} is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield Item(n, error=f"line {n} is not JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                yield Item(n, error=f"line {n} is not a JSON object")
                continue
            item = Item(n, obj.get("id"))
            if item.id is None:
                item.error = f"line {n} has no id"
            elif ("prompt" in obj) == ("messages" in obj):
                item.error = f"line {n} needs exactly one of prompt and messages"
            elif "prompt" in obj and not isinstance(obj["prompt"], str):
                item.error = f"line {n}: prompt must be a string"
            elif "messages" in obj and not isinstance(obj["messages"], list):
                item.error = f"line {n}: messages must be a list"
            else:
                item.request = {k: obj[k] for k in ("prompt", "messages", *SAMPLING, *OPENAI_FIELDS) if k in obj}
            yield item


def done_keys(out: Path) -> set[str]:
    """Keys of the records already in OUT; a torn last line (a kill mid-write) is cut off."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    keys = set()
    for raw in data[:end].splitlines():
        try:
            rec = json.loads(raw.decode("utf-8"))
        except ValueError:  # JSON or UTF-8
            rec = None
        if not isinstance(rec, dict) or "id" not in rec:
            raise LmforgeError(f"{out} holds lines that are not lmforge batch records; choose another -o")
        keys.add(json.dumps(rec["id"]) if rec["id"] is not None else f"line:{rec.get('line')}")
    return keys


class Writer:
    """Appends one record per line, flushed to disk before the next, under an exclusive lock."""

    def __init__(self, out: Path):
        self.out = out
        with writing(out, "choose a writable -o with room for the records", every=True):
            self.f = open(out, "ab", buffering=0)  # unbuffered: a failed write is undone exactly
            self.job_lock = open(out.with_name(out.name + ".lock"), "w")  # held for a whole job

    def write(self, record: dict) -> None:
        """Append one record; a destination that cannot take it (full, over the file-size limit)
        is one LmforgeError and leaves no part of the line behind."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fcntl.flock(self.f, fcntl.LOCK_EX)
        try:
            end = self.f.seek(0, os.SEEK_END)
            with writing(self.out, "free space or choose another -o; rerunning resumes after the last record"):
                try:
                    view = memoryview(line)
                    while view:  # a write that meets the limit writes part of the line, then fails
                        view = view[os.write(self.f.fileno(), view) :]
                    os.fsync(self.f.fileno())
                except OSError:
                    os.ftruncate(self.f.fileno(), end)  # no torn line left behind
                    raise
        finally:
            fcntl.flock(self.f, fcntl.LOCK_UN)

    def close(self) -> None:
        self.f.close()
        self.job_lock.close()


def error_record(item: Item) -> dict:
    return {"id": item.id, "line": item.line, "error": item.error}


def generate_record(model, item: Item) -> dict:
    """Run one request through a loaded `lmforge.model.Model`: sampling options, and OpenAI's
    response_format and tools (the record then carries `tool_calls`, as the server's reply does)."""
    req = item.request
    try:
        options = {k: req[k] for k in SAMPLING if k in req}
        options.update(response_format_options(req["response_format"]) if "response_format" in req else {})
        messages = req["messages"] if "messages" in req else None
        plan = None
        if "tools" in req:
            messages = messages or [{"role": "user", "content": req["prompt"]}]
            choice, parallel = req.get("tool_choice", "auto"), req.get("parallel_tool_calls", False)
            plan = model.plan_tools(messages, req["tools"], choice, parallel)
            options = plan.options(options)
            ids = model.prompt_ids(messages=plan.messages, tools=plan.template_tools)
        else:
            ids = model.prompt_ids(messages=messages) if messages is not None else model.prompt_ids(req["prompt"])
        params = SamplingParams.from_options(options)
        steps = list(model.stream_generate(ids, params))
    except LmforgeError as e:
        return {"id": item.id, "line": item.line, "error": str(e)}
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        return {"id": item.id, "line": item.line, "error": f"bad request fields ({type(e).__name__}: {e})"}
    last = steps[-1]
    n = last.generation_tokens
    record = {
        "id": item.id,
        "text": "".join(r.text for r in steps),
        "finish_reason": last.finish_reason,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
    }
    if plan is not None:
        content, calls = plan.parse(record["text"])
        if calls:
            record.update(text=content, finish_reason="tool_calls")
            record["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
    if params.logprobs:
        record["logprobs"] = [
            {"token": i.token, "logprob": i.logprob, "top_logprobs": i.top} for r in steps for i in r.logprobs
        ]
    return record


def plan(inp: Path, out: Path) -> tuple[list[Item], list[Item], list[Item], int]:
    """(items to run, bad items to record, duplicates, records already done)."""
    done = done_keys(out)
    todo, bad, dups, seen = [], [], [], set()
    for item in parse_lines(inp):
        if item.key in seen:
            dups.append(item)
            continue
        seen.add(item.key)
        if item.key in done:
            continue
        (bad if item.error else todo).append(item)
    return todo, bad, dups, len(done)


def run_batch(
    model: str,
    inp: str | os.PathLike,
    out: str | os.PathLike,
    target: str | None = None,
    ray: str | bool | None = None,
    workers: int = 1,
    progress: bool | None = None,
    speculative: str | None = None,
    draft: str | None = None,
    draft_max: int = DRAFT_MAX,
) -> dict:
    """Run every pending line of INP through MODEL into OUT; returns counts.

    Args: the model (anything `lmforge.load` takes); input and output JSONL paths; target preset
    when MODEL must be converted; `ray`: False for this process, True for a local Ray, or a
    cluster address; Ray actors (engines) to start; progress bar (default: on a terminal);
    speculative decoding as `lmforge.load` takes it (in this process; Ray actors use the default)."""
    check_options(speculative or "ngram", draft_max)
    inp, out = Path(inp), Path(out)
    if not inp.is_file():
        raise LmforgeError(f"no input file {inp}; give a JSONL file with one request per line")
    if out.is_dir():
        raise LmforgeError(f"-o {out} is a folder; give a .jsonl file path")
    if not out.parent.exists():
        raise LmforgeError(f"folder {out.parent} does not exist; create it first")
    if out.exists() and os.path.samefile(inp, out):
        raise LmforgeError("-o must differ from the input file")
    writer = Writer(out)
    try:
        try:  # one job per output file: a second one would plan the same ids
            fcntl.flock(writer.job_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LmforgeError(f"another lmforge batch is writing {out}; wait for it or choose another -o") from None
        todo, bad, dups, n_done = plan(inp, out)
        for d in dups:
            log.warning("id %r on line %d repeats an earlier line; it runs once", d.id, d.line)
        for item in bad:
            writer.write(error_record(item))
        if ray:
            from lmforge.batch_ray import run_on_ray

            run_on_ray(model, todo, writer, target, None if ray is True else ray, workers)
        else:
            from lmforge.model import load

            m = load(model, target=target, speculative=speculative, draft=draft, draft_max=draft_max)
            bar = Progress(len(todo), progress, "batch", unit="req", leave=True)
            for item in todo:
                writer.write(generate_record(m, item))
                bar.update()
    finally:
        writer.close()
    return {"ran": len(todo), "errors": len(bad), "duplicates": len(dups), "already_done": n_done}

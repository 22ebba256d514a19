"""Chat templates: the model's own Jinja template, rendered in Jinja's immutable sandbox, bounded.

Templates come from checkpoints people download; the sandbox refuses attribute access that
could reach Python internals (`__class__`, `__globals__`, ...), so a hostile template fails
with a one-line error instead of running code. The sandbox here also bounds what a render may
cost: every string, list and number the template makes is measured before (or as) it is made
against `RenderLimits` (one object's size, the sum of all it makes, integer size, call arguments).
Those checks are the first line and give the clearer messages; the second is that renders run in
small worker processes (started once, `RENDER_WORKERS` of them) whose address space is capped at
`WORKER_MEMORY` over what they start with, and that are killed (and restarted) when a render passes
its deadline, so no template can hold memory or a thread past its limits. Over a limit is a
ChatTemplateError.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import queue
import re
import select
import string
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import ChatTemplateError


@dataclass(frozen=True)
class RenderLimits:
    """What one render may cost. Real chat templates use a tiny fraction of each."""

    timeout_s: float = 1.0  # wall clock for the whole render (the worker is killed past it)
    max_size: int = 4_000_000  # characters of one string, items of one list (and the output)
    # characters and items of everything the render makes, summed (temporaries included): high, so
    # that a template building the prompt with `text + ...` renders a long conversation; the
    # worker's memory cap and deadline bound what a hostile one makes
    max_total: int = 4_000_000_000
    max_argument: int = 100_000  # any integer passed to a call or filter (widths, counts, ...)
    max_int_bits: int = 1 << 16  # the size of an integer the template computes


RENDER_LIMITS = RenderLimits()
RENDER_WORKERS = 2  # renders at once, in all threads of a process (a server's requests wait their turn)
WORKER_MEMORY = 256 << 20  # bytes of address space a worker may add to what it starts with
_WIDTH = re.compile(r"\d+")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")


def _raise_exception(message):
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    # HF's tojson keeps non-ASCII text as is (Jinja's default filter escapes it).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


_current = threading.local()  # .budget: the _Budget of the render running on this thread


def _budget() -> _Budget:
    budget = getattr(_current, "budget", None)
    return budget if budget is not None else _Budget(RENDER_LIMITS)  # outside render(): the default limits


def _size(value) -> int:
    """What `value` counts against the limits: characters or items (a large int by its words)."""
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 64
    return 0


class _Budget:
    """One render's account: its deadline and what it has made so far."""

    def __init__(self, limits: RenderLimits):
        self.limits, self.made = limits, 0
        self.deadline = time.monotonic() + limits.timeout_s

    def over(self, what: str, limit) -> ChatTemplateError:
        return ChatTemplateError(
            f"chat template went over its limit ({what}; the limit is {limit}); it is broken or hostile: "
            "use a trusted template"
        )

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(
                f"chat template took more than {self.limits.timeout_s:g} s to render; it is broken or hostile: "
                "use a trusted template"
            )

    def charge(self, n: int, what: str = "a value") -> None:
        """Count `n` characters or items about to be made (or just made)."""
        if n > self.limits.max_size:
            raise self.over(f"{what} of {n:,} characters or items", f"{self.limits.max_size:,}")
        self.made += n
        if self.made > self.limits.max_total:
            raise self.over("everything it made adds up to more", f"{self.limits.max_total:,}")
        self.clock()

    def arguments(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limits.max_argument:
                raise self.over(f"an argument of {a:,}", f"{self.limits.max_argument:,}")

    def ints(self, bits: int) -> None:
        if bits > self.limits.max_int_bits:
            raise self.over(f"an integer of about {bits:,} bits", f"{self.limits.max_int_bits:,} bits")


def _deep_size(value) -> int:
    """`_size` of `value` and of what it holds, one level down (what its text takes, about)."""
    if isinstance(value, dict):
        return len(value) + sum(_size(k) + _size(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return len(value) + sum(map(_size, value))
    return _size(value)


def _biggest(args, kwargs=None) -> int:
    """The largest `_deep_size` among the arguments (and the values of a single mapping argument)."""
    values = [*args, *(kwargs or {}).values()]
    if len(values) == 1 and isinstance(values[0], (dict, tuple)):  # `fmt % {...}`, `fmt % (a, b)`
        values = list(values[0].values() if isinstance(values[0], dict) else values[0])
    return max(map(_deep_size, values), default=0)


def _format_widths(fmt: str, biggest: int = 0) -> int:
    """The characters str.format's fields in `fmt` can make: each field's width and precision, and
    the largest argument in each (one argument may fill many fields)."""
    total = 0
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is not None:
            total += biggest + sum(int(w) for w in _WIDTH.findall(spec or ""))
    return total


def _percent_widths(fmt: str, biggest: int = 0) -> int:
    """The same for printf-style `fmt % args`."""
    return sum(int(w or 0) + int(p or 0) + biggest for w, p in _PERCENT_SPEC.findall(fmt))


def _joined_size(separator, items) -> int:
    if not isinstance(separator, str) or not isinstance(items, (list, tuple, str)):
        return 0
    return len(separator) * len(items) + sum(len(x) for x in items if isinstance(x, str))


def _expected_size(name: str, target, args, kwargs=None) -> int:
    """A bound on what the str method or filter `name` makes from `target` and `args`, for the
    ones that can make far more than they are given (0: nothing to check beforehand)."""
    if name == "join" and args:  # str.join(items) or items|join(separator)
        return _joined_size(target, args[0]) if isinstance(target, str) else _joined_size(args[0], target)
    if name == "sum" and isinstance(target, (list, tuple)):  # sum of lists copies as it goes: quadratic
        return len(target) * sum(len(x) for x in target if isinstance(x, (list, tuple, str))) // 2
    if not isinstance(target, str):
        return 0
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return len(target) + (len(target) // max(len(args[0]), 1) + 1) * len(args[1])
    if name == "expandtabs" and args and isinstance(args[0], int):
        return len(target) + target.count("\t") * args[0]
    width = args[0] if args else (kwargs or {}).get("width")
    if name == "indent" and isinstance(width, (int, str)):  # a width of spaces, or a string
        return len(target) + (target.count("\n") + 1) * (width if isinstance(width, int) else len(width))
    if name in ("format", "format_map"):
        return len(target) + _format_widths(target, _biggest(args, kwargs))
    return 0


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at the first unsafe attribute instead of yielding an
    Undefined that renders as an empty string, and holding each render to its `_Budget`."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.code_generator_class = _BoundedCodeGenerator

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is not allowed")

    def call_binop(self, context, op, left, right):
        budget = _budget()
        ints = isinstance(left, int) and isinstance(right, int)
        if op == "*" and ints:
            budget.ints(left.bit_length() + right.bit_length())
        elif op == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and hasattr(seq, "__len__"):  # `[x] * n` counts x's size too
                budget.charge(_deep_size(seq) * max(times, 0), "a repeated string or list")
        elif op == "**" and ints and right > 1 and abs(left) > 1:
            budget.ints(left.bit_length() * right)
        elif op == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            budget.charge(len(left) + len(right), "a joined string or list")
        elif op == "%" and isinstance(left, str):
            budget.arguments(right if isinstance(right, tuple) else (right,), {})  # `*` widths come from here
            budget.charge(len(left) + _percent_widths(left, _biggest((right,))), "a formatted string")
        result = super().call_binop(context, op, left, right)
        if isinstance(result, int) and not isinstance(result, bool):
            budget.ints(result.bit_length())
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        budget = _budget()
        budget.arguments(args, kwargs)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        name = getattr(method, "__name__", "")
        if name == "join" and args:  # str.join over a generator: listed first, so that it is counted
            args = (_listed(args[0]), *args[1:])
        expected = _expected_size(name, getattr(method, "__self__", None), args, kwargs)
        if expected:
            budget.charge(expected, f"the result of {__obj.__name__}()")
        result = super().call(__context, __obj, *args, **kwargs)
        budget.charge(_size(result), "a call's result")
        return result

    def getslice(self, obj, start, stop, step):  # obj[start:stop:step]
        result = obj[start:stop:step]
        _budget().charge(_size(result), "a slice")
        return result

    def concat(self, parts) -> str:  # block sets, macros and call blocks join their output here
        return self.join_strings(list(parts))

    def join_strings(self, parts) -> str:  # the `~` operator
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        _budget().charge(sum(map(len, parts)), "a joined string")
        return "".join(parts)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with `a ~ b` and slices routed through the environment
    (`join_strings`, `getslice`), where they are counted."""

    def visit_Getitem(self, node, frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("environment.getslice(")
        self.visit(node.node, frame)
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            self.write(", ")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write(")")
        return None

    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.join_strings((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")
        return None


def _bounded_filter(name: str, fn):
    """The filter `fn` held to the render's budget: integer arguments capped, its result counted (and for
    the filters that can multiply their input, a bound checked before it runs)."""

    def bounded(*args, **kwargs):
        budget = _budget()
        plain = args[1:] if passes_context else args  # Jinja's context or environment comes first
        budget.arguments(plain[1:], kwargs)
        target, rest = (plain[0], plain[1:]) if plain else (None, [])
        if name == "join" and plain:  # a generator of items: listed first, so that it is counted
            target = _listed(target)
            args = (*args[: len(args) - len(plain)], target, *rest)
        expected = _expected_size(name, target, rest, kwargs)
        if name == "format" and isinstance(target, str):
            expected = len(target) + _percent_widths(target, _biggest(rest, kwargs))
        if name == "tojson":  # each item on a line of its own, indented
            indent = rest[0] if rest else kwargs.get("indent")
            if isinstance(indent, int) and indent > 0:
                expected = (_deep_size(target) + 1) * (indent + 2)
        if expected:
            budget.charge(expected, f"the result of |{name}")
        result = fn(*args, **kwargs)
        budget.charge(_size(result), f"the result of |{name}")
        return result

    passes_context = hasattr(fn, "jinja_pass_arg")
    if passes_context:  # pass_context / pass_environment / pass_eval_context
        bounded.jinja_pass_arg = fn.jinja_pass_arg
    return bounded


def _listed(items):
    """`items` as a list (counted) when it is a generator or other lazy iterable, else as it is."""
    if isinstance(items, (str, bytes, list, tuple, dict)) or not hasattr(items, "__iter__"):
        return items
    listed = []
    for item in items:
        listed.append(item)
        _budget().charge(1 + _size(item), "the items to join")
    return listed


def _lipsum(lipsum):
    def bounded(n=5, html=True, min=20, max=100):  # noqa: A002 - Jinja's argument names
        _budget().arguments((n, min, max), {})
        _budget().charge(n * max * 12 if n > 0 and max > 0 else 0, "lipsum text")
        return lipsum(n, html, min, max)

    return bounded


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """`template` compiled in a bounded sandbox (the few templates a process uses stay compiled)."""
    return _environment().from_string(template)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["lipsum"] = _lipsum(env.globals["lipsum"])
    return env


def render(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict] | None = None,
    limits: RenderLimits = RENDER_LIMITS,
    **extra,
) -> str:
    """Render `messages` with a Jinja chat `template` in the sandbox, within `limits`, in a worker process.

    Args: the template text; OpenAI-style messages; whether to open the assistant's turn;
    the model's BOS/EOS token strings; optional tool definitions; what the render may cost;
    extra template variables (JSON values). Returns the prompt text (special tokens as text: encode
    it with parse_special=True). Raises ChatTemplateError for a broken or hostile template, or one
    over its limits. Thread-safe; at most RENDER_WORKERS renders run at once, the others wait."""
    variables = dict(add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
    request = {"template": template, "messages": messages, "tools": tools, "variables": {**variables, **extra}}
    request["limits"] = limits.__dict__
    try:
        data = json.dumps(request, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError) as e:
        raise ChatTemplateError(f"the conversation cannot be rendered ({e}); pass JSON values") from None
    return _POOL.render(data, limits)


def _render_here(template: str, messages, tools, variables: dict, limits: RenderLimits) -> str:
    """Render in this process (the worker's side of `render`), held to the sandbox's size checks."""
    budget = _Budget(limits)
    outer = getattr(_current, "budget", None)
    try:
        compiled = _compile(template)
        _current.budget = budget
        out, size = [], 0
        for piece in compiled.generate(messages=messages, tools=tools, **variables):
            budget.charge(len(piece), "an output piece")
            size += len(piece)
            if size > limits.max_size:
                raise budget.over(f"an output of over {size:,} characters", f"{limits.max_size:,}")
            out.append(piece)
        return "".join(out)
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried to leave the sandbox ({e}); use a trusted template") from None
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template is broken ({e.__class__.__name__}: {e}); fix or replace it") from None
    except MemoryError:
        raise budget.over("memory ran out", f"{WORKER_MEMORY >> 20} MiB") from None
    except RecursionError:
        raise budget.over("calls nested too deep", f"{sys.getrecursionlimit()} levels") from None
    except Exception as e:  # a template's own runtime errors (None + str, huge ranges, ...)
        raise ChatTemplateError(f"chat template failed on these messages ({e.__class__.__name__}: {e})") from None
    finally:
        _current.budget = outer


# ---- the worker processes ----------------------------------------------------------------------
# A request and its answer are a 4-byte length and that many bytes of JSON. The answer is
# {"text": ...} or {"error": ...}; after a MemoryError the worker answers, then exits (a fresh one
# starts for the next render).

_HEADER = struct.Struct("!I")


def _answer(request: bytes) -> tuple[dict, bool]:
    """The worker's answer to one request, and whether it should exit after it."""
    try:
        r = json.loads(request)
        limits = RenderLimits(**r["limits"])
        return {"text": _render_here(r["template"], r["messages"], r["tools"], r["variables"], limits)}, False
    except ChatTemplateError as e:
        return {"error": str(e)}, "memory ran out" in str(e)
    except MemoryError:
        return {"error": _Budget(RENDER_LIMITS).over("memory ran out", f"{WORKER_MEMORY >> 20} MiB").args[0]}, True


def _worker_main() -> None:
    """A render worker: caps its own address space, then answers requests on stdin until it closes
    (its parent gone, even killed). Ctrl-C is the parent's to handle."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration):  # no /proc: a generous guess at an interpreter with Jinja loaded
        size = 512 << 20
    cap = size + WORKER_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out.write(b"R")  # ready: the render's deadline starts after the start-up
    out.flush()
    while header := inp.read(_HEADER.size):
        answer, leave = _answer(inp.read(_HEADER.unpack(header)[0]))
        try:
            data = json.dumps(answer, ensure_ascii=False).encode("utf-8", "surrogatepass")
        except MemoryError:
            data, leave = b'{"error": "chat template went over its memory limit"}', True
        out.write(_HEADER.pack(len(data)) + data)
        out.flush()
        if leave:
            return


class _Worker:
    """One worker process, started on first use."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            code = "from lmforge.chat import _worker_main; _worker_main()"
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                start_new_session=True,  # a terminal's Ctrl-C goes to the CLI, not to its worker
            )
            try:
                ready = self._read(self.process, 1, time.monotonic() + 60)
            except TimeoutError:
                ready = None
            if ready != b"R":
                self.stop()
                raise ChatTemplateError("the chat template worker process did not start; see the log above")
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def ask(self, data: bytes, timeout_s: float) -> dict:
        """The worker's answer to `data`; ChatTemplateError past `timeout_s` after sending it, or when
        the worker dies (the worker is then stopped, and the next render starts a fresh one)."""
        process = self.start()
        try:
            process.stdin.write(_HEADER.pack(len(data)) + data)
            deadline = time.monotonic() + timeout_s
            header = self._read(process, _HEADER.size, deadline)
            body = header and self._read(process, _HEADER.unpack(header)[0], deadline)
        except TimeoutError:
            self.stop()
            raise ChatTemplateError(
                f"chat template took more than {timeout_s:g} s to render; it is broken or hostile: "
                "use a trusted template"
            ) from None
        except OSError:  # BrokenPipeError: the worker is gone
            body = None
        if not body:
            self.stop()
            raise _Budget(RENDER_LIMITS).over("its render process died, out of memory", f"{WORKER_MEMORY >> 20} MiB")
        return json.loads(body)

    @staticmethod
    def _read(process: subprocess.Popen, n: int, deadline: float) -> bytes | None:
        """`n` bytes from the worker, None when it closed its end; TimeoutError past `deadline`."""
        fd, parts = process.stdout.fileno(), []
        while n > 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            part = os.read(fd, min(n, 1 << 20))
            if not part:
                return None
            parts.append(part)
            n -= len(part)
        return b"".join(parts)


class _Pool:
    """RENDER_WORKERS workers shared by all threads; a render waits for a free one."""

    def __init__(self, size: int):
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.workers = [_Worker() for _ in range(size)]
        for worker in self.workers:
            self.free.put(worker)
        atexit.register(self.close)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()

    def start(self) -> None:
        taken = [self.free.get() for _ in self.workers]  # so that no render starts one at the same time
        try:
            for worker in taken:
                worker.start()
        finally:
            for worker in taken:
                self.free.put(worker)

    def render(self, data: bytes, limits: RenderLimits) -> str:
        worker = self.free.get()
        try:
            answer = worker.ask(data, limits.timeout_s)
        finally:
            self.free.put(worker)
        if "error" in answer:
            raise ChatTemplateError(answer["error"])
        return answer["text"]


_POOL = _Pool(RENDER_WORKERS)


def start_workers() -> None:
    """Start the render workers now (a server does, so that its first requests do not wait for them)."""
    _POOL.start()


def template_from_folder(folder: Path) -> str | None:
    """The chat template of an HF folder: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's `chat_template` (first named one when it is a list)."""
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ChatTemplateError(f"{path} is not valid JSON; fix or re-download it") from None
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value}
            value = named.get("default") or next(iter(named.values()), None)
        if value:
            return value
    return None


def render_with(
    template: str, tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
) -> str:
    """Render `messages` (and OpenAI-style `tools`, as transformers passes them) with `template`
    and the BOS/EOS strings of `tokenizer`."""
    name = tokenizer.id_to_token
    return render(
        template,
        messages,
        add_generation_prompt,
        bos_token=name(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
        eos_token=name(tokenizer.eos_ids[0]) if tokenizer.eos_ids else "",
        tools=tools,
    )


def render_for(checkpoint, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` with `checkpoint`'s own template and special-token strings."""
    template = checkpoint.chat_template()
    if not template:
        raise ChatTemplateError(f"{checkpoint.path} carries no chat template; use a raw prompt instead")
    return render_with(template, checkpoint.tokenizer(), messages, add_generation_prompt)

"""`lmforge.load`: one object to generate with, whatever the source.

A source that is not already an ONNX folder (known name, HF folder, GGUF file) is converted
once into the cache folder, under a file lock so concurrent runs convert it only once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmforge.chat import render_with, template_from_folder
from lmforge.checkpoint import resolve, source_label
from lmforge.errors import LmforgeError
from lmforge.export.targets import DEFAULT_TARGET, get_target
from lmforge.generate import GenerationResponse, stream_generate
from lmforge.registry import cache_dir
from lmforge.runtime.engine import ENGINES as RUNTIME_ENGINES
from lmforge.runtime.ort import OrtEngine, is_onnx_folder
from lmforge.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.tools import ToolCall, plan_tools, template_messages

log = logging.getLogger(__name__)

# A model with no chat template: a plain prompt runs as raw text, said once on stderr (what Ollama
# does with a model that has no TEMPLATE); chat messages are refused rather than wrapped in a guessed
# format (llama.cpp's ChatML fallback) the model was never trained on, which answers plausibly wrong.
NO_TEMPLATE_RAW = "this model has no chat template: the prompt runs as raw text to continue (--raw silences this)"
NO_TEMPLATE_CHAT = (
    "this model has no chat template, so it cannot take chat messages; give it a plain prompt to continue as "
    'raw text (lmforge run -p TEXT, POST /v1/completions, a "prompt" field in batch)'
)


@dataclass
class ChatReply:
    """A reply to a chat with tools: its text (None when it only calls tools) and its calls."""

    content: str | None
    tool_calls: list[ToolCall]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_onnx(model: str | os.PathLike, target: str = DEFAULT_TARGET, progress: bool | None = None) -> Path:
    """The ONNX folder for MODEL: MODEL itself if lmforge wrote it, else a cached conversion."""
    from lmforge.export.convert import FORMAT_VERSION, convert

    path = resolve(model)
    if is_onnx_folder(path):
        return path
    get_target(target)
    files = sorted(path.iterdir()) if path.is_dir() else [path]  # a folder's files, not its own mtime
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())
    key = hashlib.sha256(f"{path.resolve()}|{stamp}|{target}|{FORMAT_VERSION}".encode())
    out = cache_dir() / "onnx" / f"{source_label(path)}-{target}-{key.hexdigest()[:12]}"
    with _locked(out.with_name(out.name + ".lock")):
        if not is_onnx_folder(out):
            convert(path, out, target=target, force=True, progress=progress)
        os.utime(out)  # its mtime says when it was last used (`lmforge models`)
    return out


class Model:
    """A loaded model: `generate`, `stream`, `chat` and `stream_chat` take the options of
    `lmforge.sampling.SamplingParams` as keywords (max_tokens, temperature, top_p, top_k, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed, stop, logprobs,
    top_logprobs, and one output constraint: json_schema, regex or grammar), and raw=True skips the
    chat template; `chat` also takes OpenAI-style tools. `last` is the last GenerationResponse;
    `form` says in words which form runs (e.g. "cpu-int4 (exact transcode of Q4_1, Q8_0)")."""

    def __init__(self, engine, tokenizer: Tokenizer, chat_template: str | None, form: str = ""):
        self.engine = engine
        self.form = form
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = tuple(dict.fromkeys([*engine.eos_token_ids, *tokenizer.eos_ids]))
        self.last: GenerationResponse | None = None
        self._said_raw = False

    def prompt_ids(
        self, prompt: str | None = None, messages: list[dict] | None = None, raw: bool = False, tools=None
    ) -> list[int]:
        """Token ids for a prompt (through the chat template unless raw) or a conversation (with
        the tools a template that knows tools is given)."""
        tok = self.tokenizer
        if messages is None and (raw or not self.chat_template):
            if not raw and not self._said_raw:  # as Ollama runs a model with no TEMPLATE: the prompt as it is
                self._said_raw = True
                log.warning(NO_TEMPLATE_RAW)
            return tok.encode(prompt, add_special=True)
        messages = messages if messages is not None else [{"role": "user", "content": prompt}]
        if not self.chat_template:
            from lmforge.errors import ChatTemplateError

            raise ChatTemplateError(NO_TEMPLATE_CHAT)
        return tok.encode(render_with(self.chat_template, tok, messages, tools=tools), parse_special=True)

    def stream_generate(self, ids: list[int], params: SamplingParams | None = None) -> Iterator[GenerationResponse]:
        """One GenerationResponse per generated token of the completion of token ids `ids`."""
        for r in stream_generate(self.engine, self.tokenizer, ids, params, self.eos_token_ids):
            self.last = r
            yield r

    def _pieces(self, ids: list[int], options: dict) -> Iterator[str]:
        """One text piece per generated token (possibly empty while a character is incomplete);
        the EOS step yields only text still held back."""
        for r in self.stream_generate(ids, SamplingParams.from_options(options)):
            if r.token not in self.eos_token_ids or r.text:
                yield r.text

    def stream(self, prompt: str, raw: bool = False, **options) -> Iterator[str]:
        """Yield one text piece per generated token of the completion of `prompt`."""
        return self._pieces(self.prompt_ids(prompt, raw=raw), options)

    def generate(self, prompt: str, raw: bool = False, **options) -> str:
        """The completion of `prompt` as one string."""
        return "".join(self._pieces(self.prompt_ids(prompt, raw=raw), options))

    def stream_chat(self, messages: list[dict], **options) -> Iterator[str]:
        """Yield the assistant's reply to `messages` piece by piece (one per generated token)."""
        return self._pieces(self.prompt_ids(messages=messages), options)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice="auto", **options):
        """The assistant's reply to an OpenAI-style list of messages: its text; or, with OpenAI-style
        `tools` (and tool_choice "auto" | "none" | "required" | {"type": "function", "function":
        {"name": ...}}), a ChatReply with the content and the parsed tool calls."""
        if tools is None:
            return "".join(self._pieces(self.prompt_ids(messages=messages), options))
        plan = self.plan_tools(messages, tools, tool_choice, options.pop("parallel_tool_calls", False))
        ids = self.prompt_ids(messages=plan.messages, tools=plan.template_tools)
        content, calls = plan.parse("".join(self._pieces(ids, plan.options(options))))
        return ChatReply(content, calls)

    def plan_tools(self, messages: list[dict], tools: list[dict], tool_choice="auto", parallel: bool = False):
        """How this model's template takes `tools` (see `lmforge.tools.plan_tools`)."""
        if not self.chat_template:
            from lmforge.errors import ChatTemplateError

            raise ChatTemplateError("this model has no chat template, so it cannot be given tools")
        return plan_tools(self.chat_template, template_messages(messages), tools, tool_choice, parallel)


ENGINES = ("auto", *RUNTIME_ENGINES)


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def pick_engine(path: Path, engine: str = "auto", device: str = "cpu", target: str | None = None) -> str:
    """ "ort" or "llamacpp" for a resolved model path: `auto` takes llama.cpp for a GGUF file when
    llama-cpp-python is installed (and no ONNX target or DirectML was asked for; for CUDA, when it
    is a CUDA build), else ONNX Runtime."""
    from importlib.util import find_spec

    if engine not in ENGINES:
        raise LmforgeError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "auto":
        if not (_is_gguf(path) and target is None and device in ("cpu", "cuda") and find_spec("llama_cpp")):
            return "ort"
        if device == "cuda":  # PyPI's llama-cpp-python is a CPU build: then CUDA means ONNX Runtime
            from lmforge.runtime.llamacpp import supports_gpu_offload

            return "llamacpp" if supports_gpu_offload() else "ort"
        return "llamacpp"
    if engine == "llamacpp" and not _is_gguf(path):
        raise LmforgeError(
            f"the llama.cpp engine runs .gguf files and {path} is not one; "
            f"write one first (lmforge convert {path} -o model.gguf --gguf q8_0) or use --engine ort"
        )
    return engine


def describe_form(folder: Path) -> str:
    """Which form an ONNX folder holds, in words: its target and how its weights were made."""
    from lmforge.export.folder import META_FILE

    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return f"{folder.name} (an onnxruntime-genai folder, as it is)"
    meta = json.loads(meta_path.read_text())
    quant = meta.get("quant")
    if not quant:
        how = f"{'fp32' if meta.get('dtype') == 'float32' else 'fp16'} weights"
    elif meta.get("transcoded"):
        how = f"exact transcode of {', '.join(meta['transcoded'])}"
        if meta.get("requantized"):
            how += f"; {', '.join(meta['requantized'])} quantized again with {quant['method'].upper()}"
    else:
        how = f"int{quant['bits']} {quant['method'].upper()}, block {quant['block_size']}"
    return f"{meta.get('target', folder.name)} ({how})"


def has_chat_template(model: str | os.PathLike) -> bool:
    """Whether MODEL (as `load` takes it) carries a chat template, read from its files without
    loading or converting it."""
    path = resolve(model)
    if _is_gguf(path):
        from lmforge.checkpoint import open_checkpoint

        return bool(open_checkpoint(path).chat_template())
    return bool(template_from_folder(path))


def load(
    model: str | os.PathLike,
    device: str = "cpu",
    target: str | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    engine: str = "auto",
    session_config: dict[str, str] | None = None,
) -> Model:
    """Load MODEL (known name, HF folder, GGUF file, or an ONNX folder lmforge wrote) for generation.

    Args: the model; device cpu|cuda|dml; target preset used when MODEL needs converting to ONNX
    (default: cpu-int4 for the CPU, cuda-fp16 for CUDA); threads; progress bar; engine
    auto|ort|llamacpp (auto: llama.cpp for a GGUF file when llama-cpp-python is installed);
    ONNX Runtime session config entries. Returns a `Model`."""
    path = resolve(model)
    if pick_engine(path, engine, device, target) == "llamacpp":
        from lmforge.checkpoint import open_checkpoint
        from lmforge.runtime.llamacpp import LlamaCppEngine

        ckpt = open_checkpoint(path)
        runner = LlamaCppEngine(path, device=device, threads=threads)
        return Model(runner, ckpt.tokenizer(), ckpt.chat_template(), f"{path.name} on llama.cpp (as it is)")
    target = target or ("cuda-fp16" if device == "cuda" else DEFAULT_TARGET)
    folder = cached_onnx(model, target, progress)
    ort_engine = OrtEngine(folder, device=device, threads=threads, session_config=session_config)
    return Model(ort_engine, Tokenizer.from_folder(folder), template_from_folder(folder), describe_form(folder))

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
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmforge.chat import render_with, template_from_folder
from lmforge.checkpoint import resolve, source_label
from lmforge.errors import LmforgeError, writing
from lmforge.export.targets import DEFAULT_TARGET, get_target
from lmforge.generate import GenerationResponse, PrefixCache, stream_generate
from lmforge.registry import cache_dir
from lmforge.runtime.engine import ENGINES as RUNTIME_ENGINES
from lmforge.runtime.ort import OrtEngine, is_onnx_folder
from lmforge.sampling import SamplingParams
from lmforge.speculative import DRAFT_MAX, Speculation, check_options
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


CACHE_HINT = "set LMFORGE_HOME to a writable folder with room for the converted model"


@contextmanager
def _locked(path: Path):
    with writing(path.parent, CACHE_HINT, every=True):  # a read-only or missing cache: one line
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w")
    with f:
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
    with _locked(out.with_name(out.name + ".lock")), writing(out, CACHE_HINT):
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
    `form` says in words which form runs (e.g. "cpu-int4 (exact transcode of Q4_1, Q8_0)").

    `speculation` (a `lmforge.speculative.Speculation`, None: plain decoding) drafts tokens and
    verifies them in one pass; its `stats` count tokens per verify. `prefix` keeps the KV cache of
    the last call: the next prompt prefills only what follows the prefix they share
    (`prefix.reused` tokens); None turns that off."""

    def __init__(
        self,
        engine,
        tokenizer: Tokenizer,
        chat_template: str | None,
        form: str = "",
        speculation: Speculation | None = None,
        prefix_reuse: bool = True,
    ):
        self.engine = engine
        self.form = form
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = tuple(dict.fromkeys([*engine.eos_token_ids, *tokenizer.eos_ids]))
        self.last: GenerationResponse | None = None
        self._said_raw = False
        self.speculation = speculation
        self.prefix = PrefixCache() if prefix_reuse else None

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
        spec = self.speculation
        for r in stream_generate(self.engine, self.tokenizer, ids, params, self.eos_token_ids, self.prefix, spec):
            self.last = r
            yield r

    def _pieces(self, ids: list[int], options: dict) -> Iterator[str]:
        """One text piece per generated token (possibly empty while a character is incomplete);
        the EOS step yields only text still held back. `speculative="off"` decodes this call plainly."""
        mode = options.pop("speculative", None)
        if mode is not None:
            check_options(mode, DRAFT_MAX)
        if mode == "off" and self.speculation is not None:
            saved, self.speculation = self.speculation, None
            try:
                yield from self._pieces(ids, options)
            finally:
                self.speculation = saved
            return
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
    speculative: str | None = None,
    draft: str | os.PathLike | None = None,
    draft_max: int = DRAFT_MAX,
    prefix_reuse: bool = True,
) -> Model:
    """Load MODEL (known name, HF folder, GGUF file, or an ONNX folder lmforge wrote) for generation.

    Args: the model; device cpu|cuda|dml; target preset used when MODEL needs converting to ONNX
    (default: cpu-int4 for the CPU, cuda-fp16 for CUDA); threads; progress bar; engine
    auto|ort|llamacpp (auto: llama.cpp for a GGUF file when llama-cpp-python is installed);
    ONNX Runtime session config entries; speculative decoding ngram|draft|off (default: draft
    with `draft`, else ngram where the engine verifies exactly (`exact_verify`: then greedy output
    never changes), else off; plain where the engine cannot verify drafts), the draft model
    (anything load takes, with MODEL's vocabulary) and the ceiling of the adaptive draft length;
    whether to keep the last call's KV cache for the next prompt's shared prefix. Returns a `Model`."""
    check_options(speculative or "ngram", draft_max)
    if speculative == "draft" and draft is None:
        raise LmforgeError("--speculative draft needs a draft model: give --draft MODEL")
    m = _load(model, device, target, threads, progress, engine, session_config)
    exact = getattr(m.engine, "exact_verify", False)
    mode = speculative or ("draft" if draft is not None else "ngram" if exact else "off")
    if mode != "off" and getattr(m.engine, "supports_verify", False):
        draft_engine = None
        if mode == "draft":
            d = _load(draft, device, target, threads, progress, "auto", session_config)
            _check_vocabulary(m, d, draft)
            draft_engine = d.engine
        m.speculation = Speculation(mode, draft_max, draft_engine)
    if not prefix_reuse:
        m.prefix = None
    return m


WIDTH_SLACK = 128  # logits widths a draft may differ by (llama.cpp's speculative allows as much)
_PAD = re.compile(r"\[PAD\d*\]|<\|?pad(_\d+)?\|?>|<unused\d+>", re.IGNORECASE)


def _real_tokens(model: Model, width: int) -> dict[int, str]:
    """id -> token of `model`'s vocabulary below `width`, without padding entries ([PAD123])."""
    vocab = model.tokenizer.hf.get_vocab(with_added_tokens=True)
    return {i: t for t, i in vocab.items() if i < width and not _PAD.fullmatch(t)}


def _check_vocabulary(target: Model, draft: Model, name) -> None:
    """A user error unless the draft model's tokens are the target's: the same real tokens over
    the ids both have, logits widths at most WIDTH_SLACK apart (padding rows: Qwen2.5-0.5B's
    151936 against 7B's 152064); drafts past the target's width are cut off when drafted."""
    wide, narrow = target.engine.vocab_size, draft.engine.vocab_size
    shared = min(wide, narrow)
    if abs(wide - narrow) > WIDTH_SLACK or _real_tokens(target, shared) != _real_tokens(draft, shared):
        raise LmforgeError(
            f"the draft model {name} has another vocabulary ({narrow} logits) than the target ({wide}); "
            "give a draft model of the same family and tokenizer"
        )


def _load(model, device, target, threads, progress, engine, session_config) -> Model:
    """`load` without speculation: the engine, tokenizer and chat template of MODEL."""
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

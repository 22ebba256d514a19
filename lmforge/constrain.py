"""Constrained decoding: a grammar (a JSON Schema, any JSON object, a regex or a Lark grammar)
compiled by llguidance into one matcher per sequence, whose token mask is applied to each row of
logits before sampling, so the text always belongs to the grammar (until max_tokens cuts it).

llguidance (the engine onnxruntime-genai, vLLM and llama.cpp use) was chosen over xgrammar and
outlines-core by measurement: see the README's "Structured output" and
`benchmarks/grammar_engines.py`.
"""

from __future__ import annotations

import weakref

import numpy as np

from lmforge.sampling import SamplingError

# Compact JSON as Python's json.dumps writes it: no run-away whitespace from a weak model.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {(vocab, eos): LLTokenizer}


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency; kept for a broken install
        raise SamplingError("grammar", "structured output needs llguidance: pip install llguidance") from None
    return llguidance


def grammar_text(param: str, source: str) -> str:
    """llguidance's grammar for a constraint option of SamplingParams: json_schema, regex or grammar (Lark)."""
    matcher = _llg().LLMatcher
    if param == "json_schema":
        return matcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
    return matcher.grammar_from_regex(source) if param == "regex" else matcher.grammar_from_lark(source)


def _ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of a lmforge Tokenizer (built once per tokenizer, vocabulary and EOS set)."""
    per = _tokenizers.setdefault(tokenizer, {})
    key = (vocab_size, eos_ids)
    if key not in per:
        try:
            per[key] = _llg().LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
        except (ValueError, RuntimeError) as e:  # a vocabulary llguidance cannot read
            raise SamplingError("grammar", f"structured output is not available for this tokenizer ({e})") from None
    return per[key]


class Constraint:
    """One sequence's grammar state: `apply` masks a row of logits to the tokens the grammar
    allows next (EOS only where the text may end), `advance` consumes the sampled token and
    computes the next mask. (In a background thread, overlapping the engine's step, it measured
    2-3% slower on 2 cores: the thread takes a core from ONNX Runtime's.)

    Raises SamplingError naming the option (`param`) when the grammar does not compile or allows
    no first token (an unsatisfiable schema)."""

    def __init__(self, param: str, source: str, tokenizer, vocab_size: int, eos_ids):
        llg = _llg()
        text = grammar_text(param, source)
        self.param = param
        self.vocab_size = vocab_size
        ll_tok = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(set(eos_ids))))
        self.matcher = llg.LLMatcher(ll_tok, text, log_level=0)  # compiles; errors are its state, not raised
        if self.matcher.is_error():
            raise SamplingError(param, f"{param} does not compile: {_first_line(self.matcher.get_error())}")
        self.bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # the next mask, 1 bit a token
        self._fill()
        if not self._allowed().any():
            raise SamplingError(param, f"{param} allows no output (is it satisfiable?)")

    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def _allowed(self) -> np.ndarray:
        """Boolean mask (vocab,) of the tokens the grammar allows next."""
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little", count=self.vocab_size).view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """One row of logits (V,) with every token the grammar forbids at -inf (in place on a copy
        the caller owns: the engine's rows are copies)."""
        logits[~self._allowed()] = -np.inf
        return logits

    def advance(self, token: int) -> None:
        """Consume the sampled token (one the mask allowed) and compute the next mask."""
        self.matcher.consume_token(token)
        if self.matcher.is_error():  # the mask allowed it, so llguidance disagrees with itself
            raise RuntimeError(f"the grammar refused token {token}: {_first_line(self.matcher.get_error())}")
        self._fill()


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"

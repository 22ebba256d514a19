"""Tokenizers from `tokenizer.json` or from GGUF metadata, as `tokenizers.Tokenizer` objects,
and a streaming detokenizer that never emits half a UTF-8 character.

GGUF vocabularies are rebuilt to tokenize exactly as llama.cpp does:
- `gpt2`: byte-level BPE; the pre-tokenizer regex comes from `tokenizer.ggml.pre` (a table).
- `llama`: SentencePiece-style BPE. llama.cpp merges the adjacent pair whose concatenation is the
  highest-scoring vocabulary entry, leftmost first, then falls back to <0xXX> byte tokens; the
  same result comes from a BPE model whose merge ranks follow the merged token's score.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import TokenizerError

# llama.cpp token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_CASED = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]%s[\p{Ll}\p{Lm}\p{Lo}\p{M}]%s(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
# tiktoken's o200k (GPT-4o, Phi-4-mini): case-aware words with their contraction as a suffix
_O200K = (
    "|".join((_CASED % ("*", "+"), _CASED % ("+", "*")))
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> regexes applied in order (llama.cpp's llama-vocab.cpp table).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for BPE vocabularies that name no known pre-tokenizer
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "gpt-4o": (_O200K,),
}
# llama.cpp's `ignore_merges`: a word that is already a token is emitted whole.
IGNORE_MERGES = {"llama-bpe", "llama3"}


def lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds its first lone UTF-16 surrogate (from JSON's "\\ud800" or an undecodable
    command-line byte), which has no UTF-8 form; None when it has none."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_unicode(text: str) -> None:
    """TokenizerError when `text` holds a lone UTF-16 surrogate: such text has no UTF-8 form to tokenize."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise TokenizerError(
            f"the text holds a lone surrogate {text[at]!r} at character {at}, which is not valid Unicode; "
            "send UTF-8 text"
        )


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control and user-defined tokens: llama.cpp splits user-defined ones out of any text and
    control ones only when special tokens are parsed; `special=True` mirrors that."""
    added = []
    for tok, typ in zip(tokens, types):
        if typ in (CONTROL, USER_DEFINED, UNKNOWN):
            added.append(AddedToken(tok, special=typ != USER_DEFINED, normalized=False))
    return added


def gpt2_from_gguf(meta: dict) -> HFTokenizer:
    """Byte-level BPE (`tokenizer.ggml.model` = gpt2) with llama.cpp's pre-tokenizer."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer.ggml.pre {pre!r}; lmforge knows: {', '.join(sorted(PRE_TOKENIZERS))}")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(_added_tokens(tokens, meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))))
    return tok


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece merge order: every split of a token into
    two vocabulary pieces, ranked by the merged token's score (highest first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for tok, score, typ in zip(tokens, scores, types):
        if typ == BYTE or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                ranked.append((-score, vocab[tok], vocab[a], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def spm_from_gguf(meta: dict) -> HFTokenizer:
    """SentencePiece-style vocabulary (`tokenizer.ggml.model` = llama) with byte fallback."""
    tokens = meta["tokenizer.ggml.tokens"]
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(
        vocab, spm_merges(tokens, scores, types), unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True
    )
    tok = HFTokenizer(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_tokens(_added_tokens(tokens, types))
    return tok


GGUF_TOKENIZERS = {"gpt2": gpt2_from_gguf, "llama": spm_from_gguf}


_ENCODE_LOCK = threading.Lock()  # encode() sets a flag on the shared tokenizer, then encodes


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs: BOS/EOS ids and whether to add BOS.

    `encode(text)` adds no special tokens and treats special-token text as plain text, like
    llama.cpp's `tokenize(add_bos=False, special=False)`; chat prompts pass `parse_special=True`.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        bos_id: int | None = None,
        eos_ids: tuple[int, ...] = (),
        add_bos: bool = False,
        pad_id: int | None = None,
    ):
        self.hf = hf
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos and bos_id is not None

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if not isinstance(kind, str) or kind not in GGUF_TOKENIZERS:
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported; lmforge reads gpt2 and llama")
        eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        try:
            hf = GGUF_TOKENIZERS[kind](meta)
        except TokenizerError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged vocabularies fail inside the tokenizers library in many ways
            raise TokenizerError(
                f"the GGUF's {kind} tokenizer is damaged ({e.__class__.__name__}: {str(e).splitlines()[0][:100]}); "
                "re-download or re-convert the file"
            ) from None
        return cls(
            hf,
            meta.get("tokenizer.ggml.bos_token_id"),
            tuple(dict.fromkeys(e for e in eos if e is not None)),
            bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            meta.get("tokenizer.ggml.padding_token_id"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{folder} has no tokenizer.json; add the model's tokenizer files to the folder")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(
                f"{path} cannot be read ({str(e).splitlines()[0][:120]}); fix or re-download it"
            ) from None
        cfg_path = Path(folder) / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise TokenizerError(f"{cfg_path} is not valid JSON; fix or re-download it") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path} is not a JSON object; fix or re-download it")

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return hf.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(cfg.get("bos_token"))
        eos = token_id(cfg.get("eos_token"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None and bos is not None:  # the post-processor decides in tokenizer.json
            add_bos = hf.encode("a", add_special_tokens=True).ids[:1] == [bos]
        return cls(hf, bos, (eos,) if eos is not None else (), bool(add_bos), token_id(cfg.get("pad_token")))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` prepends BOS when the model wants it. Raises
        TokenizerError for text that is not valid Unicode (a lone UTF-16 surrogate)."""
        check_unicode(text)
        with _ENCODE_LOCK:  # the flag is the tokenizer's, shared by the server's threads
            self.hf.encode_special_tokens = not parse_special
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def save(self, folder: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so that transformers' AutoTokenizer
        gives this tokenizer's ids with `add_special_tokens=True`: the tokenizer.json's own
        pipeline (class PreTrainedTokenizerFast; a named class such as LlamaTokenizer would make
        transformers rebuild its own pre-tokenizer) and a post-processor that prepends BOS when
        the model adds one."""
        folder = Path(folder)
        hf = HFTokenizer.from_str(self.hf.to_str())  # a copy: our own encode adds BOS itself
        if self.add_bos:
            bos = self.hf.id_to_token(self.bos_id)
            hf.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)]
            )
        else:
            hf.post_processor = None
        hf.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.bos_id is not None:
            cfg["bos_token"] = self.hf.id_to_token(self.bos_id)
        if self.eos_ids:
            cfg["eos_token"] = self.hf.id_to_token(self.eos_ids[0])
        if self.pad_id is not None:
            cfg["pad_token"] = self.hf.id_to_token(self.pad_id)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that are always whole characters.

    Decodes a short window of recent ids and emits only the part past what was already emitted,
    holding back while the window ends in an incomplete UTF-8 sequence (U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this index have been emitted

    def add(self, token_id: int) -> str:
        """Feed one id; returns the new text (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (may hold U+FFFD for a cut character)."""
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted) :]

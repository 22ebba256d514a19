"""Tokenizer metadata for GGUF files, as llama.cpp reads it.

From a GGUF source the writer copies the `tokenizer.*` keys as they are. From an HF folder:
- byte-level BPE (`tokenizer.json` with a ByteLevel step) becomes `gpt2` with its merges, and
  `tokenizer.ggml.pre` names the llama.cpp pre-tokenizer that splits text as the source does:
  each candidate of lmforge's table tokenizes a probe text and the first exact match wins
  (llama.cpp's converter does the same with a hash of the probe's tokens);
- SentencePiece (a `tokenizer.model`, or a `tokenizer.json` with byte fallback) becomes `llama`
  with one score and type per piece: read from `tokenizer.model` when present (a small protobuf
  reader, no sentencepiece needed), otherwise derived from the merge ranks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmforge.errors import TokenizerError
from lmforge.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer

log = logging.getLogger(__name__)

# Digits, spaces, newlines, tabs, contractions, scripts and emoji: the cases pre-tokenizers differ on.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (emoji) "
    "\u2705 3 33 333 3333 33333 333333 3.3 3..3 3...3 1234567890 "
    "\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e "
    "------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL  Hello World\r\n\r\nx = f(a_b, 42) + 7.5e-3;  caf\u00e9 na\u00efve"
)
# Order matters: the first candidate that reproduces the source wins. Qwen2's single digits come
# before Llama 3's groups of three: on a vocabulary without multi-digit tokens both split alike.
PRE_CANDIDATES = ("qwen2", "llama-bpe", "smollm", "gpt-2", "gpt-4o", "default")
T_STRING, T_ARRAY, T_UINT32, T_BOOL = "string", "array", "uint32", "bool"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; nested messages stay bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise TokenizerError("tokenizer.model is not a SentencePiece model (unknown protobuf wire type)")
        yield field, wire, value


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece `tokenizer.model`; its type
    numbers equal llama.cpp's token types (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte)."""
    import struct

    pieces = []
    for field, wire, value in _fields(Path(path).read_bytes()):
        if field != 1 or wire != 2:
            continue
        piece, score, kind = "", 0.0, NORMAL
        for f, w, v in _fields(value):
            if f == 1:
                piece = v.decode("utf-8")
            elif f == 2 and w == 5:
                score = struct.unpack("<f", v)[0]
            elif f == 3:
                kind = v
        pieces.append((piece, score, kind))
    if not pieces:
        raise TokenizerError(f"{path} holds no SentencePiece pieces; fix or re-download it")
    return pieces


def _steps(node) -> list[dict]:
    """A pre-tokenizer/normalizer/decoder node and its Sequence members, flattened."""
    if not isinstance(node, dict):
        return []
    members = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    return [s for m in members for s in _steps(m)] if members else [node]


def _vocab_list(tj: dict, n_vocab: int) -> tuple[list[str], dict[int, dict]]:
    """Tokens by id (padded to `n_vocab` with [PAD{i}] as llama.cpp's converter does) and the
    added tokens by id."""
    model = tj["model"]
    vocab = model["vocab"]
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id.update({i: t for t, i in vocab.items()})
    else:  # Unigram: [[piece, score], ...]
        by_id.update({i: p for i, (p, _) in enumerate(vocab)})
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:  # llama.cpp refuses a vocabulary longer than the embedding
        raise TokenizerError(
            f"the tokenizer has ids up to {max(by_id)} but the model embeds {n_vocab} tokens (vocab_size): "
            "the tokenizer does not belong to these weights; use the model's own tokenizer files"
        )
    return [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)], added


def _types(tokens: list[str], added: dict[int, dict], present: set[int], byte_tokens: bool) -> list[int]:
    types = []
    for i, tok in enumerate(tokens):
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif i not in present:
            types.append(UNUSED)
        elif byte_tokens and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def _split_regexes(tj: dict) -> tuple[str, ...]:
    """The regexes of a tokenizer.json's Split pre-tokenizer steps, in order."""
    return tuple(s["pattern"].get("Regex", "") for s in _steps(tj.get("pre_tokenizer")) if s.get("type") == "Split")


def _pick_pre(source: Tokenizer, meta: dict, regexes: tuple[str, ...] = ()) -> str:
    """The llama.cpp pre-tokenizer name under which `meta`'s vocabulary tokenizes PROBE exactly as
    the source tokenizer does; among those, one whose regexes are the source's own `regexes`
    comes first (a vocabulary can hide a split's difference on the probe)."""
    from lmforge.tokenizer import PRE_TOKENIZERS, gpt2_from_gguf

    want = source.encode(PROBE)
    own = [pre for pre, rxs in PRE_TOKENIZERS.items() if rxs == regexes and regexes]
    for pre in own + list(PRE_CANDIDATES):
        candidate = gpt2_from_gguf({**meta, "tokenizer.ggml.pre": pre})
        candidate.encode_special_tokens = True
        if candidate.encode(PROBE, add_special_tokens=False).ids == want:
            return pre
    log.warning(
        "no llama.cpp pre-tokenizer reproduces this tokenizer's splits exactly; "
        "writing 'default' (llama.cpp may tokenize some text differently)"
    )
    return "default"


def hf_vocab(folder: Path, n_vocab: int, pad_id: int | None = None) -> dict:
    """`tokenizer.*` metadata (key -> (value, type name)) for the tokenizer of an HF folder;
    the padding id is the tokenizer's pad token, else `pad_id` (config.json's), as llama.cpp's
    converter chooses."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise TokenizerError(f"{folder} has no tokenizer.json; add the model's tokenizer files to the folder")
    source = Tokenizer.from_folder(folder)  # first: a damaged tokenizer.json is its one-line error
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj["model"]
    tokens, added = _vocab_list(tj, n_vocab)
    byte_level = any(s.get("type") == "ByteLevel" for s in _steps(tj.get("pre_tokenizer")) + _steps(tj.get("decoder")))
    meta: dict = {}
    if byte_level and model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        present = set(model["vocab"].values())
        meta["tokenizer.ggml.model"] = ("gpt2", T_STRING)
        meta["tokenizer.ggml.tokens"] = (tokens, T_ARRAY)
        meta["tokenizer.ggml.token_type"] = (_types(tokens, added, present, False), T_ARRAY)
        meta["tokenizer.ggml.merges"] = (merges, T_ARRAY)
        plain = {k: v[0] for k, v in meta.items()}
        meta["tokenizer.ggml.pre"] = (_pick_pre(source, plain, _split_regexes(tj)), T_STRING)
    elif not byte_level:
        meta.update(_spm_meta(folder, tj, tokens, added))
    else:
        raise TokenizerError(
            f"{path}: a byte-level {model.get('type')} tokenizer cannot be written to GGUF; "
            "lmforge writes byte-level BPE and SentencePiece tokenizers"
        )
    if source.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = (source.bos_id, T_UINT32)
    if source.eos_ids:
        meta["tokenizer.ggml.eos_token_id"] = (source.eos_ids[0], T_UINT32)
    pad = source.pad_id if source.pad_id is not None else pad_id
    if pad is not None and 0 <= pad < n_vocab:
        meta["tokenizer.ggml.padding_token_id"] = (pad, T_UINT32)
    meta["tokenizer.ggml.add_bos_token"] = (source.add_bos, T_BOOL)
    meta["tokenizer.ggml.add_eos_token"] = (False, T_BOOL)
    return meta


def _spm_meta(folder: Path, tj: dict, tokens: list[str], added: dict[int, dict]) -> dict:
    """`llama` tokenizer metadata: pieces with scores and types."""
    model = tj["model"]
    sp_file = folder / "tokenizer.model"
    if sp_file.exists():
        pieces = sentencepiece_pieces(sp_file)
        scores = [s for _, s, _ in pieces] + [0.0] * (len(tokens) - len(pieces))
        types = [k for _, _, k in pieces] + [UNUSED] * (len(tokens) - len(pieces))
        tokens = [p for p, _, _ in pieces] + tokens[len(pieces) :]
        for i, a in added.items():  # chat tokens past the pieces (Phi-3's <|user|>, ...) too
            if i < len(types):
                types[i] = CONTROL if a.get("special") else USER_DEFINED
                if i >= len(pieces):
                    scores[i] = -1000.0
    elif model.get("type") == "Unigram":
        scores = [float(s) for _, s in model["vocab"]] + [0.0] * (len(tokens) - len(model["vocab"]))
        types = _types(tokens, added, set(range(len(model["vocab"]))), model.get("byte_fallback", False))
        if model.get("unk_id") is not None:
            types[model["unk_id"]] = UNKNOWN
    elif model.get("type") == "BPE":
        # A merged token scores by its merge's rank (earlier = higher), which reproduces the
        # merge order under llama.cpp's highest-score-first rule; other tokens rank after every merge.
        vocab = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        scores = [-float(len(merges) + i) for i in range(len(tokens))]
        for rank, m in enumerate(merges):
            merged = m.replace(" ", "", 1)
            if merged in vocab and scores[vocab[merged]] < -rank:
                scores[vocab[merged]] = -float(rank)
        types = _types(tokens, added, set(vocab.values()), bool(model.get("byte_fallback")))
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
    else:
        raise TokenizerError(
            f"tokenizer model {model.get('type')!r} cannot be written to GGUF; "
            "lmforge writes byte-level BPE and SentencePiece tokenizers"
        )
    steps = _steps(tj.get("normalizer")) + _steps(tj.get("pre_tokenizer"))
    prefix = any(s.get("type") == "Prepend" for s in steps) or any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps
    )
    meta = {
        "tokenizer.ggml.model": ("llama", T_STRING),
        "tokenizer.ggml.tokens": (tokens, T_ARRAY),
        "tokenizer.ggml.scores": (scores, T_ARRAY),
        "tokenizer.ggml.token_type": (types, T_ARRAY),
        "tokenizer.ggml.add_space_prefix": (prefix, T_BOOL),
    }
    if UNKNOWN in types:
        meta["tokenizer.ggml.unknown_token_id"] = (types.index(UNKNOWN), T_UINT32)
    return meta

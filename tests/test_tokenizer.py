"""Tokenizer parity, token for token on the whole WikiText-2 test file, against llama.cpp,
SentencePiece and transformers; streaming detokenization."""

import json
import subprocess
import sys

import pytest

from lmforge.checkpoint import open_checkpoint
from lmforge.checkpoint.gguf import read_metadata
from lmforge.tokenizer import Tokenizer
from tests import gguf_ref

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `llamacpp`) is the reference")

EDGE = "\n  Hello\r\n\n\t  world's 1234567 don'T  ÀÉ 你好  🤗🤗 <|im_start|> <s> \n\n   "


def llamacpp_vocab(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_same_tokens(ours, ref):
    i = first_difference(ours, ref)
    assert ours == ref, (
        f"{len(ours)} vs {len(ref)} tokens; first difference at {i}: {ours[i : i + 5]} vs {ref[i : i + 5]}"
    )


def test_default_model_matches_llamacpp_on_wikitext(default_model_path, wikitext):
    ours = open_checkpoint(default_model_path).tokenizer().encode(wikitext)
    ref = llamacpp_vocab(default_model_path).tokenize(wikitext.encode(), add_bos=False, special=False)
    assert len(ref) == 304830  # as measured in shared/FACTS.md
    assert_same_tokens(ours, ref)


@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "qwen2", "starcoder"])
def test_bpe_pre_tokenizers_match_llamacpp(pre, default_model_path, wikitext, tmp_path):
    """SmolLM2's vocabulary relabelled with other `tokenizer.ggml.pre` values: each regex set
    must split text exactly as llama.cpp does."""
    base = read_metadata(default_model_path)
    path = gguf_ref.write_vocab_only(tmp_path / "vocab.gguf", gguf_ref.bpe_vocab_meta(base, pre), 49152)
    ours_tok = Tokenizer.from_gguf_metadata(read_metadata(path))
    text = wikitext + EDGE
    ref = llamacpp_vocab(path).tokenize(text.encode(), add_bos=False, special=False)
    assert_same_tokens(ours_tok.encode(text), ref)


def test_spm_gguf_matches_llamacpp_and_sentencepiece(spm_model, wikitext, tmp_path):
    import sentencepiece as spm

    path = gguf_ref.write_vocab_only(tmp_path / "spm.gguf", gguf_ref.spm_vocab_meta(spm_model), 2000)
    tok = Tokenizer.from_gguf_metadata(read_metadata(path))
    text = wikitext + EDGE
    ours = tok.encode(text)
    ref = llamacpp_vocab(path).tokenize(text.encode(), add_bos=False, special=False)
    assert_same_tokens(ours, ref)
    assert_same_tokens(ours, spm.SentencePieceProcessor(model_file=str(spm_model)).encode(text))
    assert tok.add_bos and tok.encode("a", add_special=True)[0] == 1
    assert tok.decode(ours) == text  # byte fallback makes the round trip lossless


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma3"])
def test_folder_tokenizer_matches_transformers(arch, tiny_factory, wikitext):
    from transformers import AutoTokenizer

    folder = tiny_factory((arch, "float32", False, None))
    ours = Tokenizer.from_folder(folder)
    ref = AutoTokenizer.from_pretrained(folder)
    assert_same_tokens(ours.encode(wikitext), ref(wikitext, add_special_tokens=False).input_ids)
    with_bos = ref("Hello world", add_special_tokens=True).input_ids
    assert ours.encode("Hello world", add_special=True) == with_bos


def test_special_tokens_parsed_only_when_asked(default_model_path):
    tok = open_checkpoint(default_model_path).tokenizer()
    llm = llamacpp_vocab(default_model_path)
    text = "<|im_start|>user\nHi<|im_end|>"
    for special in (False, True):
        ref = llm.tokenize(text.encode(), add_bos=False, special=special)
        assert tok.encode(text, parse_special=special) == ref
    assert tok.encode(text, parse_special=True)[0] == 1


def test_special_tokens_parsed_as_asked_from_many_threads(default_model_path):
    """The server encodes chat prompts (special tokens parsed) and raw text (not) in several
    threads at once: each call gets its own mode."""
    import threading

    tok = open_checkpoint(default_model_path).tokenizer()
    chat, plain = "<|im_start|>user\nhello<|im_end|>\n" * 20, "<|im_start|> word " * 100
    want_chat, want_plain = tok.encode(chat, parse_special=True), tok.encode(plain)
    wrong = []

    def encode(text, want, special):
        for _ in range(300):
            if tok.encode(text, parse_special=special) != want:
                wrong.append(special)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=encode, args=(chat, want_chat, True)) for _ in range(2)]
        threads += [threading.Thread(target=encode, args=(plain, want_plain, False)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_streaming_detokenizer_never_splits_characters(kind, tokenizer_folders, wikitext):
    tok = Tokenizer.from_folder(tokenizer_folders[kind])
    text = wikitext[:20000] + " naïve café — 你好世界 🤗🎉 done"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    if kind == "bpe":  # byte-level BPE is lossless; transformers' SPM decoder drops a leading space
        assert tok.decode(ids) == text
    # a multi-byte character spread over several byte tokens is held back, then emitted whole
    emoji_ids = tok.encode(" 🤗")
    assert len(emoji_ids) > 1
    detok = tok.detokenizer()
    out = [detok.add(i) for i in emoji_ids]
    assert all("\ufffd" not in p for p in out) and out[-1].endswith("🤗")
    assert "".join(out) == tok.decode(emoji_ids)


def test_detokenize_matches_llamacpp(default_model_path, wikitext):
    tok = open_checkpoint(default_model_path).tokenizer()
    ids = tok.encode(wikitext[:50000])
    assert tok.decode(ids) == llamacpp_vocab(default_model_path).detokenize(ids).decode("utf-8")


def test_cli_tokenize(default_model_path, tmp_path):
    text = "The capital of France is Paris. 12345 <|im_end|>"
    ref = llamacpp_vocab(default_model_path).tokenize(text.encode(), add_bos=False, special=False)
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "tokenize", "smollm2-135m", text], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ref
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"line one\r\nline two\r\n")
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "tokenize", "smollm2-135m", "--file", str(f)], capture_output=True, text=True
    )
    assert json.loads(r.stdout) == llamacpp_vocab(default_model_path).tokenize(
        f.read_bytes(), add_bos=False, special=False
    )


def gguf_vocabularies(default_model_path, spm_model, tmp_path):
    """{name: vocab-only GGUF}: byte-level BPE and SentencePiece, each with and without BOS."""
    import gguf

    bpe = gguf_ref.bpe_vocab_meta(read_metadata(default_model_path), "smollm")
    spm = gguf_ref.spm_vocab_meta(spm_model)
    paths = {}
    for name, meta, n in (("bpe", bpe, 49152), ("spm", spm, 2000)):
        for add_bos in (False, True):
            meta = {**meta, "tokenizer.ggml.add_bos_token": (add_bos, gguf.GGUFValueType.BOOL)}
            key = f"{name}-{'bos' if add_bos else 'nobos'}"
            paths[key] = gguf_ref.write_vocab_only(tmp_path / f"{key}.gguf", meta, n)
    return paths


def test_saved_tokenizer_gives_llamacpp_ids_in_transformers(default_model_path, spm_model, wikitext, tmp_path):
    """The tokenizer files lmforge writes for a GGUF (HF and ONNX folders): transformers'
    AutoTokenizer, special tokens added as it does by default, gives llama.cpp's ids with its
    add_bos, for every vocabulary type, BOS or not."""
    from transformers import AutoTokenizer

    text = wikitext[:6000]
    for name, path in gguf_vocabularies(default_model_path, spm_model, tmp_path).items():
        folder = tmp_path / name
        folder.mkdir()
        Tokenizer.from_gguf_metadata(read_metadata(path)).save(folder)
        ref = AutoTokenizer.from_pretrained(folder)
        llm = llamacpp_vocab(path)
        for s in ("The capital of France is", text):
            theirs = llm.tokenize(s.encode(), add_bos=True, special=False)
            assert (theirs[0] == llm.token_bos()) == name.endswith("-bos"), name
            assert_same_tokens(ref(s).input_ids, theirs)
        assert Tokenizer.from_folder(folder).add_bos == name.endswith("-bos")


@pytest.mark.slow
def test_saved_tokenizer_gives_llamacpp_ids_on_all_of_wikitext(default_model_path, spm_model, wikitext, tmp_path):
    """As above on the whole WikiText-2 test file, for each vocabulary, BOS or not."""
    from transformers import AutoTokenizer

    for name, path in gguf_vocabularies(default_model_path, spm_model, tmp_path).items():
        folder = tmp_path / name
        folder.mkdir()
        Tokenizer.from_gguf_metadata(read_metadata(path)).save(folder)
        theirs = llamacpp_vocab(path).tokenize(wikitext.encode(), add_bos=True, special=False)
        assert_same_tokens(AutoTokenizer.from_pretrained(folder)(wikitext).input_ids, theirs)
        assert len(theirs) > 300_000, name

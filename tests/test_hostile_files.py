"""Damaged and hostile model files (issue 17): each ends in one line and exit code 2, before
anything is sized by an unchecked number and before llama.cpp or ONNX Runtime sees it. The
GGUF cases start from a valid file (a tiny llama that llama.cpp runs) changed in one place."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from tests import fuzzing

ABORT_PROBE = """
import sys, llama_cpp
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
params = llama_cpp.llama_context_default_params()
params.n_ctx, params.n_threads, params.n_threads_batch = 16, 1, 1
ctx = llama_cpp.llama_init_from_model(model, params)
batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 2)(1, 5), 2)
print("decode", llama_cpp.llama_decode(ctx, batch))
"""


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """(HF folder, GGUF file) of the fuzzer's tiny llama."""
    return fuzzing.build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def gguf_with(seed: Path, out: Path, change) -> Path:
    """A copy of `seed` with `change(layout)` applied."""
    lay = fuzzing.parse_gguf(seed.read_bytes())
    counts = change(lay) or {}
    out.write_bytes(fuzzing.write_gguf(lay, **counts))
    return out


def set_value(key: str, vtype: int, value):
    def change(lay):
        kv = next(k for k in lay.kvs if k.key == key)
        kv.vtype, kv.raw = vtype, fuzzing.encode(vtype, value)

    return change


def one_error_line(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    return lines[0]


def test_negative_epsilon_aborts_llamacpp_but_not_lmforge(seeds, tmp_path):
    bad = gguf_with(seeds[1], tmp_path / "eps.gguf", set_value("llama.attention.layer_norm_rms_epsilon", 6, -1e-5))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    # the reference: llama.cpp itself asserts eps >= 0 and aborts the process (SIGABRT)
    probe = subprocess.run([sys.executable, "-c", ABORT_PROBE, str(bad)], capture_output=True, text=True, env=env)
    assert probe.returncode in (-6, 134), probe.stdout
    assert "eps >= 0" in probe.stderr
    # the same probe on the seed runs: the abort is the epsilon's doing
    ok = subprocess.run([sys.executable, "-c", ABORT_PROBE, str(seeds[1])], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "decode 0" in ok.stdout
    for argv in (["run", str(bad), "--engine", "llamacpp", "-p", "hi", "--max-tokens", "2"], ["inspect", str(bad)]):
        r = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and "layer_norm_rms_epsilon" in r.stderr


def test_serve_refuses_the_file_before_it_listens(seeds, tmp_path):
    bad = gguf_with(seeds[1], tmp_path / "eps.gguf", set_value("llama.attention.layer_norm_rms_epsilon", 6, -1.0))
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "serve", str(bad), "--engine", "llamacpp", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # its status line, then one error line: the model is refused before any request reaches it
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lmforge: error: ") and "layer_norm_rms_epsilon" in r.stderr


GGUF_CASES = {
    "block_count 2**31": (set_value("llama.block_count", 4, 2**31), "block_count"),
    "context_length 2**32-1": (set_value("llama.context_length", 4, 2**32 - 1), "context_length"),
    "rope dims huge": (set_value("llama.rope.dimension_count", 4, 2**31), "rope.dimension_count"),
    "rope dims odd": (set_value("llama.rope.dimension_count", 4, 15), "odd"),
    "zero heads": (set_value("llama.attention.head_count", 4, 0), "head_count"),
    "heads not a multiple of kv heads": (set_value("llama.attention.head_count_kv", 4, 3), "multiple"),
    "zero embedding": (set_value("llama.embedding_length", 4, 0), "embedding_length"),
    "string for a number": (set_value("llama.block_count", 8, "2"), "not a whole number"),
    "NaN rope base": (set_value("llama.rope.freq_base", 6, math.nan), "freq_base"),
    "negative epsilon": (set_value("llama.attention.layer_norm_rms_epsilon", 6, -1e-5), "epsilon"),
    "deeply nested array": (
        lambda lay: setattr(lay.kvs[1], "vtype", 9) or setattr(lay.kvs[1], "raw", fuzzing.nested(100000)),
        "nested",
    ),  # fmt: skip
    "n_tensors 0": (lambda lay: setattr(lay, "tensors", []), "token_embd"),
    "n_tensors 2**40": (lambda lay: {"n_tensors": 2**40}, "cannot fit"),
    "tensor dims wrong": (lambda lay: lay.tensors[3].dims.__setitem__(0, 32), "corrupt"),
    "tensors overlap": (lambda lay: setattr(lay.tensors[2], "offset", lay.tensors[1].offset), "overlap"),
    "duplicate token": (lambda lay: _dup_token(lay), "twice"),
    "damaged merge": (lambda lay: _add_merge(lay, "nospace"), "merges"),
}


def _dup_token(lay):
    """The second token replaced by a copy of the first (llama.cpp asserts on it)."""
    kv = next(k for k in lay.kvs if k.key == "tokenizer.ggml.tokens")
    n, pos, tokens = struct.unpack_from("<Q", kv.raw, 4)[0], 12, []
    for _ in range(n):
        size = struct.unpack_from("<Q", kv.raw, pos)[0]
        tokens.append(kv.raw[pos + 8 : pos + 8 + size].decode())
        pos += 8 + size
    tokens[1] = tokens[0]
    kv.raw = fuzzing.encode(9, (8, tokens))


def _nest(kv, depth: int):
    kv.vtype, kv.raw = 9, fuzzing.nested(depth)


def _add_merge(lay, merge: str):
    lay.kvs.append(fuzzing.KV("tokenizer.ggml.merges", 9, fuzzing.encode(9, (8, ["a b", merge]))))


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_damaged_gguf_is_one_line(case, seeds, tmp_path, capsys):
    change, words = GGUF_CASES[case]
    bad = gguf_with(seeds[1], tmp_path / "bad.gguf", change)
    line = one_error_line(["inspect", str(bad)], capsys)
    assert words in line, line


def test_huge_counts_allocate_nothing(seeds, tmp_path):
    """block_count 2**31 and num_hidden_layers 10**9: refused with a small peak RSS (it was 6+ GB)."""
    gguf = gguf_with(seeds[1], tmp_path / "layers.gguf", set_value("llama.block_count", 4, 2**31 - 1))
    folder = hf_copy(seeds[0], tmp_path / "hf", config={"num_hidden_layers": 10**9})
    probe = (
        "import sys\nfrom lmforge.cli import main\nfrom tests.fuzzing import vm_hwm_kib\n"
        "codes = [main(['inspect', p]) for p in sys.argv[1:]]\nprint(codes, vm_hwm_kib() // 1024)"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", probe, str(gguf), str(folder)], capture_output=True, text=True, cwd=root)
    codes, mib = r.stdout.rsplit("]", 1)
    assert codes == "[2, 2", r.stderr
    assert 0 < int(mib) < 500, mib


def hf_copy(seed: Path, folder: Path, config: dict | None = None, raw_config: str | None = None) -> Path:
    """The seed folder with config.json changed; other files linked."""
    folder.mkdir()
    for f in seed.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    cfg = json.loads((seed / "config.json").read_text())
    cfg.update(config or {})
    (folder / "config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    return folder


CONFIG_CASES = {
    "list": ("[1, 2]", "not an object"),
    "layers 1e9": ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "odd kv heads": ({"num_key_value_heads": 3}, "multiple"),
    "string size": ({"hidden_size": "64"}, "hidden_size"),
    "NaN eps": ('{"model_type": "llama", "rms_norm_eps": NaN}', "rms_norm_eps"),
    "nested": ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "JSON"),
    "hidden not heads x head_dim": ({"hidden_size": 96}, "shape"),
    "rope scaling incomplete": ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "corrupt"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_damaged_config_is_one_line(case, seeds, tmp_path, capsys):
    change, words = CONFIG_CASES[case]
    kw = {"raw_config": change} if isinstance(change, str) else {"config": change}
    folder = hf_copy(seeds[0], tmp_path / "hf", **kw)
    line = one_error_line(["inspect", str(folder)], capsys)
    assert words in line, line


def _header_change(kind: str):
    def change(header: dict):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[names[1]], header[names[2]]
        if kind == "negative":
            a["data_offsets"] = [-4, a["data_offsets"][1]]
        elif kind == "reversed":
            a["data_offsets"] = a["data_offsets"][::-1]
        elif kind == "overlapping":
            size = b["data_offsets"][1] - b["data_offsets"][0]
            b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
        elif kind == "wrong dtype":
            a["dtype"] = "F16" if a["dtype"] == "F32" else "F32"
        elif kind == "past the end":
            b["data_offsets"] = [b["data_offsets"][0], 10**12]
        elif kind == "missing key":
            del a["shape"]
        elif kind == "list":
            return list(header.items())
        return header

    return change


@pytest.mark.parametrize(
    "kind", ["negative", "reversed", "overlapping", "wrong dtype", "past the end", "missing key", "list"]
)
def test_damaged_safetensors_header_is_one_line(kind, seeds, tmp_path, capsys):
    """Offsets that disagree with the dtype, the data section or each other (once accepted and
    run, reading header bytes as weights) are refused."""
    src = seeds[0]
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).symlink_to(f)
    raw = (src / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    body = json.dumps(_header_change(kind)(json.loads(raw[8 : 8 + n]))).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    line = one_error_line(["inspect", str(folder)], capsys)
    assert "safetensors" in line or "tensor" in line, line


def test_damaged_bpe_merge_in_tokenizer_json(seeds, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in seeds[0].iterdir():
        if f.name != "tokenizer.json":
            (folder / f.name).symlink_to(f)
    tok = json.loads((seeds[0] / "tokenizer.json").read_text())
    tok["model"]["merges"][0] = "nospace"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    line = one_error_line(["tokenize", str(folder), "hello"], capsys)
    assert "tokenizer.json" in line


def test_long_context_is_no_damage(seeds, tmp_path, capsys):
    """Llama-4-Scout's 10,485,760 positions (and 4M-context fine-tunes) load: nothing is sized by
    the context until an export tabulates rotary angles, and that refusal says 'supports', not 'corrupt'."""
    from dataclasses import replace

    from lmforge.checkpoint import open_checkpoint
    from lmforge.errors import LmforgeError
    from lmforge.spec import check_rope_tables

    scout = 10_485_760
    gguf = gguf_with(seeds[1], tmp_path / "long.gguf", set_value("llama.context_length", 4, scout))
    folder = hf_copy(seeds[0], tmp_path / "hf", config={"max_position_embeddings": scout})
    for path in (gguf, folder):
        assert main(["inspect", str(path)]) == 0, capsys.readouterr().err
        assert str(scout) in capsys.readouterr().out.replace(",", "")
    spec = replace(open_checkpoint(gguf).spec, head_dim=128, n_heads=1, n_kv_heads=1, hidden_size=128)
    assert spec.context_length == scout and spec.rotary_dim == 128  # 5 GiB of tables: a spec, not an allocation
    with pytest.raises(LmforgeError, match="more than lmforge supports") as e:
        check_rope_tables(spec, spec.context_length)
    assert "corrupt" not in str(e.value)
    check_rope_tables(spec, 4096)
    line = one_error_line(
        ["inspect", str(gguf_with(seeds[1], tmp_path / "x.gguf", GGUF_CASES["context_length 2**32-1"][0]))], capsys
    )
    assert "outside what lmforge supports" in line and "corrupt" not in line, line


def test_zero_in_any_per_layer_list():
    """llama.cpp reads 0 in a per-layer list as 'this layer has none' (Nemotron-H's feed_forward_length
    on its attention and Mamba layers); a negative or fractional entry is still damage."""
    from lmforge.checkpoint.validate import check_gguf_keys
    from lmforge.errors import CheckpointError

    meta = {"nemotron_h.feed_forward_length": [0, 21504, 0], "nemotron_h.attention.head_count_kv": [0, 8, 0]}
    check_gguf_keys(meta, "nemotron_h", "f.gguf")
    for bad in ([0, -1], [0, 2.5], [False, 8]):
        with pytest.raises(CheckpointError, match="corrupt"):
            check_gguf_keys({"nemotron_h.feed_forward_length": bad}, "nemotron_h", "f.gguf")

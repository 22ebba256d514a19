"""`lmforge bench`: every figure for lmforge and its peers, measured in one run."""

import json

import pytest

from tests.test_errors import assert_user_error, run_cli

FIGURES = (
    "prefill_mean",
    "prefill_std",
    "decode_mean",
    "decode_std",
    "ttft_ms_mean",
    "load_s",
    "peak_rss_bytes",
    "file_bytes",
    "decode_gb_s",
    "lmforge_prefill_ratio",
    "lmforge_decode_ratio",
)


def test_bench_default_model_against_both_peers(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    png = tmp_path / "bench.png"
    r = run_cli(
        "bench",
        "smollm2-135m",
        "--vs",
        "llamacpp,ortgenai",
        "--prompt-tokens",
        "64",
        "--gen-tokens",
        "8",
        "--repetitions",
        "2",
        "--json",
        "--plot",
        png,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["runner"].split()[0] for row in rows] == ["lmforge", "llama.cpp", "onnxruntime-genai"]
    for row in rows:
        assert "error" not in row, row
        assert all(row[f] >= 0 for f in FIGURES) and row["prefill_mean"] > 0 and row["decode_mean"] > 0
        assert row["peak_rss_bytes"] > row["file_bytes"] / 2
    assert rows[0]["lmforge_decode_ratio"] == 1.0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_table_formats_and_bad_peers(tiny_factory, tmp_path):
    src = tiny_factory(("llama", "float32", False, None))
    r = run_cli("bench", src, "--prompt-tokens", "16", "--gen-tokens", "4", "--repetitions", "2", "--md")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| runner | prefill tok/s") and "±" in lines[2]
    assert_user_error(run_cli("bench", src, "--vs", "ollama"), "unknown peer 'ollama'")
    assert_user_error(
        run_cli("bench", src, "--vs", "llamacpp", "--prompt-tokens", "16"), "needs the first MODEL to be a .gguf"
    )
    assert_user_error(run_cli("bench", src, "--rounds", "0"), "--rounds must be at least 1")


def test_bench_folder_runs_peers_on_its_source(tmp_path):
    """A folder lmforge wrote is benchmarked against the peers on the GGUF it came from; with
    --rounds 2 each runner runs in two processes, turn about, and its figures pool both."""
    pytest.importorskip("llama_cpp")
    from lmforge.export.convert import convert

    folder = convert("smollm2-135m", tmp_path / "int4", target="cpu-int4", progress=False)
    r = run_cli(
        "bench",
        folder,
        "--vs",
        "llamacpp",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--repetitions",
        "1",
        "--rounds",
        "2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["runner"].split()[0] for row in rows] == ["lmforge", "llama.cpp"]
    assert "error" not in rows[1] and rows[1]["file_bytes"] == 98362432  # the Q4_1 GGUF itself
    for row in rows:  # one run per process: a spread only if both processes' runs were pooled
        assert row["processes"] == 2 and row["decode_std"] > 0 and row["prefill_std"] > 0


def test_bench_failing_peer_is_a_row_and_the_others_are_measured(tiny_factory):
    """onnxruntime-genai's builder 0.18 fails on transformers 5's Gemma 3 config: its row says why,
    lmforge's row is still measured, and the exit status says a runner could not be measured."""
    pytest.importorskip("onnxruntime_genai")
    src = tiny_factory(("gemma3", "float32", False, None))
    r = run_cli(
        "bench", src, "--vs", "ortgenai", "--prompt-tokens", "16", "--gen-tokens", "4", "--repetitions", "1", "--json"
    )
    assert r.returncode == 1 and "onnxruntime-genai (its builder's int4) could not be measured" in r.stderr
    lmforge, genai = json.loads(r.stdout)
    assert "error" not in lmforge and lmforge["decode_mean"] > 0
    assert genai["runner"].startswith("onnxruntime-genai") and "builder failed" in genai["error"]


def _bench_json(*args):
    r = run_cli("bench", *args, "--threads", "2", "--repetitions", "1", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bench_speculative_ngram_on_a_grounded_prompt(default_onnx):
    """On the fp32 form (exact verify) n-gram speculation decodes plain decoding's greedy tokens,
    with drafts kept on a request whose answer quotes the prompt; the table shows its columns."""
    from lmforge.bench import table

    args = ("--speculative", "ngram", "--prompt", "grounded", "--prompt-tokens", "256", "--gen-tokens", "48")
    plain, spec = _bench_json(default_onnx, *args)
    assert plain["runner"] == "lmforge cpu-fp32" and spec["runner"] == "lmforge cpu-fp32 +ngram"
    assert "tokens_per_pass" not in plain and spec["same_tokens"] is True
    assert spec["verifies"] > 0 and spec["accepted"] > 0 and spec["tokens"] == 48  # the first comes from prefill
    assert spec["tokens_per_pass"] > 1.0 and spec["tokens_per_verify"] > 1.0 and spec["passes"] < 48
    assert spec["spec_speedup"] == round(spec["decode_mean"] / plain["decode_mean"], 2)
    header = table([plain, spec]).splitlines()[0]
    assert "tok/pass" in header and "tok/verify" in header and "same tokens" in header
    assert "tok/pass" not in table([plain]).splitlines()[0]  # no speculative row: the table as before


def test_bench_speculative_draft_model_and_bad_options(default_onnx, tiny_factory):
    """A tiny random Llama with SmolLM2's tokenizer drafts (its context is 256: a short prompt).
    Whether its drafts pay is the cost model's call from measured pass times (on a busy machine it
    may draft nothing), so only the row's wiring and the greedy tokens are checked here; the drafts
    themselves are checked in test_speculative."""
    draft = tiny_factory(("llama", "float32", False, None))
    args = ("--speculative", "draft", "--draft", draft, "--draft-max", "4", "--prompt", "grounded")
    plain, spec = _bench_json(default_onnx, *args, "--prompt-tokens", "96", "--gen-tokens", "24")
    assert spec["runner"].endswith("+draft") and spec["same_tokens"] is True and spec["tokens"] == 24
    assert 0 < spec["passes"] <= 24 and spec["drafted"] <= 4 * spec["verifies"]
    assert_user_error(run_cli("bench", default_onnx, "--speculative", "ngram", "--draft-max", "0"), "--draft-max")
    assert_user_error(run_cli("bench", default_onnx, "--speculative", "draft"), "--draft MODEL")
    other = tiny_factory(("phi3", "float32", False, None))  # a SentencePiece vocabulary
    assert_user_error(run_cli("bench", default_onnx, "--speculative", "draft", "--draft", other), "another vocabulary")
    assert_user_error(run_cli("bench", default_onnx, "--draft", draft), "--speculative draft")
    r = run_cli("bench", default_onnx, "--prompt", "wiki")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.slow
def test_bench_speculative_peers_run_their_own_lookup():
    """--vs with --speculative ngram: llama-cpp-python with LlamaPromptLookupDecoding and
    onnxruntime-genai with its n-gram strategy each get a row after their plain one, with counts."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    args = ("--vs", "llamacpp,ortgenai", "--speculative", "ngram", "--prompt", "grounded")
    rows = _bench_json("smollm2-135m", *args, "--prompt-tokens", "128", "--gen-tokens", "32")
    labels = [r["runner"] for r in rows]
    assert labels[1].endswith("+ngram") and labels[3].endswith("+lookup") and labels[5].endswith("+ngram"), labels
    for plain, spec in zip(rows[::2], rows[1::2]):
        assert "error" not in plain and "error" not in spec, (plain, spec)
        assert spec["tokens"] == 32 and 0 < spec["passes"] <= 32 and isinstance(spec["same_tokens"], bool)
        assert spec["tokens_per_pass"] >= 1.0 and spec["spec_speedup"] > 0 and "tokens_per_pass" not in plain

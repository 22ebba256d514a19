"""The CI-sized fuzzing run (issue 17): 1,000 GGUF and 800 HF-folder variants (over 500 of them
safetensors) (see
tests/fuzzing.py) through inspect, convert and both engines' first step. Every variant must end
in a one-line error or work: no traceback, no abort of llama.cpp's process, no hang over 30 s,
peak RSS under 2 GiB. `benchmarks/fuzz.py` is the long run."""

import pytest

from tests import fuzzing


@pytest.mark.slow
def test_fuzz_ci_run(tmp_path):
    tally = fuzzing.campaign(tmp_path, n_gguf=1000, n_hf=800, base=0, ort_every=40)
    print(tally.table())
    assert tally.failures() == 0, "\n".join(map(str, tally.bad[:20]))
    v = tally.variants
    assert v["gguf"] == 1000 and v["safetensors"] >= 500 and v["config"] + v["tokenizer"] + v["safetensors"] == 800
    counts = tally.counts
    # the fuzzer reaches every stage, and both outcomes happen: damage refused, harmless damage run
    for stage in ("gguf inspect", "hf inspect"):
        assert counts[(stage, "error")] > 100 and counts[(stage, "worked")] > 20, tally.table()
    for stage in ("gguf convert", "gguf llamacpp", "gguf ort", "hf convert", "hf llamacpp", "hf ort"):
        assert counts[(stage, "worked")] > 0, tally.table()
    assert tally.peak_rss_mib() < 2048

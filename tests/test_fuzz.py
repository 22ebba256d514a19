"""The CI-sized fuzzing run (issue 17): 1,000 GGUF and 800 HF-folder variants (over 500 of them
safetensors) (see
tests/fuzzing.py) through inspect, convert and both engines' first step. Every variant must end
in a one-line error or work: no traceback, no abort of llama.cpp's process, no hang over 30 s,
peak RSS under 2 GiB. `benchmarks/fuzz.py` is the long run."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

# The campaign runs in a fresh process, so that its peak memory is its own and not this test
# process's (which holds whatever earlier tests loaded).
CAMPAIGN = """
import json, sys
from pathlib import Path
from tests import fuzzing
t = fuzzing.campaign(Path(sys.argv[1]), n_gguf=1000, n_hf=800, base=0, ort_every=40)
print(json.dumps({"table": t.table(), "failures": t.failures(), "bad": t.bad[:20], "variants": t.variants,
                  "counts": [[s, o, n] for (s, o), n in t.counts.items()], "peak": t.peak_rss_mib()}))
"""


@pytest.mark.slow
def test_fuzz_ci_run(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", CAMPAIGN, str(tmp_path)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    tally = json.loads(r.stdout.strip().splitlines()[-1])
    print(tally["table"])
    assert tally["failures"] == 0, "\n".join(map(str, tally["bad"]))
    v = tally["variants"]
    assert v["gguf"] == 1000 and v["safetensors"] >= 500 and v["config"] + v["tokenizer"] + v["safetensors"] == 800
    counts = Counter({(s, o): n for s, o, n in tally["counts"]})
    # the fuzzer reaches every stage, and both outcomes happen: damage refused, harmless damage run
    for stage in ("gguf inspect", "hf inspect"):
        assert counts[(stage, "error")] > 100 and counts[(stage, "worked")] > 20, tally["table"]
    for stage in ("gguf convert", "gguf llamacpp", "gguf ort", "hf convert", "hf llamacpp", "hf ort"):
        assert counts[(stage, "worked")] > 0, tally["table"]
    assert 0 < tally["peak"] < 2048

"""The long fuzzing run (issue 17): seeded mutations of a tiny GGUF (2/3 of --n) and of an HF
folder's safetensors, config.json and tokenizer.json (1/3), each through inspect, convert to
GGUF and llama.cpp's first forward step (in a child process: an abort is counted, not fatal),
and every --ort-every-th variant that opens through an ONNX conversion and ONNX Runtime.

    nice python benchmarks/fuzz.py --n 20000

Writes benchmarks/results/fuzz.md and .json: counts by stage and outcome, the variants that
ended in a traceback, abort or hang (none expected), peak RSS and the time taken. The exit code
is 1 when any variant did.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import save  # noqa: E402
from tests.fuzzing import campaign  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="variants in all (2/3 GGUF, 1/3 HF folders)")
    p.add_argument("--base", type=int, default=10**6, help="first variant number (the CI run uses 0..)")
    p.add_argument("--ort-every", type=int, default=50, help="ONNX Runtime on every N-th variant that opens")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-fuzz-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        n_gguf = args.n * 2 // 3
        tally = campaign(root, n_gguf, args.n - n_gguf, base=args.base, ort_every=args.ort_every)
    command = f"nice python benchmarks/fuzz.py --n {args.n} --base {args.base} --ort-every {args.ort_every}"
    bad = "\n".join(f"- {stage}: {outcome} on {label}: {detail}" for stage, outcome, label, detail in tally.bad)
    text = f"# File fuzzing\n\n`{command}`\n\n```\n{tally.table()}\n```\n\n" + (bad or "No traceback, abort or hang.")
    data = {
        "command": command,
        "counts": {f"{s} {o}": n for (s, o), n in sorted(tally.counts.items())},
        "variants": dict(tally.variants),
        "failures": tally.failures(),
        "bad": tally.bad,
        "peak_rss_mib": round(tally.peak_rss_mib()),
        "seconds": round(tally.seconds),
    }
    save("fuzz", text, data)
    return 1 if tally.failures() else 0


if __name__ == "__main__":
    sys.exit(main())

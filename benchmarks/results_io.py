"""Where every benchmark leaves its figures: benchmarks/results/NAME.md (and NAME.json)."""

from __future__ import annotations

import json
from pathlib import Path

# WikiText-2 test as llama.cpp's scripts unpack it, kept beside the project on these machines
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, text: str, data=None) -> None:
    """Print the markdown `text` and write it (and `data` as JSON, when given) under results/."""
    print(text, end="" if text.endswith("\n") else "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text if text.endswith("\n") else text + "\n")
    if data is not None:
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))

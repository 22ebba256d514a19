"""The catalogue's pinned commits and the pinned WikiText-2 archive, checked against the real Hub.

These machines cannot reach the Hub, so the pins were read from public material; on a machine
with internet, `LMFORGE_NETWORK_TESTS=1 pytest -m network` checks that each commit exists (a
HEAD of its config.json, the archive's etag equal to its published sha256). Gated repos need
HF_TOKEN (with the model's terms accepted) and are skipped without it."""

from __future__ import annotations

import os

import pytest

from lmforge.registry import CATALOGUE, DEFAULT_REPO, PINNED

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.environ.get("LMFORGE_NETWORK_TESTS") != "1", reason="set LMFORGE_NETWORK_TESTS=1"),
]

PINNED_ENTRIES = [e for e in (*CATALOGUE.values(), DEFAULT_REPO) if e.revision in PINNED.values()]


@pytest.mark.parametrize("entry", PINNED_ENTRIES, ids=lambda e: f"{e.name}-{e.revision[:7]}")
def test_pinned_commit_is_on_the_hub(entry):
    import huggingface_hub as hf

    if "gated" in entry.license and not os.environ.get("HF_TOKEN"):
        pytest.skip(f"{entry.repo} is gated: set HF_TOKEN")
    meta = hf.get_hf_file_metadata(hf.hf_hub_url(entry.repo, "config.json", revision=entry.revision))
    assert meta.commit_hash == entry.revision


def test_pinned_wikitext_archive_is_on_the_hub():
    import huggingface_hub as hf

    from lmforge.evaluate import WIKITEXT2, WIKITEXT2_REVISION

    repo, name, _ = WIKITEXT2
    meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, name, repo_type="dataset", revision=WIKITEXT2_REVISION))
    assert meta.commit_hash == WIKITEXT2_REVISION
    assert (meta.etag, meta.size) == ("ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", 4721645)

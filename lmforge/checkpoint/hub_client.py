"""The calls into `huggingface_hub` (repo listing, file download, the cache's layout) and the
one-line errors its exceptions become. `hub.py` decides what to fetch; this module fetches it.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN itself:
nothing here overrides them, so a real download takes the same path as the tests' local Hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import CheckpointError, LmforgeError, ModelNotFoundError
from lmforge.progress import tqdm_class


def pull_hint(ref) -> str:
    return f"run `lmforge pull {ref}` where the Hub is reachable, then again here"


LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN (and accept the model's terms on its Hub page)"


def _hf():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # noqa: F401 - submodules read as attributes below
    except ImportError:
        raise LmforgeError("Hub ids need huggingface_hub; run: pip install huggingface-hub") from None
    if not os.environ.get("HF_HUB_VERBOSITY"):  # its retry warnings would break the one-line errors
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    return huggingface_hub


@dataclass
class Listing:
    """A repo's file names at a revision; `offline` when they come from the local cache
    (`snapshot` is then the cached folder and `why` says why the Hub was not asked)."""

    names: list[str]
    revision: str
    offline: bool = False
    snapshot: Path | None = None
    why: str = ""


def offline_mode() -> bool:
    return bool(_hf().constants.HF_HUB_OFFLINE)


def repo_cache_folder(repo: str) -> Path:
    """The Hub cache's folder of a model repo (models--ORG--NAME under HF_HUB_CACHE)."""
    hf = _hf()
    return Path(hf.constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def cached_snapshot(repo: str, revision: str) -> Path | None:
    """The cached snapshot folder of REPO at REVISION (a commit, or a branch/tag via refs/), or None."""
    folder = repo_cache_folder(repo)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _cached_listing(ref, why: str) -> Listing:
    revision = ref.revision or "main"
    snapshot = cached_snapshot(ref.repo, revision)
    if snapshot is None:
        revision, snapshot = _cached_instead_of_pin(ref, why)
    if snapshot is None:
        raise ModelNotFoundError(f"{ref} is not in the Hub cache and {why}; {pull_hint(ref)}")
    names = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return Listing(names, revision, True, snapshot, why)


def _cached_instead_of_pin(ref, why: str) -> tuple[str, Path | None]:
    """For a catalogue name whose pinned commit is not cached: the snapshot of that repo the cache
    holds (one a branch points at, `main` first, else the newest), said on stderr. Caches filled
    before the catalogue pinned its commits hold `main`; offline they still serve."""
    from lmforge.registry import pinned_entry

    entry = pinned_entry(ref.repo, ref.revision)
    folder = repo_cache_folder(ref.repo)
    if entry is None or not (folder / "snapshots").is_dir():
        return ref.revision, None
    refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file())
    for branch in sorted(refs, key=lambda r: r != "main"):
        snapshot = cached_snapshot(ref.repo, branch)
        if snapshot is not None:
            label = f"{branch} (commit {snapshot.name[:7]})"
            break
    else:
        snapshots = sorted((folder / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        if not snapshots:
            return ref.revision, None
        snapshot, label = snapshots[-1], f"commit {snapshots[-1].name[:7]}"
    print(
        f"lmforge: {entry.name}'s pinned commit {entry.revision[:7]} is not in the Hub cache and {why}; "
        f"using the cached {label} of {ref.repo}",
        file=sys.stderr,
    )
    return snapshot.name, snapshot


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport failures of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def list_files(ref) -> Listing:
    """The repo's files: from the Hub, or from the cache when offline or the Hub is unreachable."""
    hf = _hf()
    revision = ref.revision or "main"
    if offline_mode():
        return _cached_listing(ref, "HF_HUB_OFFLINE=1 is set")
    try:
        with hub_errors(ref):
            info = hf.HfApi().model_info(ref.repo, revision=revision)
    except _CannotReach as e:
        return _cached_listing(ref, f"the Hub cannot be reached ({e})")
    return Listing([s.rfilename for s in info.siblings or []], revision)


def fetch(ref, revision: str, name: str, progress: bool | None, local_only: bool = False) -> str:
    """Download (or find in the cache) one file of REF's repo; returns its local path."""
    hf = _hf()
    with hub_errors(ref, name):
        if not local_only and not isinstance(hf.try_to_load_from_cache(ref.repo, name, revision=revision), str):
            _finish_partial(ref.repo, revision, name, progress)  # only for a file the cache lacks
        return hf.hf_hub_download(
            ref.repo, name, revision=revision, tqdm_class=tqdm_class(progress), local_files_only=local_only
        )


# A partial file nobody has written to for this long belongs to no running download. The age, not
# huggingface_hub's lock, is what keeps us off a live download's file: flock "silently succeeds"
# on Lustre, GPFS and some NFS mounts (huggingface_hub's file_download.py says so), which is why
# it gives each process its own `ETAG.UUID.incomplete`.
STALE_AFTER_S = 180.0


def _stale_partials(blobs: Path, pattern: str) -> list[Path]:
    """The partial files in BLOBS matching PATTERN untouched for STALE_AFTER_S, smallest first."""
    found = []
    for p in blobs.glob(pattern):
        try:
            st = p.stat()
        except FileNotFoundError:  # finished or removed meanwhile
            continue
        if time.time() - st.st_mtime > STALE_AFTER_S:
            found.append((st.st_size, p))
    return [p for _, p in sorted(found)]


def _claim(partial: Path, etag: str) -> Path | None:
    """Rename PARTIAL to a name of our own (atomic: of two processes adopting it, one wins) and
    mark it as being written; None when another process took it first."""
    mine = partial.with_name(f"{etag}.lmforge{uuid.uuid4().hex[:8]}.incomplete")
    try:
        os.rename(partial, mine)
    except FileNotFoundError:
        return None
    os.utime(mine)
    return mine


def _finish_partial(repo: str, revision: str, name: str, progress: bool | None) -> None:
    """Resume a download that a killed process left behind. huggingface_hub 2.x writes each
    download to `blobs/ETAG.UUID.incomplete`, a name unique to the process, and deletes it on an
    error; a process killed outright leaves it there, and the next run starts from byte 0. Adopt
    the longest such file that nobody has written to for STALE_AFTER_S (younger ones may be live
    downloads of other processes: they are left alone), finish it with a Range request, check
    its sha256 against the etag and move it into place: hf_hub_download then finds the blob and
    only links it. Files the Hub serves through Xet are skipped: hf_xet (Rust) writes those files
    itself, and nothing documents that what it leaves behind is a prefix of the blob. With no
    stale partial file in the cache, no request is made here."""
    blobs = repo_cache_folder(repo) / "blobs"
    if offline_mode() or not _stale_partials(blobs, "*.incomplete"):
        return
    hf = _hf()
    from huggingface_hub.file_download import http_get

    meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, name, revision=revision))
    etag = meta.etag or ""
    # only LFS blobs are named by their sha256, and only plain HTTP downloads write a prefix
    if not re.fullmatch(r"[0-9a-f]{64}", etag) or meta.xet_file_data is not None or meta.size is None:
        return
    lock = cache_root() / ".locks" / blobs.parent.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with hf.utils.WeakFileLock(lock):
        stale = _stale_partials(blobs, f"{etag}.*.incomplete")
        if not stale or (blobs / etag).exists():
            return
        partial = _claim(stale[-1], etag)
        if partial is None:
            return
        if partial.stat().st_size > meta.size:  # not this blob's prefix
            partial.unlink()
            return
        with partial.open("ab") as f:
            if f.tell() < meta.size:
                headers = hf.utils.build_hf_headers()
                http_get(meta.location, f, resume_size=f.tell(), headers=headers, expected_size=meta.size,
                         displayed_filename=name, tqdm_class=tqdm_class(progress))  # fmt: skip
        if _sha256(partial) != etag:  # not a prefix of this blob after all: download it whole
            partial.unlink()
            return
        os.replace(partial, blobs / etag)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _DatasetRef:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"datasets/{self.repo}"


def fetch_dataset_file(
    repo: str, name: str, progress: bool | None, what: str, hint: str, revision: str | None = None
) -> str:
    """Download (or find in the Hub cache) file NAME of dataset repo REPO at REVISION (None:
    main); returns its local path.

    When it cannot be had, raises one line: WHAT, what is missing or why it cannot be fetched,
    then HINT (what the user can do instead)."""
    hf = _hf()
    err = hf.errors
    where = f"file {name} of Hub dataset {repo}" + (f" at revision {revision}" if revision else "")
    try:
        with hub_errors(_DatasetRef(repo, revision), name):
            try:
                return hf.hf_hub_download(
                    repo, name, repo_type="dataset", revision=revision, tqdm_class=tqdm_class(progress)
                )
            except (err.RepositoryNotFoundError, err.RevisionNotFoundError, err.RemoteEntryNotFoundError) as e:
                if isinstance(e, err.GatedRepoError):
                    raise
                # the Hub answered, and has no such thing: moved, renamed or removed
                raise LmforgeError(f"{what}: the Hub has no {where} (moved or removed?); {hint}") from None
    except (ModelNotFoundError, _CannotReach):
        why = "HF_HUB_OFFLINE=1 is set" if offline_mode() else "the Hub cannot be reached"
        raise LmforgeError(f"{what} ({where}) is not in the Hub cache and {why}; {hint}") from None


class _CannotReach(LmforgeError):
    """The Hub could not be reached (network down or the server failing); the cache may still serve."""


def _status(e) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


@contextmanager
def hub_errors(ref, name: str | None = None):
    """huggingface_hub's exceptions -> one-line LmforgeErrors that say what to do."""
    err = _hf().errors
    what = f"{ref.repo}/{name}" if name else str(ref)
    try:
        yield
    except err.GatedRepoError:
        raise LmforgeError(f"{ref.repo} is gated: {LOGIN_HINT}") from None
    except err.RevisionNotFoundError:
        raise ModelNotFoundError(f"{ref.repo} has no revision {ref.revision!r} on the Hub") from None
    except err.RepositoryNotFoundError as e:
        if _status(e) in (401, 403):
            raise LmforgeError(f"{ref.repo} is not on the Hub, or is private: check the name or {LOGIN_HINT}") from None
        raise ModelNotFoundError(f"no such model or path: {str(ref)!r} (the Hub has no repo {ref.repo})") from None
    except err.RemoteEntryNotFoundError:
        raise ModelNotFoundError(f"{ref.repo} has no file {name!r} at revision {ref.revision or 'main'}") from None
    except err.HfHubHTTPError as e:
        if _status(e) in (401, 403):
            raise LmforgeError(f"the Hub refused {what} ({_status(e)}): {LOGIN_HINT}") from None
        raise _CannotReach(f"the Hub answered {_status(e)} for {what}; run the command again") from None
    except (err.LocalEntryNotFoundError, err.OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE=1 is set" if offline_mode() else "the Hub cannot be reached"
        raise ModelNotFoundError(f"{what} is not in the Hub cache and {why}; {pull_hint(ref)}") from None
    except _network_errors() as e:
        endpoint = _hf().constants.ENDPOINT
        raise _CannotReach(
            f"cannot reach the Hub at {endpoint} for {what} ({e.__class__.__name__}); check the network, "
            "or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None
    except OSError as e:  # e.g. huggingface_hub's size consistency check after a broken transfer
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CheckpointError(f"downloading {what} failed ({first}); run the command again") from None


def cache_root() -> Path:
    """HF_HUB_CACHE as huggingface_hub resolved it."""
    return Path(_hf().constants.HF_HUB_CACHE)


def is_in_hub_cache(path: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(cache_root()))
    except ValueError:
        return False
    return True

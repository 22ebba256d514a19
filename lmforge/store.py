"""The model store: `lmforge models` (the catalogue, what the Hub cache holds, the forms lmforge
converted into its cache with sizes and last use) and `lmforge rm` (a form, or a download and
the forms made from it)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.export.folder import META_FILE
from lmforge.registry import CATALOGUE, DEFAULT_MODEL, DEFAULT_REPO, KNOWN_MODELS, cache_dir


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _repo_of(source: str) -> str | None:
    """ORG/NAME when SOURCE lies in a Hub cache (…/models--ORG--NAME/snapshots/…), else None."""
    for part in Path(source).parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    return None


def forms() -> list[dict]:
    """Every converted form in lmforge's cache: name, path, source, target, bytes, last use."""
    root = cache_dir() / "onnx"
    rows = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        source = meta.get("source", "")
        rows.append(
            {
                "name": folder.name,
                "path": str(folder),
                "source": source,
                "repo": _repo_of(source),
                "target": meta.get("target"),
                "bytes": _size(folder),
                "last_used": folder.stat().st_mtime,
            }
        )
    return rows


def downloads() -> list[dict]:
    """Model repos in the Hub cache: repo, bytes on disk, revisions (commits), last access."""
    from lmforge.checkpoint.hub_client import cache_root

    root = cache_root()
    rows = []
    for folder in sorted(root.glob("models--*")) if root.is_dir() else []:
        snapshots = sorted(p.name for p in (folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
        blobs = [p for p in (folder / "blobs").glob("*") if p.is_file()] if (folder / "blobs").is_dir() else []
        rows.append(
            {
                "repo": folder.name[len("models--") :].replace("--", "/"),
                "path": str(folder),
                "revisions": snapshots,
                "bytes": sum(p.stat().st_size for p in blobs),
                "last_used": max([p.stat().st_atime for p in blobs] or [folder.stat().st_mtime]),
            }
        )
    return rows


def catalogue() -> list[dict]:
    """The names users can type, and whether each is on this machine."""
    from lmforge.checkpoint.hub_client import cached_snapshot
    from lmforge.registry import known_model_path

    try:
        known_model_path(DEFAULT_MODEL)
        here = True
    except LmforgeError:
        here = False
    rows = [{**_entry(DEFAULT_REPO), "source": f"pip: {KNOWN_MODELS[DEFAULT_MODEL].dist}", "downloaded": here}]
    for e in CATALOGUE.values():
        rows.append({**_entry(e), "source": e.hub_id, "downloaded": cached_snapshot(e.repo, e.revision) is not None})
    return rows


def _entry(e) -> dict:
    return {"name": e.name, "repo": e.repo, "arch": e.arch, "params_b": e.params_b, "license": e.license}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(f"{str(x):<{w}}" for x, w in zip(r, widths)).rstrip() for r in [header, *rows])


def models_report(as_json: bool = False) -> str:
    """`lmforge models`: three tables (or one JSON object)."""
    cat, dl, fm = catalogue(), downloads(), forms()
    if as_json:
        return json.dumps({"catalogue": cat, "downloads": dl, "forms": fm})
    parts = [
        "catalogue (lmforge run NAME):",
        _table(
            ["name", "params", "arch", "license", "on disk", "source"],
            [
                [c["name"], f"{c['params_b']}B", c["arch"], c["license"], "yes" if c["downloaded"] else "", c["source"]]
                for c in cat
            ],
        ),
        "",
        "downloads (Hub cache):" if dl else "downloads (Hub cache): none",
    ]
    if dl:
        rows = [[d["repo"], _mib(d["bytes"]), str(len(d["revisions"])), _when(d["last_used"])] for d in dl]
        parts.append(_table(["repo", "size", "revisions", "last used"], rows))
    parts += ["", f"converted forms ({cache_dir() / 'onnx'}):" if fm else "converted forms: none"]
    if fm:
        rows = [[f["name"], f["target"] or "", _mib(f["bytes"]), _when(f["last_used"])] for f in fm]
        parts.append(_table(["form", "target", "size", "last used"], rows))
    return "\n".join(parts)


def remove(target: str) -> list[str]:
    """`lmforge rm`: a form by name (or path), or a catalogue name / Hub id: its download and the
    forms converted from it. Returns one line per thing removed; a user error when nothing matches."""
    from lmforge.checkpoint.hub_client import repo_cache_folder
    from lmforge.checkpoint.source import hub_ref

    all_forms = forms()
    chosen = [f for f in all_forms if target in (f["name"], f["path"])]
    ref = None if chosen else hub_ref(target)
    if ref is not None:
        chosen = [f for f in all_forms if f["repo"] == ref.repo]
    removed = []
    for f in chosen:
        shutil.rmtree(f["path"])
        Path(f["path"] + ".lock").unlink(missing_ok=True)
        removed.append(f"removed form {f['name']} ({_mib(f['bytes'])})")
    if ref is not None and repo_cache_folder(ref.repo).is_dir():
        folder = repo_cache_folder(ref.repo)
        size = _size(folder)
        shutil.rmtree(folder)
        removed.append(f"removed download {ref.repo} ({_mib(size)})")
    if not removed:
        raise LmforgeError(f"nothing named {target!r} in lmforge's cache or the Hub cache; `lmforge models` lists them")
    return removed

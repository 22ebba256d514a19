"""A local HTTP server that speaks the part of the Hugging Face Hub's protocol `huggingface_hub`
downloads through, so tests run the real client (HF_ENDPOINT pointed here) with no internet:

- `GET /api/models/ORG/NAME[/revision/REV]`: repo info (`sha`, `siblings`); `/api/datasets/...`
  likewise for dataset repos (published with `add(..., repo_type="dataset")`);
- `HEAD|GET /ORG/NAME/resolve/REV/PATH` (`/datasets/ORG/NAME/resolve/...` for a dataset): small
  files answered directly with `ETag` (git sha1),
  `X-Repo-Commit` and `Content-Length`; weights (LFS) redirected (302) to `/cdn/SHA256` under
  another host name (localhost), with `X-Linked-Etag` and `X-Linked-Size`, as the Hub does to its CDN;
- `GET /cdn/SHA256`: the blob, with byte ranges (`Range: bytes=N-` -> 206);
- `X-Xet-Hash` / `X-Xet-Refresh-Route` on the paths in `xet` (there is no Xet service here: the
  client must be told HF_HUB_DISABLE_XET=1, and then downloads over HTTP);
- errors as the Hub sends them: `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound /
  GatedRepo (401 without the repo's token).

It counts the bytes it serves per file, can cut a transfer at an offset (closing the
connection), and then fail further requests for that file, to test resuming and failing.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".onnx.data", ".data", ".bin", ".pt", ".pth", ".zip")


def is_weight(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    token: str | None = None  # gated: requests need "Authorization: Bearer TOKEN"


class FakeHub:
    """The server and what it holds. `add(repo, files)` publishes a commit; `url` is HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (path, content)
        self.served: dict[str, int] = {}  # repo path -> body bytes sent
        self.requests: list[tuple[str, str, str | None]] = []  # (method, url path, Range header)
        self.cut: dict[str, int] = {}  # path -> absolute offset at which the next transfer breaks off
        self.failing: set[str] = set()  # paths answered 503 (until cleared)
        self.fail_after_cut = False  # whether a cut path then fails (503)
        self.xet: set[str] = set()  # repo paths whose `resolve` answer names a Xet hash, as the Hub's do now
        self.rate: float | None = None  # bytes per second a blob is sent at (None: as fast as it goes)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # the same server under another host name: the client treats it as the Hub's CDN
        self.cdn_url = f"http://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(
        self,
        repo: str,
        files: dict[str, bytes | Path],
        refs=("main",),
        token: str | None = None,
        repo_type="model",
        commit: str | None = None,
    ) -> str:
        """Publish FILES (contents, or paths to read) as a new commit of REPO (named COMMIT, or a
        made-up sha1), pointed at by REFS; a dataset repo is held (and counted in `served`) as
        "datasets/ORG/NAME"."""
        repo = f"datasets/{repo}" if repo_type == "dataset" else repo
        contents = {name: v.read_bytes() if isinstance(v, Path) else v for name, v in files.items()}
        r = self.repos.setdefault(repo, Repo())
        r.token = token
        commit = commit or hashlib.sha1(repr((repo, len(r.commits), sorted(contents))).encode()).hexdigest()
        r.commits[commit] = contents
        for ref in refs:
            r.refs[ref] = commit
        for name, data in contents.items():
            if is_weight(name):
                self.blobs[hashlib.sha256(data).hexdigest()] = (f"{repo}/{name}", data)
        return commit

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight files served so far."""
        return sum(n for path, n in self.served.items() if is_weight(path))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._route(body=False)

        def do_GET(self):
            self._route(body=True)

        def _route(self, body: bool) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
            if m:
                return self._info(("datasets/" if m[1] == "datasets" else "") + m[2], m[3] or "main")
            m = re.match(r"^/((?:datasets/)?[^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                return self._resolve(m[1], m[2], m[3], body)
            m = re.match(r"^/cdn/([0-9a-f]{64})$", path)
            if m and m[1] in hub.blobs:
                return self._blob(*hub.blobs[m[1]], body)
            self._error(404, "EntryNotFound")

        def _error(self, status: int, code: str | None = None) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _commit(self, repo: str, revision: str) -> tuple[Repo | None, str | None]:
            r = hub.repos.get(repo)
            if r is None:
                self._error(401, "RepoNotFound")  # the Hub answers 401 for a repo it will not show
                return None, None
            commit = r.refs.get(revision, revision if revision in r.commits else None)
            if commit is None:
                self._error(404, "RevisionNotFound")
            return r, commit

        def _info(self, repo: str, revision: str) -> None:
            r, commit = self._commit(repo, revision)
            if commit is None:
                return
            info = {
                "id": repo.removeprefix("datasets/"),
                "sha": commit,
                "private": False,
                "gated": "auto" if r.token else False,
            }
            info["siblings"] = [{"rfilename": name} for name in sorted(r.commits[commit])]
            data = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _resolve(self, repo: str, revision: str, name: str, body: bool) -> None:
            r, commit = self._commit(repo, revision)
            if commit is None:
                return
            if r.token and self.headers.get("Authorization") != f"Bearer {r.token}":
                return self._error(401, "GatedRepo")
            data = r.commits[commit].get(name)
            if data is None:
                return self._error(404, "EntryNotFound")
            self.send_response(302 if is_weight(name) else 200)
            self.send_header("X-Repo-Commit", commit)
            if is_weight(name):  # LFS: the Hub redirects to its CDN and names the blob's sha256
                sha = hashlib.sha256(data).hexdigest()
                self.send_header("Location", f"{hub.cdn_url}/cdn/{sha}")
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{sha}"')
                if f"{repo}/{name}" in hub.xet:  # the client then downloads through hf_xet when it can
                    self.send_header("X-Xet-Hash", hashlib.sha256(b"xet" + data).hexdigest())
                    self.send_header("X-Xet-Refresh-Route", f"/api/{repo}/xet-read-token/{commit}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self.send_header("ETag", f'"{git_sha}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self._send(f"{repo}/{name}", data)

        def _blob(self, path: str, data: bytes, body: bool) -> None:
            if path in hub.failing:
                return self._error(503)
            start = 0
            m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if m:
                start = int(m[1])
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            cut = hub.cut.pop(path, None)
            if cut is not None and cut > start:
                self._send(path, data[start:cut])
                if hub.fail_after_cut:
                    hub.failing.add(path)
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)  # the transfer breaks off mid-body
                return
            self._send(path, data[start:])

        def _send(self, path: str, data: bytes) -> None:
            step = 1 << 16 if hub.rate else max(len(data), 1)
            for i in range(0, len(data), step):
                piece = data[i : i + step]
                try:
                    self.wfile.write(piece)
                except OSError:  # the client went away: what it did not take was not served
                    return
                with hub.lock:
                    hub.served[path] = hub.served.get(path, 0) + len(piece)
                if hub.rate:
                    time.sleep(len(piece) / hub.rate)

    return Handler

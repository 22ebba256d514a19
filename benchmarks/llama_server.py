"""llama.cpp's own `llama-server`, built on demand from the llama.cpp sources that the installed
llama-cpp-python's sdist vendors (the same llama.cpp the other peers run), cached outside the
repository in ~/.cache/lmforge-bench/llama-server/<version>/ (about 6 minutes on 2 cores, once).

    python benchmarks/llama_server.py          # build (or find) it; print its path

`find_or_build()` returns the binary's path, or None with the reason printed: no llama-cpp-python,
no cmake or C++ compiler, no network for the sdist and none cached, or a failed build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

CACHE = Path(os.environ.get("LMFORGE_BENCH_CACHE", Path.home() / ".cache" / "lmforge-bench"))
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]


def _skip(reason: str) -> None:
    print(f"llama-server: skipped ({reason})", file=sys.stderr, flush=True)


def _sources(version: str) -> Path | None:
    """The vendored llama.cpp of llama-cpp-python==version, downloaded and unpacked once."""
    src = CACHE / "src"
    tree = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    src.mkdir(parents=True, exist_ok=True)
    archive = src / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(src)]
        r = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        if r.returncode != 0 or not archive.exists():
            _skip(f"cannot download the llama-cpp-python {version} sdist: {(r.stderr or r.stdout).strip()[-200:]}")
            return None
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return tree if (tree / "CMakeLists.txt").exists() else None


def find_or_build(verbose: bool = True) -> Path | None:
    """The llama-server binary for the installed llama-cpp-python, built if not cached; None
    (with the reason on stderr) where it cannot be built."""
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        _skip("llama-cpp-python is not installed, so there is no llama.cpp version to match")
        return None
    out = CACHE / "llama-server" / version
    binary = out / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        _skip(f"{' and '.join(missing)} not found; install them to build it")
        return None
    tree = _sources(version)
    if tree is None:
        return None
    if verbose:
        print(f"llama-server: building llama.cpp of llama-cpp-python {version} (minutes, once) ...", file=sys.stderr)
    log = out / "build.log"
    out.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(os.cpu_count() or 2)
    with open(log, "w") as f:
        steps = (
            ["cmake", "-S", str(tree), "-B", str(out / "build"), *generator, *CMAKE_FLAGS],
            ["cmake", "--build", str(out / "build"), "--target", "llama-server", "-j", jobs],
        )
        for cmd in steps:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                _skip(f"the build failed; see {log}")
                return None
    return binary if binary.exists() else None


if __name__ == "__main__":
    path = find_or_build()
    print(path or "")
    sys.exit(0 if path else 1)

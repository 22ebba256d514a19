"""Layers import downward only (DESIGN.md): an AST scan of every import statement in lmforge,
including imports inside functions, against the layer table below."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lmforge"  # scanned as text: nothing is imported

# Low to high. A package entry covers its submodules; same-layer imports are allowed. A module
# that matches no entry fails the test, so a new top-level module has to be placed here.
LAYERS = {
    "lmforge.spec": 0,
    "lmforge.errors": 0,
    "lmforge.registry": 0,
    "lmforge.progress": 0,
    "lmforge.arch": 1,
    "lmforge.checkpoint": 2,
    "lmforge.tokenizer": 2,
    "lmforge.chat": 2,
    "lmforge.quant": 3,
    "lmforge.export": 4,
    "lmforge.runtime": 5,
    "lmforge.generate": 6,
    "lmforge.sampling": 6,
    "lmforge.speculative": 6,
    "lmforge.constrain": 6,
    "lmforge.tools": 6,
    "lmforge.model": 7,
    "lmforge.prompt_cache": 7,
    "lmforge.server": 8,
    "lmforge.bench": 8,
    "lmforge.bench_speculative": 8,
    "lmforge.evaluate": 8,
    "lmforge.batch": 8,
    "lmforge.batch_ray": 8,
    "lmforge.recommend": 8,
    "lmforge.store": 8,
    "lmforge.devices": 8,
    "lmforge.cli": 8,
    "lmforge.__main__": 8,
    "lmforge.__init__": 8,
}


def module_name(path: Path) -> str:
    """Dotted module name of a file under lmforge/ (a package is named by its __init__ for the root)."""
    parts = ("lmforge", *path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int | None:
    """The layer of a dotted module name: its longest entry in LAYERS, or None."""
    if module == "lmforge":
        module = "lmforge.__init__"
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def package_of(path: Path) -> str:
    """The package that relative imports in `path` are resolved against."""
    me = module_name(path)
    return "lmforge" if me == "lmforge.__init__" else me if path.name == "__init__.py" else me.rpartition(".")[0]


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, dotted lmforge module) for every import statement anywhere in `source`, functions
    and methods included; relative imports are resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lmforge"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "lmforge":
                continue
            for a in node.names:  # `from lmforge.x import y` imports module lmforge.x.y when y is one
                target = f"{base}.{a.name}"
                found.append((node.lineno, target if _is_module(target) else base))
    return sorted(set(found))


def test_every_module_has_a_layer():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 20
    missing = [module_name(f) for f in files if layer(module_name(f)) is None]
    assert not missing, f"modules missing from the layer table in tests/test_layers.py: {missing}"


def test_layers_import_downward_only():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        for line, target in imported_modules(path.read_text(encoding="utf-8"), package_of(path)):
            theirs = layer(target)
            if theirs is None:
                violations.append(f"{path.relative_to(ROOT.parent)}:{line}: {target} has no layer")
            elif theirs > layer(me):
                violations.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {me} (layer {layer(me)}) "
                    f"imports {target} (layer {theirs})"
                )
    assert not violations, "\n".join(violations)


def test_the_scan_sees_lazy_and_relative_imports():
    """The scanner itself: imports inside functions and relative imports both count."""
    source = (
        "import numpy\n"
        "from lmforge.errors import LmforgeError\n"
        "def f():\n"
        "    from lmforge.model import load\n"
        "class C:\n"
        "    def m(self):\n"
        "        import lmforge.runtime.ort\n"
        "        from . import kquants\n"
        "        from ..export import onnx\n"
    )
    found = imported_modules(source, "lmforge.quant")
    assert found == [
        (2, "lmforge.errors"),
        (4, "lmforge.model"),
        (7, "lmforge.runtime.ort"),
        (8, "lmforge.quant.kquants"),
        (9, "lmforge.export.onnx"),
    ]
    assert [layer(m) for _, m in found] == [0, 7, 5, 3, 4]
    assert layer("lmforge.somewhere_new") is None and layer("lmforge") == 8

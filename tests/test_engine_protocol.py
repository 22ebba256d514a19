"""Every engine and every cache it hands out has what `lmforge.runtime.engine` promises, with the
protocol's method signatures: the server's schedulers and `generate` rely on nothing else."""

import inspect

import pytest

from lmforge.runtime.engine import ENGINES, Cache, Engine


def members(proto) -> tuple[set[str], set[str]]:
    """(attribute names, method names) a protocol declares."""
    methods = {n for n, v in vars(proto).items() if inspect.isfunction(v) and not n.startswith("_")}
    return set(proto.__annotations__), methods


def assert_follows(obj, proto):
    attributes, methods = members(proto)
    assert attributes and all(hasattr(obj, a) for a in attributes), (type(obj), attributes)
    for name in methods:
        want = list(inspect.signature(getattr(proto, name)).parameters)[1:]
        assert list(inspect.signature(getattr(obj, name)).parameters) == want, (type(obj), name)
    assert proto in type(obj).__mro__  # declared, so a type checker holds it to the protocol too


def test_ort_engine_and_caches(default_onnx):
    from lmforge.runtime.ort import OrtEngine

    engine = OrtEngine(default_onnx)
    assert_follows(engine, Engine)
    cache = engine.new_cache(2, 16)
    assert_follows(cache, Cache)
    assert_follows(engine.new_pool(4, 16).rows(1, 3), Cache)
    logits = engine.prefill(cache, [[1, 2], [3]])
    assert logits.shape == (2, engine.vocab_size) and list(cache.lengths) == [2, 1]


def test_llamacpp_engine_and_cache(default_model_path):
    pytest.importorskip("llama_cpp")
    from lmforge.runtime.llamacpp import LlamaCppEngine, supports_gpu_offload

    engine = LlamaCppEngine(default_model_path)
    assert_follows(engine, Engine)
    assert_follows(engine.new_cache(1, 16), Cache)
    assert isinstance(supports_gpu_offload(), bool)


def test_engine_names():
    from lmforge.model import ENGINES as LOAD_ENGINES

    assert ENGINES == ("ort", "llamacpp") and LOAD_ENGINES == ("auto", *ENGINES)

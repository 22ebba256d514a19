"""lmforge: take a small language model checkpoint to every deployment form."""

from lmforge.checkpoint import open_checkpoint
from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams
from lmforge.spec import ModelSpec
from lmforge.tokenizer import Tokenizer


def load(
    model,
    device: str = "cpu",
    target: str | None = None,
    threads: int | None = None,
    progress=None,
    engine: str = "auto",
):
    """Load MODEL for generation; see `lmforge.model.load`."""
    from lmforge.model import load as _load

    return _load(model, device=device, target=target, threads=threads, progress=progress, engine=engine)


def convert(source, out, target: str = "cpu-fp32", **options):
    """Convert SOURCE to an ONNX folder; see `lmforge.export.convert.convert`."""
    from lmforge.export.convert import convert as _convert

    return _convert(source, out, target=target, **options)


__version__ = "0.1.0"
__all__ = [
    "ModelSpec",
    "LmforgeError",
    "SamplingParams",
    "Tokenizer",
    "convert",
    "load",
    "open_checkpoint",
    "__version__",
]

"""lmforge: take a small language model checkpoint to every deployment form."""
from lmforge.checkpoint import ModelSpec, open_checkpoint
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["ModelSpec", "LmforgeError", "Tokenizer", "open_checkpoint", "__version__"]

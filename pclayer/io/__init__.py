"""Reading and writing circuits.

* :func:`save` / :func:`load` — pclayer's safe format (safetensors + JSON structure).
* :func:`load_pyjuice` — import PyJuice ``.jpc`` files through a restricted unpickler.
"""

from pclayer.io.errors import CircuitFileError, UnsafePickleError
from pclayer.io.native import FORMAT_VERSION, load, save
from pclayer.io.pyjuice import load_pyjuice

__all__ = ["FORMAT_VERSION", "CircuitFileError", "UnsafePickleError", "load", "load_pyjuice", "save"]

"""Save and load a CoDD layer as a local directory: a circuit file plus a small JSON config.

Layout::

    <directory>/codd_config.json   {"mask_id", "vocab_size", "window", "temperature", "gate",
                                    "mode", "top_k", "normalize",
                                    "circuit_file"}
    <directory>/circuit.safetensors  the circuit, written by ``pclayer.save``

Works offline: only local paths are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pclayer
from diffusion.layer import CoDDLayer

CONFIG_NAME = "codd_config.json"
CIRCUIT_NAME = "circuit.safetensors"
_REQUIRED = ("mask_id", "vocab_size", "window", "temperature", "gate")


def _circuit_io():
    """``(save, load)``: ``pclayer.save`` / ``pclayer.load`` (from ``pclayer.io.native``
    until the package exports them)."""
    if hasattr(pclayer, "save") and hasattr(pclayer, "load"):
        return pclayer.save, pclayer.load
    from pclayer.io import native

    return native.save, native.load


def save_pretrained(layer: CoDDLayer, directory: str | os.PathLike) -> Path:
    """Write ``layer``'s circuit and config into ``directory`` (created if needed); returns it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save, _ = _circuit_io()
    save(path / CIRCUIT_NAME, layer.circuit)
    config = {"mask_id": layer.mask_id, "vocab_size": layer.vocab_size, "window": layer.window,
              "temperature": layer.temperature, "gate": layer.gate, "mode": layer.mode, "top_k": layer.top_k,
              "normalize": layer.normalize, "circuit_file": CIRCUIT_NAME}
    temporary = path / (CONFIG_NAME + ".tmp")
    temporary.write_text(json.dumps(config, indent=2))
    os.replace(temporary, path / CONFIG_NAME)
    return path


def from_pretrained(directory: str | os.PathLike, *, device: str | None = None, **overrides) -> CoDDLayer:
    """Load a :class:`CoDDLayer` from a local directory written by :func:`save_pretrained`
    (or by hand: a circuit file and ``codd_config.json``).

    Args:
        directory: local directory (no network access).
        device: optional device for the circuit.
        overrides: keyword arguments of :class:`CoDDLayer` replacing the config's values
            (``temperature``, ``gate``, ``mode``, ``top_k``, ``normalize``, ``mask_id``).

    Raises:
        FileNotFoundError: missing directory, config or circuit file.
        ValueError: a malformed config, or a circuit that disagrees with it (vocabulary,
            window).
    """
    path = Path(directory)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"directory: expected {config_path} (a CoDD config) to exist")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}; expected {list(_REQUIRED)}")
    circuit_path = path / config.get("circuit_file", CIRCUIT_NAME)
    if not circuit_path.is_file():
        raise FileNotFoundError(f"{config_path}: circuit file {circuit_path} does not exist")
    _, load = _circuit_io()
    circuit = load(circuit_path, device=device)
    if int(circuit.var_cats.max()) != config["vocab_size"] or circuit.num_vars != config["window"]:
        raise ValueError(
            f"{config_path}: config says vocab_size {config['vocab_size']}, window {config['window']}; the circuit has "
            f"{int(circuit.var_cats.max())} categories over {circuit.num_vars} positions"
        )
    arguments = {"mask_id": config["mask_id"], "temperature": config["temperature"], "gate": config["gate"],
                 "mode": config.get("mode", "latent"), "top_k": config.get("top_k"),
                 "normalize": config.get("normalize", False)}
    unknown = set(overrides) - set(arguments)
    if unknown:
        raise ValueError(f"overrides: unknown {sorted(unknown)}; expected some of {sorted(arguments)}")
    arguments.update(overrides)
    return CoDDLayer(circuit, **arguments)

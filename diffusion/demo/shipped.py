"""Backbone weights as a safetensors file plus a JSON record, and the strong backbone shipped with the package.

A saved backbone is two files side by side: ``NAME.safetensors`` (the state dict, float32) and ``NAME.json``
(the record). The record holds the :class:`~diffusion.demo.backbone.BackboneConfig`, the hash of the training
corpus, the tokenizer's characters, the clean prefix length, the seed, the training budget and steps, the
validation loss measured right after training with :data:`VALIDATION_PROTOCOL`, and the SHA-256 of the
safetensors file. :func:`load_weights` refuses a file whose hash does not match its record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion.demo.backbone import BackboneConfig, MaskedDiffusionTransformer, masked_nll

SHIPPED = Path(__file__).parent / "weights" / "backbone"
"""Stem of the shipped strong backbone (``backbone.safetensors`` and ``backbone.json`` in the package)."""

VALIDATION_PROTOCOL = {"batch_size": 64, "batches": 16, "seed": 0}
"""Arguments of :func:`~diffusion.demo.backbone.masked_nll` behind every recorded validation loss."""


class WeightsError(ValueError):
    """A saved backbone whose files are missing, unreadable or do not match their record."""


def corpus_hash(text: str) -> str:
    """16 hex digits of the SHA-256 of a corpus split (the training text a backbone was fitted to)."""
    return hashlib.sha256(text.encode("utf-8") + b"\x00").hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recorded_validation_nll(model: MaskedDiffusionTransformer, validation_tokens: torch.Tensor) -> float:
    """Validation loss (nats per masked token) under :data:`VALIDATION_PROTOCOL`, the number every record keeps."""
    return masked_nll(model, validation_tokens, **VALIDATION_PROTOCOL)


def save_weights(model: MaskedDiffusionTransformer, stem: Path, record: dict) -> dict:
    """Write ``stem.safetensors`` and ``stem.json``; the JSON is ``record`` plus ``config`` and ``sha256``.

    Both files are written to temporary names first and renamed, so an interrupted save never leaves a record
    describing other weights. Returns the full record.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    temporary = stem.with_suffix(".safetensors.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(temporary))
    full = {**record, "config": asdict(model.config), "sha256": file_sha256(temporary)}
    meta_temporary = stem.with_suffix(".json.tmp")
    meta_temporary.write_text(json.dumps(full, indent=2) + "\n")
    temporary.replace(weights)
    meta_temporary.replace(meta)
    return full


def read_record(stem: Path) -> dict:
    """The JSON record of the backbone saved at ``stem``; :class:`WeightsError` when missing or unreadable."""
    meta = Path(stem).with_suffix(".json")
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsError(f"weights: cannot read the record {meta}: {error}") from error


def load_weights(stem: Path) -> tuple[MaskedDiffusionTransformer, dict]:
    """The backbone saved at ``stem`` (in eval mode) and its record.

    Raises:
        WeightsError: a file is missing, the safetensors hash differs from the record, or the tensors do not
            fit the recorded config.
    """
    stem = Path(stem)
    record = read_record(stem)
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise WeightsError(f"weights: {weights} is missing")
    digest = file_sha256(weights)
    if digest != record.get("sha256"):
        raise WeightsError(f"weights: {weights} has SHA-256 {digest}, its record says {record.get('sha256')}")
    try:
        config = BackboneConfig(**record["config"])
        model = MaskedDiffusionTransformer(config)
        model.load_state_dict(load_file(str(weights)))
    except (KeyError, TypeError, RuntimeError) as error:
        raise WeightsError(f"weights: {weights} does not match its recorded config: {error}") from error
    model.eval()
    return model, record

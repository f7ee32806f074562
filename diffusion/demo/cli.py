"""Command line of the demo (``python -m diffusion.demo`` and the ``codd-demo`` console script)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion.demo.corpus import CorpusError
from diffusion.demo.pipeline import DemoSettings, SettingsError, run_demo
from diffusion.demo.report import MissingPlotting
from diffusion.demo.shipped import WeightsError


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``codd-demo``."""
    defaults = DemoSettings()
    p = argparse.ArgumentParser(
        prog="codd-demo",
        description="Reproduce the factorization barrier of masked diffusion LMs and CoDD's fix on a CPU: uses the "
                    "shipped masked-diffusion transformer (or trains one), trains an HMM CoDD layer on Shakespeare, "
                    "then prints the gap table and few-step generation quality, and writes results.json and PNG "
                    "plots.")
    p.add_argument("--corpus", default=None, help="a .txt file or a folder of .txt files replacing the default "
                   "Shakespeare corpus (split by file, or by lines for a single file)")
    p.add_argument("--out", default=str(defaults.out), help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=defaults.minutes,
                   help="total time budget in minutes, split between phases (default: %(default)s)")
    p.add_argument("--window", type=int, default=defaults.window,
                   help="positions W covered by the CoDD layer (default: %(default)s)")
    p.add_argument("--states", type=int, default=defaults.states,
                   help="hidden states of the HMM circuit (default: %(default)s)")
    p.add_argument("--device", default=defaults.device, help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="torch CPU threads (default: %(default)s, fastest on a shared machine)")
    p.add_argument("--train-backbone", action="store_true",
                   help="train the backbone from scratch within the budget instead of using the shipped one")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code (2 for bad arguments, corpus, weights or missing matplotlib)."""
    args = parser().parse_args(argv)
    settings = DemoSettings(out=Path(args.out), corpus=args.corpus, seed=args.seed, minutes=args.minutes,
                            window=args.window, states=args.states, device=args.device,
                            threads=args.threads, train_backbone=args.train_backbone)
    try:
        run_demo(settings)
    except (CorpusError, SettingsError, MissingPlotting, WeightsError) as error:
        print(f"codd-demo: error: {error}", file=sys.stderr)
        return 2
    return 0

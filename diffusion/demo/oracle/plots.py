"""Printed tables and PNG plots of the oracle experiment."""

from __future__ import annotations

from pathlib import Path


def _ci(entry: dict, digits: int = 2) -> str:
    value, (low, high) = entry["value"], entry["ci"]
    if value != value:
        return "n/a"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def oracle_gap_table(rows: list[dict]) -> str:
    """One line per (mask ratio, student states): perplexities (a), (b), (c) and the gap closed, with intervals."""
    header = (f"{'mask':>5} {'k/W':>4} {'states':>6} {'windows':>7}  {'(a) one-step':>20}  {'(b) sequential':>20}  "
              f"{'(c) CoDD':>20}  {'gap closed':>20}")
    lines = [header, "-" * len(header)]
    for row in sorted(rows, key=lambda r: (r["mask_ratio"], r["student_states"])):
        lines.append(f"{row['mask_ratio']:>5.1f} {row['masked_per_window']:>4d} {row['student_states']:>6d} "
                     f"{row['windows']:>7d}  {_ci(row['one_step']):>20}  {_ci(row['sequential']):>20}  "
                     f"{_ci(row['codd']):>20}  {_ci(row['gap_closed']):>20}")
    return "\n".join(lines)


def generation_table(generation: dict) -> str:
    """Teacher perplexity of samples per number of steps, plain and with CoDD, and the teacher's own."""
    header = f"{'steps':>5}  {'plain':>20}  {'CoDD':>20}"
    lines = [header, "-" * len(header)]
    for row in generation["rows"]:
        lines.append(f"{row['steps']:>5d}  {_ci(row['plain']['perplexity']):>20}  {_ci(row['codd']['perplexity']):>20}")
    lines.append(f"teacher samples (exact): perplexity {_ci(generation['reference']['perplexity'])}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _with_intervals(ax, xs: list, entries: list[dict], **style) -> None:
    """Points ``entry["value"]`` joined by a line, each with its interval ``entry["ci"]`` as a vertical bar (a
    percentile interval of a ratio need not contain its point estimate, so no symmetric error bars)."""
    line, = ax.plot(xs, [e["value"] for e in entries], marker="o", **style)
    ax.vlines(xs, [e["ci"][0] for e in entries], [e["ci"][1] for e in entries], color=line.get_color(), alpha=0.7)


def plot_gap_closed(rows: list[dict], path: Path) -> None:
    """Fraction of the gap closed against student states (log axis), one line per mask ratio, 95 % intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for ratio in sorted({r["mask_ratio"] for r in rows}):
        part = sorted((r for r in rows if r["mask_ratio"] == ratio), key=lambda r: r["student_states"])
        _with_intervals(ax, [r["student_states"] for r in part], [r["gap_closed"] for r in part],
                        label=f"{100 * ratio:.0f} % masked")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("student circuit: HMM hidden states")
    ax.set_ylabel("gap closed (a - c) / (a - b)")
    ax.set_title("CoDD with a perfect denoiser (exact oracle)")
    _save(plt, fig, ax, path)


def plot_generation(generation: dict, path: Path) -> None:
    """Teacher perplexity of samples against denoising steps, plain and with CoDD, and the teacher's own."""
    plt = _pyplot()
    rows = generation["rows"]
    steps = [r["steps"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, label, color in (("plain", "factorized (exact marginals)", "tab:red"),
                              ("codd", f"CoDD ({generation['student_states']}-state student)", "tab:blue")):
        _with_intervals(ax, steps, [r[key]["perplexity"] for r in rows], label=label, color=color)
    ax.axhline(generation["reference"]["perplexity"]["value"], color="gray", linestyle="--",
               label="teacher samples")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("denoising steps per block")
    ax.set_ylabel("teacher perplexity of the samples")
    ax.set_title("Few-step generation, scored exactly by the teacher")
    _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: Path) -> None:
    """Grid, legend and layout of one figure, written to ``path`` (PNG) and closed."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

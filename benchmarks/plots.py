"""The gain-vs-forgetting plots the benchmark reports share: runs' task gain (x) against their forgetting (y)."""

from __future__ import annotations

import statistics

from benchmarks.verdicts import gain_and_forgetting

GSM8K_AXES = ("task gain: GSM8K test answer NLL decrease →", "forgetting: NQ-open gold NLL increase ↓")


def rate_curves(complete: dict) -> dict[str, dict[float, list]]:
    """{arm: {lr: runs}} for every arm of `complete_runs` (an arm at one rate is a point beside the others' curves);
    empty unless some arm ran more than one rate, so that the plot along the rates has a curve to show."""
    curves: dict = {}
    for (m, lr), runs in complete.items():
        curves.setdefault(m, {})[lr] = runs
    return curves if any(len(c) > 1 for c in curves.values()) else {}


def tradeoff_plot(plt, curves: dict, base: dict, path: str, axes=GSM8K_AXES) -> None:
    """Each arm ({arm: {lr: runs}}) as a curve through its (task gain, forgetting) means, by rate (a point where it
    ran one rate), each point labelled with its rate."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, by_lr in curves.items():
        points = sorted(by_lr.items())
        d = [gain_and_forgetting(runs, base) for _, runs in points]
        xs, ys = [statistics.mean(g["gain"]) for g in d], [statistics.mean(g["forget"]) for g in d]
        ax.plot(xs, ys, "o-", label=method)
        for (lr, _), x, y in zip(points, xs, ys):
            ax.annotate(f"{lr:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    save_gain_forget(plt, fig, ax, "each arm along its learning rates (mean over seeds)", path, axes)


def save_gain_forget(plt, fig, ax, title: str, path: str, axes=GSM8K_AXES) -> None:
    """The task-gain (x) vs forgetting (y) axes, labelled (`axes`: the x and y labels), written to `path`."""
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel=axes[0], ylabel=axes[1], title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

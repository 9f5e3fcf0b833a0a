"""The search report: the step history as JSON plus the plots a person checks before trusting a search.

A search runs for hours and its plans feed the compressor, so its outcome is summarised in files that survive it:
``history.json`` (every step, and a per-episode summary) and three PNGs that show whether the reward improved,
whether sizes settled, and how the chosen sizes relate to row popularity at each budget. Each file is written to a
temp name and renamed, so a crash never leaves a half-written report file behind.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: searches run on servers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ciess_prod.io import write_json_atomic  # noqa: E402
from ciess_prod.search.plan import DimensionPlan  # noqa: E402

MAX_SCATTER_POINTS = 20_000  # per table and panel: enough to see the trend, quick to draw
SIZE_PREFIX = "mean_size_"
_NOT_SUMMARISED = {"episode", "step"}


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _column(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """One history key as float64; entries lacking it read as NaN."""
    return np.array([float(h[key]) if _numeric(h.get(key)) else math.nan for h in history], dtype=np.float64)


def _group_mean(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the finite values per group (NaN where a group has none), e.g. mean_q before the critic exists."""
    finite = np.isfinite(values)
    sums = np.bincount(groups[finite], weights=values[finite], minlength=n_groups)
    counts = np.bincount(groups[finite], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def episode_summary(history: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per episode: number of steps, the mean of every numeric key, and the sparsity after its last step."""
    episode = _column(history, "episode")
    if not np.isfinite(episode).all():
        raise ValueError("history: every entry needs a finite numeric 'episode'")
    step = _column(history, "step")
    episodes, groups = np.unique(episode, return_inverse=True)
    groups = groups.reshape(-1)
    order = np.lexsort((np.nan_to_num(step, nan=-np.inf), episode))  # by episode, chronological within it
    in_order = groups[order]
    last = order[np.append(in_order[1:] != in_order[:-1], True)]  # final step of each episode, by episode
    keys = sorted({k for h in history for k, v in h.items() if _numeric(v)} - _NOT_SUMMARISED)
    means = {k: _group_mean(_column(history, k), groups, len(episodes)) for k in keys}
    steps = np.bincount(groups, minlength=len(episodes))
    final = _column(history, "sparsity")[last]
    return [
        {
            "episode": int(e) if float(e).is_integer() else float(e),
            "steps": int(steps[i]),
            **{k: float(means[k][i]) for k in keys},
            "final_sparsity": float(final[i]),
        }
        for i, e in enumerate(episodes)
    ]


def _colours(tables: Sequence[str]) -> dict[str, str]:
    """One colour per table for every plot, so "user" looks the same in all three files."""
    return {t: f"C{i % 10}" for i, t in enumerate(dict.fromkeys(tables))}


def _save_figure(fig: Figure, path: Path) -> Path:
    """Renders to a temp file beside ``path`` and renames it into place; always closes the figure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _panels(n: int, title: str) -> tuple[Figure, list[Any]]:
    """A grid of at most three panels per row, one per budget; unused cells hidden."""
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.0 * nrows), squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, flat[:n]


def _budget_title(c: float, plan: DimensionPlan) -> str:
    repaired = ", repaired" if plan.repaired else ""
    return f"c = {c:.2f}, achieved {plan.achieved_sparsity:.4f}{repaired}"


def _plot_reward_and_size(summary: list[dict[str, float]], colours: dict[str, str], path: Path) -> Path:
    episodes = np.array([s["episode"] for s in summary], dtype=np.float64)
    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(11.0, 4.0), layout="constrained")
    ax_r.plot(episodes, [s.get("mean_reward", math.nan) for s in summary], marker="o")
    ax_r.set(xlabel="episode", ylabel="mean reward", title="Mean reward per episode")
    for table, colour in colours.items():
        key = SIZE_PREFIX + table
        if key in summary[0]:
            ax_s.plot(episodes, [s[key] for s in summary], marker="o", label=table, color=colour)
    if ax_s.lines:
        ax_s.legend(title="table")
    ax_s.set(xlabel="episode", ylabel="mean embedding size", title="Mean size per episode")
    return _save_figure(fig, path)


def _subsample(n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.sort(rng.choice(n, size=MAX_SCATTER_POINTS, replace=False))


def _plot_size_vs_popularity(
    plans: list[tuple[float, DimensionPlan]],
    popularity: Mapping[str, np.ndarray],
    colours: dict[str, str],
    path: Path,
) -> Path:
    fig, axes = _panels(len(plans), "Embedding size vs training popularity")
    for ax, (c, plan) in zip(axes, plans, strict=True):
        log1p = any(bool((popularity[t] <= 0).any()) for t in plan.sizes)  # zeros cannot go on a log axis
        by_rows = sorted(plan.sizes, key=lambda t: plan.sizes[t].numel(), reverse=True)
        for table, sizes in plan.sizes.items():
            rng = np.random.default_rng(0)  # same rows for every budget, so panels compare like with like
            idx = _subsample(sizes.numel(), rng)
            pop = popularity[table][idx]
            x = np.log1p(pop) if log1p else pop
            z = 2 + by_rows.index(table)  # smaller tables drawn on top, or thousands of items hide the users
            ax.scatter(x, sizes.numpy()[idx], s=3, alpha=0.3, label=table, color=colours[table], zorder=z)
        if not log1p:
            ax.set_xscale("log")
        ax.set(
            xlabel="log(1 + training popularity)" if log1p else "training popularity (log scale)",
            ylabel="embedding size",
            title=_budget_title(c, plan),
        )
        ax.legend(title="table", markerscale=4)
    return _save_figure(fig, path)


def _plot_size_histograms(plans: list[tuple[float, DimensionPlan]], colours: dict[str, str], path: Path) -> Path:
    fig, axes = _panels(len(plans), "Distribution of embedding sizes")
    for ax, (c, plan) in zip(axes, plans, strict=True):
        bins = np.arange(0.5, plan.d_max + 1.5)  # one bin per size 1..d_max
        for table, sizes in plan.sizes.items():
            values = sizes.numpy()
            weights = np.full(values.shape, 1.0 / values.size)  # shares, so a small user table stays visible
            ax.hist(values, bins=bins, weights=weights, alpha=0.5, label=table, color=colours[table])
        ax.set(
            xlabel="embedding size",
            ylabel="share of the table's rows",
            title=_budget_title(c, plan),
            xlim=(0.5, plan.d_max + 0.5),
        )
        ax.legend(title="table")
    return _save_figure(fig, path)


def _check_inputs(
    history: Sequence[Mapping[str, Any]], plans: Mapping[float, DimensionPlan], popularity: Mapping[str, Any]
) -> tuple[list[tuple[float, DimensionPlan]], dict[str, np.ndarray]]:
    if not history:
        raise ValueError("history is empty: the search recorded no steps, so there is nothing to report")
    if not plans:
        raise ValueError("plans is empty: the report needs at least one chosen plan")
    pops = {t: np.asarray(p, dtype=np.float64).reshape(-1) for t, p in popularity.items()}
    for c, plan in plans.items():
        if abs(float(c) - plan.target_sparsity) > 1e-12:
            raise ValueError(f"plans[{c}]: plan was searched for target sparsity {plan.target_sparsity}")
        for table, sizes in plan.sizes.items():
            if table not in pops:
                raise ValueError(f"popularity: no entry for table {table!r} of the plan at c = {c}")
            if pops[table].shape[0] != sizes.numel():
                raise ValueError(
                    f"popularity[{table!r}]: {pops[table].shape[0]} rows, the plan at c = {c} has {sizes.numel()}"
                )
    return sorted(((float(c), p) for c, p in plans.items()), key=lambda cp: cp[0]), pops


def write_report(
    out_dir: str | Path,
    history: list[dict[str, float]],
    plans: dict[float, DimensionPlan],
    popularity: dict[str, np.ndarray],
) -> dict[str, Path]:
    """Writes history.json and the three plots into ``out_dir``; returns their paths by name.

    ``history`` has one entry per search step (episode, step, mean_reward, mean_size_<table>, sparsity, mean_q,
    and any further keys, all kept); ``plans`` maps each budget c to its chosen plan; ``popularity`` maps each
    table to the training interaction count per row.
    """
    ordered, pops = _check_inputs(history, plans, popularity)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = episode_summary(history)
    paths = {"history": out / "history.json"}
    steps = [{k: v.item() if isinstance(v, np.generic) else v for k, v in h.items()} for h in history]  # JSON-able
    write_json_atomic(paths["history"], {"history": steps, "episodes": summary})
    sized = [k.removeprefix(SIZE_PREFIX) for h in history for k in h if k.startswith(SIZE_PREFIX)]
    colours = _colours([t for _, plan in ordered for t in plan.sizes] + sized)
    paths["reward_and_size"] = _plot_reward_and_size(summary, colours, out / "reward_and_size.png")
    paths["size_vs_popularity"] = _plot_size_vs_popularity(ordered, pops, colours, out / "size_vs_popularity.png")
    paths["size_histograms"] = _plot_size_histograms(ordered, colours, out / "size_histograms.png")
    return paths

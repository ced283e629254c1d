"""Plots of a search, logged to its MLflow parent run: the metric over temperature × alpha (a
heatmap when both are grids, else a scatter) and every trial's learning curve.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raykd.config import RaykdConfig
from raykd.schemes.tune.space import Dim

PAIR = ("distill.temperature", "distill.alpha")


def _value(cfg: RaykdConfig, key: str) -> Any:
    node: Any = cfg.to_dict()
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part)
        if node is None:
            return None
    return node


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _axes_keys(dims: list[Dim]) -> list[str]:
    """Temperature and alpha (searched or not); else the first numeric searched keys."""
    searched = [d.key for d in dims]
    if any(k in searched for k in PAIR):
        return list(PAIR)
    numeric = [d.key for d in dims if all(_numeric(v) for v in d.probes())]
    return numeric[:2]


def plot_search(rows: list[dict[str, Any]], dims: list[Dim], cfg: RaykdConfig, out: Path
                ) -> list[Path]:
    from matplotlib.figure import Figure

    metric = cfg.tune.metric
    done = [r for r in rows if _numeric(r.get("metric"))]
    paths: list[Path] = []
    keys = _axes_keys(dims)
    if done and keys:
        def coord(row, key):
            v = row["config"].get(key)
            return v if v is not None else _value(cfg, key)

        fig = Figure(figsize=(6.4, 4.8), dpi=110)
        ax = fig.add_subplot()
        kinds = {d.key: d for d in dims}
        grid = len(keys) == 2 and all(k in kinds and kinds[k].discrete for k in keys)
        if grid:  # heatmap: mean metric per cell
            xs = sorted({coord(r, keys[0]) for r in done}, key=float)
            ys = sorted({coord(r, keys[1]) for r in done}, key=float)
            cells = [[[] for _ in xs] for _ in ys]
            for r in done:
                cells[ys.index(coord(r, keys[1]))][xs.index(coord(r, keys[0]))].append(r["metric"])
            grid_vals = [[sum(c) / len(c) if c else math.nan for c in row] for row in cells]
            im = ax.imshow(grid_vals, origin="lower", cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_yticks(range(len(ys)), [str(y) for y in ys])
            for i, row in enumerate(grid_vals):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        elif len(keys) == 2:
            x = [coord(r, keys[0]) for r in done]
            y = [coord(r, keys[1]) for r in done]
            im = ax.scatter(x, y, c=[r["metric"] for r in done], cmap="viridis", s=70,
                            edgecolors="k")
            for xi, yi, r in zip(x, y, done, strict=True):
                ax.annotate(f"{r['metric']:.3f}", (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
            positive = [v for v in x if _numeric(v) and v > 0]
            if len(positive) == len(x) and max(x) >= 4 * min(x):  # e.g. temperatures 1..16
                ax.set_xscale("log", base=2 if keys[0] == PAIR[0] else 10)
        else:
            x = [coord(r, keys[0]) for r in done]
            ax.scatter(x, [r["metric"] for r in done], s=50)
            im = None
        if im is not None:
            fig.colorbar(im, ax=ax, label=metric)
        ax.set_xlabel(keys[0])
        ax.set_ylabel(keys[1] if len(keys) == 2 else metric)
        ax.set_title(f"{metric} (last epoch) per trial")
        path = out / ("val_accuracy_temperature_alpha.png" if keys == list(PAIR)
                      else "metric_over_space.png")
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)

    curves = [r for r in rows if r.get("curve")]
    if curves:
        fig = Figure(figsize=(7.2, 4.8), dpi=110)
        ax = fig.add_subplot()
        best = max(curves, key=lambda r: r["metric"] if _numeric(r.get("metric")) else -math.inf)
        for r in curves:
            label = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if _numeric(v) else
                              f"{k.split('.')[-1]}={v}" for k, v in r["config"].items())
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", markersize=3,
                    linewidth=2.5 if r is best else 1.0, label=label[:60])
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title("learning curves per trial (thick: best)")
        if len(curves) <= 12:
            ax.legend(fontsize=7)
        path = out / "learning_curves.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths

"""The run report's plots: loss terms, held-out bits/byte, expert usage, router shift.

Drawn with matplotlib's Agg canvas (no display, no pyplot global state); each returns its path, or
None when the history holds nothing to draw."""

from __future__ import annotations

import math
from pathlib import Path

# Units of the per-step loss terms logged by the loop (sakd/train/objective.py normalisation).
TERM_UNITS = {"kd": "nats / 1:1 position", "ce": "nats / student token", "chunk": "nats (binary KL) / student token",
              "hidden": "distance / chunk", "attention": "distance / chunk", "contrastive": "nats / example"}


def _figure(path: Path, draw, size=(7.0, 4.2)) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    fig.savefig(path, dpi=110)
    return path


def _step_axes(ax, ylabel: str, title: str) -> None:
    """Labels, legend and grid of a plot against the optimizer step."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_loss_terms(history: list[dict], path: Path) -> Path | None:
    terms = sorted({k[2:] for rec in history for k in rec if k.startswith("w_") and k[2:] in rec})
    if not terms:
        return None

    def draw(fig):
        ax = fig.subplots()
        positive = True
        for t in terms:
            pts = [(r["step"], r[t]) for r in history if isinstance(r.get(t), (int, float)) and math.isfinite(r[t])]
            positive &= all(v > 0 for _, v in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{t} ({TERM_UNITS.get(t, 'per target')})")
        if positive:
            ax.set_yscale("log")
        _step_axes(ax, "loss term value (unweighted; unit per term)", "Distillation loss terms")
    return _figure(path, draw)


def plot_heldout_bpb(evals: list[dict], teacher_bpb: float | None, path: Path,
                     extra: dict | None = None) -> Path | None:
    if not evals:
        return None

    def draw(fig):
        ax = fig.subplots()
        ax.plot([e["step"] for e in evals], [e["student_bpb"] for e in evals], "o-", label="student (distilled)")
        if teacher_bpb is not None:
            ax.axhline(teacher_bpb, color="tab:red", ls="--", label=f"teacher ({teacher_bpb:.3f})")
        if extra and extra.get("student_bpb_ce_only") is not None:
            ax.plot([evals[-1]["step"]], [extra["student_bpb_ce_only"]], "s", color="tab:green",
                    label=f"student, cross-entropy only ({extra['student_bpb_ce_only']:.3f})")
        _step_axes(ax, "held-out bits per UTF-8 byte (lower is better)", "Held-out bits per byte")
    return _figure(path, draw)


def plot_expert_usage(panels: list[tuple[str, dict[str, list[float]]]], what: str, path: Path) -> Path | None:
    """panels: (title, {layer name: [E] fractions}); one heatmap (layers x experts) each."""
    panels = [(t, u) for t, u in panels if u]
    if not panels:
        return None

    def draw(fig):
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        im = None
        for ax, (title, usage) in zip(axes, panels):
            names = list(usage)
            grid = [usage[n] for n in names]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
            E = len(grid[0])
            ax.set_xticks(range(E), [str(e) for e in range(E)])
            ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_title(title, fontsize=9)
            if len(names) * E <= 64:
                for i, row in enumerate(grid):
                    for j, v in enumerate(row):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if v < 0.5 else "black")
        fig.colorbar(im, ax=list(axes), label="fraction")
        fig.suptitle(f"Teacher expert usage per layer: {what}", fontsize=10)
    return _figure(path, draw, size=(4.0 + 3.0 * len(panels), 1.6 + 0.35 * max(len(u) for _, u in panels)))


def _short(name: str) -> str:
    parts = [p for p in name.split(".") if p.isdigit()]
    return f"layer {parts[-1]}" if parts else name


def plot_router_shift(history: list[dict], path: Path) -> Path | None:
    """Under SAR: KL(original router || current router) per layer over steps (``moe_router_kl``),
    and the mean over layers logged by the router step (``sar_router_kl``)."""
    per = [(r["step"], r["moe_router_kl"]) for r in history if isinstance(r.get("moe_router_kl"), dict)]
    mean = [(r["step"], r["sar_router_kl"]) for r in history if isinstance(r.get("sar_router_kl"), (int, float))]
    if not per and not mean:
        return None

    def draw(fig):
        ax = fig.subplots()
        layers = list(per[0][1]) if per else []
        for name in layers:
            pts = [(s, d[name]) for s, d in per if name in d]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=_short(name))
        if mean:
            ax.plot([p[0] for p in mean], [p[1] for p in mean], "k--", lw=1, label="mean over layers (router step)")
        _step_axes(ax, "KL(original router || current router), nats per token",
                   "Router shift under student-aware routing (SAR)")
    return _figure(path, draw)

"""The command's two plots: the catalogue's rooflines with a step's components on them (`report`), and this
device's roofline with each component at its measured FLOP/s (`measure`). matplotlib is imported inside each
function, so importing this module costs nothing."""

from __future__ import annotations

from collections.abc import Sequence

from roofline.hardware import Chip
from roofline.tokens import StepEstimate


def plot_roofline(
    path: str, chips: Sequence[Chip], estimates: Sequence[StepEstimate], dtype: str, title: str
) -> None:
    """Roofline of each chip (FLOP/s against FLOP/byte), with the step's components as points placed on
    the roof of the first chip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    x = np.logspace(-1, 4, 200)
    for chip in chips:
        peak = chip.peak(dtype)
        ax.plot(x, np.minimum(peak, x * chip.bandwidth), label=f"{chip.name} ({dtype})", lw=1.5)
    ref = chips[0]
    markers = {
        "qkv_proj": "o",
        "attention": "s",
        "o_proj": "^",
        "mlp": "D",
        "moe_router": "v",
        "moe_experts": "P",
        "lm_head": "*",
    }
    batches = sorted({e.batch for e in estimates})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(batches), 1)))
    seen = set()
    for e in estimates:
        if e.chip != ref.name:
            continue
        color = colors[batches.index(e.batch)]
        for c in e.components:
            i = c.cost.intensity
            y = min(ref.peak(dtype), i * ref.bandwidth)
            label = f"{c.name}" if c.name not in seen else None
            seen.add(c.name)
            ax.scatter(
                [i],
                [y],
                marker=markers.get(c.name, "o"),
                color=color,
                s=40,
                facecolors=color if e.weights == "bf16" else "none",
                label=label,
                zorder=3,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(
        title + f"\npoints: components on {ref.name}; filled = bf16 weights, hollow = quantized; "
        f"colour = batch {batches}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_measured(path: str, chip: Chip, est: StepEstimate, title: str) -> None:
    """This device's roofline with each component at its measured FLOP/s (and where its bound puts it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dtype = est.compute_dtype
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    x = np.logspace(-1, 4, 200)
    ax.plot(
        x,
        np.minimum(chip.peak(dtype), x * chip.bandwidth),
        color="black",
        lw=1.5,
        label=f"{chip.name} roof ({dtype})",
    )
    for i, c in enumerate(est.components):
        color = plt.get_cmap("tab10")(i % 10)
        intensity = c.cost.intensity
        ax.scatter(
            [intensity],
            [c.cost.flops / c.time_s],
            color=color,
            s=50,
            zorder=3,
            label=f"{c.name}: {c.bound_s / c.time_s:.0%} of roof",
        )
        ax.scatter([intensity], [c.cost.flops / c.bound_s], color=color, s=50, marker="_", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title + "\ndots: measured; dashes: the roofline bound", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["plot_measured", "plot_roofline"]

"""The command's two plots: the rooflines of the chips a report shows with each step's components on them
(`report`), and this device's roofline with each component at its measured FLOP/s (`measure`). matplotlib is
imported inside each function, so importing this module costs nothing.

Both draw the components as hollow markers of their own shape and size (largest first), so components that
sit at the same point (qkv_proj, o_proj and the MLP have nearly the same intensity at decode) stay visible
as nested outlines instead of hiding one another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from roofline.hardware import Chip
from roofline.tokens import COMPONENTS, StepEstimate

# Per component: marker and size (points²), largest first, so nested outlines are all visible.
MARKERS = {
    "qkv_proj": ("o", 170),
    "attention": ("s", 120),
    "o_proj": ("^", 95),
    "mlp": ("D", 55),
    "moe_router": ("v", 45),
    "moe_experts": ("P", 70),
    "lm_head": ("*", 30),
}
# Per weight format: the colour map whose shades tell the batches apart.
WEIGHT_CMAPS = {"bf16": "Blues", "int4": "Oranges", "int8": "Greens", "fp32": "Purples"}


def _fmt_si(v: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _step_label(e: StepEstimate) -> str:
    money = "n/a $/Mtok" if e.usd_per_mtok is None else f"${e.usd_per_mtok:.3g}/Mtok"
    layout = f", {e.chips} chips" if e.chips > 1 else ""
    fit = " (does not fit)" if not e.fits else ""
    return f"{e.weights} B={e.batch}{layout}: {_rate(e.tokens_per_s)} tok/s, {money}{fit}"


def plot_roofline(
    path: str, chips: Sequence[Chip], estimates: Sequence[StepEstimate], dtype: str, title: str
) -> None:
    """One panel per chip (the chips the report's table shows, in its order): the chip's roof in `dtype`
    and its ridge point, and every component of each of its rows at (FLOP/byte, FLOP/s per chip). Colour =
    the row (weights format: hue; batch: shade); each panel's key gives each row's tokens/s and $/Mtok. The
    component key (marker shapes) is at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    chips = list(chips)
    rows = list(dict.fromkeys((e.weights, e.batch) for e in estimates))
    batches = sorted({b for _, b in rows})
    weights = list(dict.fromkeys(w for w, _ in rows))

    def colour(w: str, b: int):
        shade = 0.55 + 0.4 * (batches.index(b) / max(len(batches) - 1, 1))
        return plt.get_cmap(WEIGHT_CMAPS.get(w, "Greys"))(shade)

    points = []  # (chip, estimate, component, intensity, FLOP/s per chip)
    for e in estimates:
        for c in e.components:
            if c.cost.flops > 0 and c.chip_s > 0 and c.cost.bytes > 0:
                points.append((e.chip, e, c, c.cost.intensity, c.cost.flops / e.chips / c.chip_s))
    ridges = [c.ridge_point(dtype) for c in chips]
    xs = [p[3] for p in points] + ridges
    x_lo = 10 ** math.floor(math.log10(min(xs) / 2))
    x_hi = 10 ** math.ceil(math.log10(max(xs) * 2))
    ys = [p[4] for p in points] + [c.peak(dtype) for c in chips]
    y_lo = 10 ** math.floor(math.log10(min(ys) / 3))
    y_hi = 10 ** math.ceil(math.log10(max(ys) * 3))

    ncols = min(len(chips), 3)
    nrows = math.ceil(len(chips) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(5.6 * ncols, 4.3 * nrows + 1.4),
        dpi=100,
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    x = [x_lo * (x_hi / x_lo) ** (i / 199) for i in range(200)]
    for ax, chip in zip(axes.flat, chips, strict=False):
        peak = chip.peak(dtype)
        ax.plot(x, [min(peak, xi * chip.bandwidth) for xi in x], color="black", lw=1.4, zorder=2)
        ax.axvline(chip.ridge_point(dtype), color="grey", ls=":", lw=1, zorder=1)
        handles = []
        groups: list[list] = []  # one component at (nearly) one spot, from several rows: nested outlines
        for e in (e for e in estimates if e.chip == chip.name):
            col = colour(e.weights, e.batch)
            for _, est, c, i, y in points:
                if est is not e:
                    continue
                lx, ly = math.log10(i), math.log10(y)
                for g in groups:
                    if g[0] == c.name and abs(g[1] - lx) < 0.06 and abs(g[2] - ly) < 0.06:
                        g[3].append((i, y, col))
                        break
                else:
                    groups.append([c.name, lx, ly, [(i, y, col)]])
            handles.append(Line2D([], [], color=col, lw=6, label=_step_label(e)))
        for name, _, _, members in groups:
            marker, size = MARKERS.get(name, ("o", 60))
            for k, (i, y, col) in enumerate(members):
                ax.scatter(
                    [i], [y], marker=marker, s=size * (1 + 0.8 * k), facecolors="none", edgecolors=[col],
                    lw=1.4, zorder=3,
                )  # fmt: skip
        ax.set_title(
            f"{chip.name}: {_fmt_si(peak, 'FLOP/s')} {dtype}, {_fmt_si(chip.bandwidth, 'B/s')}", fontsize=9
        )
        ax.legend(handles=handles, fontsize=6.5, loc="upper left", title="step (per row of the table)",
                  title_fontsize=6.5, framealpha=0.85)  # fmt: skip
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes.flat[len(chips) :]:
        ax.axis("off")
    ax0 = axes[0, 0]
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.set_xlim(x_lo, x_hi)
    ax0.set_ylim(y_lo, y_hi)
    for ax in axes[-1, :]:
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    for ax in axes[:, 0]:
        ax.set_ylabel("FLOP/s per chip")
    shown = [n for n in COMPONENTS if any(p[2].name == n for p in points)]
    comp_handles = [
        Line2D([], [], ls="none", marker=MARKERS[n][0], markersize=MARKERS[n][1] ** 0.5, mfc="none",
               mec="black", label=n)
        for n in shown
    ]  # fmt: skip
    comp_handles += [
        Line2D([], [], color="black", lw=1.4, label=f"roof ({dtype} peak, memory bandwidth)"),
        Line2D([], [], color="grey", ls=":", label="ridge point"),
    ]
    fig.legend(handles=comp_handles, loc="lower center", ncol=len(comp_handles), fontsize=8, frameon=False)
    fmt_keys = ", ".join(f"{w}: {WEIGHT_CMAPS.get(w, 'Greys')[:-1].lower()}" for w in weights)
    fig.suptitle(
        f"{title}\nOne panel per chip; each marker is one component of a step, at its intensity and the "
        "FLOP/s each chip reaches (nested outlines where several coincide).\n"
        f"Colour: weights ({fmt_keys}), darker = larger batch (batches {batches}); each panel's key gives "
        "the step's tokens/s and $/Mtok.",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def plot_measured(path: str, chip: Chip, est: StepEstimate, title: str) -> None:
    """This device's roofline with each component at its measured FLOP/s (hollow marker, its own shape and
    colour) and where its bound puts it (a dash of the same colour)."""
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
    comps = sorted(est.components, key=lambda c: -MARKERS.get(c.name, ("o", 60))[1])
    for c in comps:
        color = plt.get_cmap("tab10")(COMPONENTS.index(c.name) % 10 if c.name in COMPONENTS else 9)
        marker, size = MARKERS.get(c.name, ("o", 60))
        intensity = c.cost.intensity
        ax.scatter(
            [intensity],
            [c.cost.flops / c.time_s],
            marker=marker,
            s=size,
            facecolors="none",
            edgecolors=[color],
            lw=1.6,
            zorder=3,
            label=f"{c.name}: {c.bound_s / c.time_s:.0%} of roof",
        )
        ax.scatter([intensity], [c.cost.flops / c.bound_s], color=color, s=size, marker="_", lw=1.6, zorder=3)
    money = "" if est.usd_per_mtok is None else f", ${est.usd_per_mtok:.3g}/Mtok"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(
        f"{title}\nstep {est.step_s * 1e3:,.1f} ms: {_rate(est.tokens_per_s)} tokens/s{money}\n"
        "hollow markers: measured FLOP/s (nested where components coincide); dashes: the roofline bound",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["MARKERS", "plot_measured", "plot_roofline"]

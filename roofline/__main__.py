"""The lab's main command: what one decode step of a model costs, in time and dollars.

    python -m roofline report                          # Llama-3-70B, every catalogue chip and this host
    python -m roofline report --model mixtral-8x7b --chips h100-sxm,tpu-v6e --batch 1,32 --weights int4
    python -m roofline report --json > report.json     # only JSON on stdout; progress goes to stderr
    python -m roofline measure --model llama-3-8b --batch 16 --context 4096 --weights int4
                                                       # run the real kernels here, then price them

Exit status 2 on bad input (unknown model, chip or format, batch below 1), with the valid choices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from roofline.hardware import CHIPS, DTYPES, Chip, get_chip, measure_host
from roofline.models import MODELS, get_model
from roofline.tokens import KV_FORMATS, PHASES, WEIGHT_FORMATS, StepEstimate, estimate


def _items(text: str, arg: str) -> list[str]:
    """The comma-separated items of `text`; an empty item (`1,,2`, a trailing comma) is an error."""
    items = [v.strip() for v in text.split(",")]
    if any(not v for v in items):
        raise ValueError(f"{arg}={text!r} has an empty item; give a comma-separated list like 1,16,64")
    return items


def _ints(text: str, arg: str) -> list[int]:
    items = _items(text, arg)
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise ValueError(f"{arg}={text!r} must be a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{arg}={text!r}: every value must be an integer >= 1")
    return values


def _names(text: str, arg: str, valid: Sequence[str]) -> list[str]:
    names = _items(text, arg)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown {arg} {bad}; valid choices: {', '.join(valid)}")
    return names


def _prices(items: Sequence[str], *, bare: str | None = None) -> dict[str, float]:
    """`--price` values: each `CHIP=USD[,CHIP=USD...]` (USD per chip-hour); the option may repeat.

    With `bare` set (the measure command: "host"), a bare number is that chip's price.
    """
    valid = [*CHIPS, "host"]
    prices: dict[str, float] = {}
    for text in items:
        for item in _items(text, "--price"):
            name, sep, value = item.partition("=")
            if not sep and bare is not None:
                name, value = bare, item
            elif not sep:
                raise ValueError(f"--price {item!r} must look like CHIP=USD_PER_HOUR")
            name = name.strip()
            if name not in valid:
                raise ValueError(f"--price {item!r}: unknown chip {name!r}; valid chips: {', '.join(valid)}")
            try:
                usd = float(value)
            except ValueError:
                raise ValueError(f"--price {item!r} must look like CHIP=USD_PER_HOUR") from None
            if not usd > 0 or usd == float("inf"):
                raise ValueError(f"--price {item!r}: the price must be a positive number of USD per hour")
            prices[name] = usd
    return prices


# int4 group sizes the token model accepts: what GPTQ/AWQ checkpoints use and the lab's int4 layout packs
# (an even number of rows per group), as powers of two; "channel" is one group per output column.
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def _group_size(text: str) -> int | None:
    if text in ("channel", "-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in GROUP_SIZES:
        raise ValueError(
            f"--group-size={text!r} must be one of {', '.join(map(str, GROUP_SIZES))} or 'channel'"
        )
    return value


def _positive(value: float, arg: str, *, integer: bool = False) -> None:
    if integer and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{arg}={value} must be an integer >= 1")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{arg}={value} must be a positive number")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_money(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _row(e: StepEstimate) -> dict[str, Any]:
    return {
        "chip": e.chip,
        "chips": e.chips,
        "weights": e.weights,
        "kv": e.kv,
        "batch": e.batch,
        "context": e.context,
        "phase": e.phase,
        "step_s": e.step_s,
        "tokens_per_s": e.tokens_per_s,
        "usd_per_mtok": e.usd_per_mtok,
        "dominant_bound": e.dominant_bound,
        "fits": e.fits,
        "chips_needed": e.chips_needed,
        "tp": e.tp,
        "ep": e.ep,
        "comm_s": e.comm_s,
        "memory_gb": e.footprint.total / 1e9,
        "notes": list(e.notes),
        "components": [
            {
                "name": c.name,
                "count": c.count,
                "flops": c.cost.flops,
                "bytes": c.cost.bytes,
                "intensity": c.cost.intensity,
                "bound_s": c.bound_s,
                "bound": c.bound,
                "step_share_s": c.count * c.chip_s,
            }
            for c in e.components
        ]
        + [
            {
                "name": "comm",
                "count": sum(k.count for k in e.collectives),
                "step_share_s": e.comm_s,
                "collectives": [
                    {
                        "name": k.name,
                        "count": k.count,
                        "group": k.group,
                        "bytes": k.bytes,
                        "seconds": k.seconds,
                        "step_s": k.step_s,
                    }
                    for k in e.collectives
                ],
            }
        ],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'chip':<10} {'chips':>5} {'tp×ep':>6} {'weights':>7} {'batch':>5} {'step ms':>9} {'comm ms':>8} "
        f"{'tokens/s':>10} {'$/Mtok':>8} {'bound':>8} {'GB':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['chip']:<10} {r['chips']:>5} {str(r['tp']) + '×' + str(r['ep']):>6} {r['weights']:>7} "
            f"{r['batch']:>5} {r['step_s'] * 1e3:>9.2f} {r['comm_s'] * 1e3:>8.3f} "
            f"{r['tokens_per_s']:>10.0f} {_fmt_money(r['usd_per_mtok']):>8} {r['dominant_bound']:>8} "
            f"{r['memory_gb']:>7.1f}"
        )
        if not r["fits"]:
            line += f"  does not fit: needs {r['chips_needed']} chips"
        lines.append(line)
    return "\n".join(lines)


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


def cmd_report(args: argparse.Namespace) -> int:
    model = get_model(args.model)
    chip_names = _names(args.chips, "--chips", [*CHIPS, "host"]) if args.chips else [*CHIPS, "host"]
    if args.no_host:
        chip_names = [c for c in chip_names if c != "host"]
    batches = _ints(args.batch, "--batch")
    weights = _names(args.weights, "--weights", WEIGHT_FORMATS)
    group_size = _group_size(args.group_size)
    prices = _prices(args.price)
    if args.tp is not None:
        _positive(args.tp, "--tp", integer=True)
    if args.ep is not None:
        _positive(args.ep, "--ep", integer=True)
        if not model.is_moe:
            raise ValueError(f"--ep={args.ep}: expert parallelism needs an MoE model; {model.name} has none")
    _positive(args.context, "--context", integer=True)
    if not 0 < args.mem_fraction <= 1:
        raise ValueError(f"--mem-fraction={args.mem_fraction} must be in (0, 1]")
    if args.compute_dtype not in DTYPES:
        raise ValueError(
            f"unknown --compute-dtype {args.compute_dtype!r}; valid choices: {', '.join(DTYPES)}"
        )
    if not chip_names:
        raise ValueError("--no-host with --chips host leaves no chip to report on")

    chips: list[Chip] = []
    for name in chip_names:
        if name == "host":
            chip = measure_host(progress=_progress)
        else:
            chip = get_chip(name)
        if name in prices:
            chip = chip.with_price(prices[name])
        chips.append(chip)

    estimates = []
    for chip in chips:
        for w in weights:
            for b in batches:
                estimates.append(
                    estimate(
                        model,
                        chip,
                        batch=b,
                        context=args.context,
                        phase=args.phase,
                        weights=w,
                        group_size=group_size,
                        kv=args.kv,
                        compute_dtype=args.compute_dtype,
                        tp=args.tp,
                        ep=args.ep,
                        mem_fraction=args.mem_fraction,
                    )
                )
    rows = [_row(e) for e in estimates]
    plot_chips = [c for c in chips if args.compute_dtype in c.peak_flops]
    title = f"{model.name}, {args.phase}, context {args.context}"
    if args.out and plot_chips:
        plot_roofline(args.out, plot_chips, estimates, args.compute_dtype, title)
        _progress(f"wrote {args.out}")
    report = {
        "model": model.name,
        "params": model.params(),
        "phase": args.phase,
        "context": args.context,
        "kv": args.kv,
        "group_size": group_size,
        "compute_dtype": args.compute_dtype,
        "chips": {
            c.name: {
                "peak_flops": dict(c.peak_flops),
                "bandwidth": c.bandwidth,
                "memory": c.memory,
                "price_per_hour": c.price_per_hour,
                "link": c.link,
                "link_bandwidth": c.link_bandwidth,
                "link_latency": c.link_latency,
                "sources": dict(c.sources),
            }
            for c in chips
        },
        "rows": rows,
        "plot": args.out or None,
        "assumptions": "roofline bounds (an upper bound on throughput); chips = tp x ep, work split evenly, "
        "plus ring all-reduces (tp) and all-to-alls (ep) over each chip's link; see roofline/tokens.py",
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(
        f"{title}: {model.params() / 1e9:.1f}B parameters, KV {args.kv}, "
        f"int4 group size {group_size or 'per-channel'}, computed in {args.compute_dtype}"
    )
    print(_table(rows))
    print()
    print(
        "Roofline bounds: each component takes max(FLOPs / peak, bytes / bandwidth); with several chips the "
        "work splits evenly (chips = tp × ep) and comm ms adds per layer two ring all-reduces (tp > 1) and, "
        "for MoE with ep > 1, two all-to-alls over the chip's link. $/Mtok uses on-demand prices "
        "(roofline/data/prices.json); n/a where no price is known (pass --price host=USD)."
    )
    for c in chips:
        if c.name == "host":
            print(
                f"host: {c.peak('fp32') / 1e9:.0f} GFLOP/s fp32, {c.bandwidth / 1e9:.1f} GB/s "
                f"({c.sources['bandwidth']})"
            )
    return 0


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


def cmd_measure_sharded(args: argparse.Namespace) -> int:
    """`measure --devices N`: the sharded kernels of one layer on N devices against one device."""
    from roofline.measure_sharded import measure_sharded

    model = get_model(args.model)
    batches = _ints(args.batch, "--batch")
    if _items(args.weights, "--weights") != ["int4"]:
        raise ValueError(
            f"--weights={args.weights!r}: --devices measures the sharded INT4 kernels; use --weights int4"
        )
    _positive(args.context, "--context", integer=True)
    _positive(args.min_time, "--min-time")
    runs = []
    for b in batches:
        _progress(f"{model.name}, sharded over {args.devices} devices, batch {b}, context {args.context}:")
        runs.append(
            measure_sharded(
                model, devices=args.devices, batch=b, context=args.context, min_time_s=args.min_time
            )
        )
    report = {
        "model": model.name,
        "devices": args.devices,
        "context": args.context,
        "runs": [
            {
                "batch": r.batch,
                "platform": r.platform,
                "shared_cores": r.shared_cores,
                "notes": list(r.notes),
                "components": [
                    {
                        "name": c.name,
                        "layout": c.layout,
                        "single_s": c.single_s,
                        "sharded_s": c.sharded_s,
                        "speedup": c.speedup,
                    }
                    for c in r.components
                ],
            }
            for r in runs
        ],
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for r in runs:
        print(
            f"\n{model.name}: one layer's kernels sharded over {r.devices} {r.platform} devices, "
            f"int4 weights, batch {r.batch}, context {r.context}"
        )
        sharded_head = f"{r.devices} devices ms"
        head = f"{'component':<12} {'layout':<40} {'1 device ms':>12} {sharded_head:>14} {'speedup':>8}"
        print(head)
        print("-" * len(head))
        for c in r.components:
            print(
                f"{c.name:<12} {c.layout:<40} {c.single_s * 1e3:>12.3f} {c.sharded_s * 1e3:>14.3f} "
                f"{c.speedup:>7.2f}x"
            )
        for note in r.notes:
            print(f"note: {note}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from roofline.measure import MEASURE_WEIGHTS, measure_step

    if args.devices is not None:
        _positive(args.devices, "--devices", integer=True)
        if args.devices < 2:
            raise ValueError(f"--devices={args.devices} must be >= 2 (one device is the plain measure)")
        return cmd_measure_sharded(args)
    model = get_model(args.model)
    batches = _ints(args.batch, "--batch")
    weights = _names(args.weights, "--weights", MEASURE_WEIGHTS)
    _positive(args.context, "--context", integer=True)
    _positive(args.min_time, "--min-time")
    prices = _prices(args.price, bare="host")
    chip = measure_host(progress=_progress)
    if "host" in prices:
        chip = chip.with_price(prices["host"])
    results = []
    for w in weights:
        for b in batches:
            _progress(f"{model.name}, {w} weights, batch {b}, context {args.context}:")
            m = measure_step(
                model,
                chip,
                batch=b,
                context=args.context,
                weights=w,
                kv=args.kv,
                min_time_s=args.min_time,
                progress=True,
            )
            results.append(m)
    sheet = CHIPS[chip.catalogue_entry] if chip.catalogue_entry in CHIPS else None
    report = {
        "model": model.name,
        "context": args.context,
        "kv": args.kv,
        "device": chip.description,
        "datasheet_chip": None if sheet is None else sheet.name,
        "host_bandwidth": chip.bandwidth,
        "host_peak_flops": dict(chip.peak_flops),
        "price_per_hour": chip.price_per_hour,
        "runs": [],
    }
    for m in results:
        e = m.estimate
        run = {
            "weights": e.weights,
            "batch": e.batch,
            "fits": m.fits,
            "notes": list(m.notes),
            "components": [
                {
                    "name": c.name,
                    "impl": m.impls[c.name],
                    "count": c.count,
                    "measured_s": c.time_s,
                    "bound_s": c.bound_s,
                    "fraction": c.bound_s / c.time_s,
                    "datasheet_bound_s": None if sheet is None else c.cost.time_bound(sheet, e.compute_dtype),
                    "fraction_of_datasheet": None
                    if sheet is None
                    else c.cost.time_bound(sheet, e.compute_dtype) / c.time_s,
                    "bound": c.bound,
                    "share": c.step_share_s / e.step_s,
                }
                for c in e.components
            ],
            "step_s": e.step_s,
            "tokens_per_s": e.tokens_per_s,
            "usd_per_mtok": e.usd_per_mtok,
            "projection": {},
        }
        fractions = {c["name"]: c["fraction"] for c in run["components"]}
        for name, cat in CHIPS.items():
            if name in prices:
                cat = cat.with_price(prices[name])
            p = estimate(
                model,
                cat,
                batch=e.batch,
                context=args.context,
                weights=e.weights if e.weights != "fp32" else "bf16",
                kv=args.kv,
            )
            run["projection"][name] = {
                "chips": p.chips,
                "step_s": p.step_s,
                "tokens_per_s": p.tokens_per_s,
                "usd_per_mtok": p.usd_per_mtok,
            }
        run["host_fractions"] = fractions
        report["runs"].append(run)
    if args.out and results:
        last = results[-1].estimate
        plot_measured(
            args.out,
            chip,
            last,
            f"{model.name} on this host, {last.weights} weights, batch "
            f"{last.batch}, context {args.context} (measured)",
        )
        _progress(f"wrote {args.out}")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for run in report["runs"]:
        print(
            f"\n{model.name}: {run['weights']} weights, batch {run['batch']}, context {args.context}, "
            f"KV {args.kv}, on {chip.description}"
        )
        head = (
            f"{'component':<12} {'count':>5} {'measured ms':>12} {'bound ms':>10} {'fraction':>9} "
            + (f"{'of ' + sheet.name:>13} " if sheet else "")
            + f"{'share':>7}  implementation"
        )
        print(head)
        print("-" * len(head))
        for c in run["components"]:
            datasheet = f"{c['fraction_of_datasheet']:>13.1%} " if sheet else ""
            print(
                f"{c['name']:<12} {c['count']:>5} {c['measured_s'] * 1e3:>12.3f} {c['bound_s'] * 1e3:>10.3f} "
                f"{c['fraction']:>9.1%} {datasheet}{c['share']:>7.1%}  {c['impl']}"
            )
        print(
            f"step {run['step_s'] * 1e3:.1f} ms -> {run['tokens_per_s']:.2f} tokens/s, "
            f"$/Mtok {_fmt_money(run['usd_per_mtok'])}"
            + ("" if chip.price_per_hour else " (pass --price host=USD_PER_HOUR for this machine)")
        )
        for note in run["notes"]:
            print(f"note: {note}")
        print("analytic projection (roofline bounds; this host's fractions above are data, not applied):")
        for name, p in run["projection"].items():
            print(
                f"  {name:<10} x{p['chips']:<3} {p['step_s'] * 1e3:8.2f} ms  "
                f"{p['tokens_per_s']:10.0f} tokens/s  $/Mtok {_fmt_money(p['usd_per_mtok'])}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m roofline", description=__doc__.split("\n\n")[0], formatter_class=fmt
    )
    sub = parser.add_subparsers(dest="command", required=True)
    price_help = (
        "on-demand USD per chip-hour, CHIP=USD[,CHIP=USD...] (repeatable), overriding the catalogue; "
        "'host' is this machine, which has no price unless given"
    )
    rep = sub.add_parser(
        "report", help="step time, tokens/s and $/Mtok per chip, and a roofline plot", formatter_class=fmt
    )
    rep.add_argument("--model", default="llama-3-70b", help=f"one of: {', '.join(MODELS)}")
    rep.add_argument(
        "--chips", default=None, help=f"comma-separated; default all: {', '.join([*CHIPS, 'host'])}"
    )
    rep.add_argument("--no-host", action="store_true", help="leave this machine out (no measurement)")
    rep.add_argument("--batch", default="1,16,64", help="comma-separated decode batch sizes (>= 1)")
    rep.add_argument("--context", type=int, default=4096, help="tokens in each sequence's KV cache (>= 1)")
    rep.add_argument("--phase", default="decode", choices=PHASES, help="decode (one token) or prefill")
    rep.add_argument(
        "--weights", default="bf16,int4", help=f"comma-separated, of: {', '.join(WEIGHT_FORMATS)}"
    )
    rep.add_argument(
        "--group-size",
        default="128",
        help=f"int4 group size: one of {', '.join(map(str, GROUP_SIZES))}, or 'channel'",
    )
    rep.add_argument("--kv", default="bf16", choices=KV_FORMATS, help="KV-cache format")
    rep.add_argument(
        "--compute-dtype",
        default="bf16",
        help=f"dtype whose peak bounds the matmuls, of: {', '.join(DTYPES)} (the chip must publish it)",
    )
    rep.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel degree; chips per model replica = tp × ep (default: the fewest chips, in "
        "powers of two, that hold the model, all tensor parallel)",
    )
    rep.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel degree for MoE models: experts split over ep groups of tp chips, tokens "
        "routed by two all-to-alls per MoE layer (default: 1, experts tensor parallel)",
    )
    rep.add_argument(
        "--mem-fraction", type=float, default=0.9, help="usable fraction of each chip's memory, in (0, 1]"
    )
    rep.add_argument("--price", action="append", default=[], metavar="CHIP=USD", help=price_help)
    rep.add_argument("--out", default="roofline.png", help="roofline plot path ('' for none)")
    rep.add_argument("--json", action="store_true", help="write only JSON to stdout (progress on stderr)")
    rep.set_defaults(func=cmd_report)
    mea = sub.add_parser(
        "measure",
        help="run the lab's kernels at one layer's shapes here and price the step",
        formatter_class=fmt,
    )
    mea.add_argument("--model", default="llama-3-8b", help=f"one of: {', '.join(MODELS)}")
    mea.add_argument("--batch", default="1", help="comma-separated decode batch sizes (>= 1)")
    mea.add_argument("--context", type=int, default=1024, help="tokens in each sequence's KV cache (>= 1)")
    mea.add_argument("--weights", default="int4", help="comma-separated, of: fp32, bf16, int4")
    mea.add_argument("--kv", default="bf16", choices=KV_FORMATS, help="KV-cache format")
    mea.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="CHIP=USD",
        help=price_help + "; a bare number is this machine's price (host=USD); other chips' prices "
        "apply to the projection",
    )
    mea.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per component (> 0)")
    mea.add_argument(
        "--devices",
        type=int,
        default=None,
        help="measure the sharded INT4 kernels (kernels.parallel) of one layer on this many devices against "
        "one; on a CPU-only machine the devices are simulated (they share cores: not a scaling result)",
    )
    mea.add_argument("--out", default="roofline_measured.png", help="plot path ('' for none)")
    mea.add_argument("--json", action="store_true", help="write only JSON to stdout (progress on stderr)")
    mea.set_defaults(func=cmd_measure)
    return parser


def _request_host_devices(argv: Sequence[str]) -> None:
    """`measure --devices N` on a CPU-only machine needs N simulated devices, which XLA creates only if asked
    before its CPU backend starts: ask now, before JAX is used (harmless where the devices are GPUs or
    TPUs). Only the command line does this; `main()` called from Python leaves the environment alone."""
    if "measure" not in argv:
        return
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        elif arg == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
    flags = os.environ.get("XLA_FLAGS", "")
    if value is not None and value.isdigit() and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={value}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    _request_host_devices(sys.argv[1:])
    sys.exit(main())

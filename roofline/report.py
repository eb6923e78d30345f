"""The command's reports: the analytic grid of `report`, the measured runs of `measure` with their projection
onto the catalogue, and the sharded runs of `measure --devices`, each as the JSON document the command writes
with `--json` and as the text table it prints otherwise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from roofline.hardware import CHIPS, Chip
from roofline.models import ModelShape
from roofline.tokens import StepEstimate, estimate

if TYPE_CHECKING:  # roofline.measure imports JAX; the analytic report does not need it
    from roofline.measure import Measurement
    from roofline.measure_sharded import ShardedMeasurement

ASSUMPTIONS = (
    "roofline bounds (an upper bound on throughput); chips = tp x ep, work split evenly, "
    "plus ring all-reduces (tp) and all-to-alls (ep) over each chip's link; see roofline/tokens.py"
)


def fmt_money(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def fmt_rate(v: float) -> str:
    """Tokens/s: whole numbers from 100 up, three significant digits below (0.345, not 0)."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a text table: a header, a rule and the rows. `columns` are (header, align) with align "<"
    or ">"; each column is as wide as its widest cell, so long values (a huge context, thousands of chips)
    never push the columns out of line."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, (h, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return " ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, columns, widths, strict=True)).rstrip()

    head = line([h for h, _ in columns])
    return [head, "-" * len(head), *(line(r) for r in rows)]


def report_title(model: str, phase: str, context: int) -> str:
    return f"{model}, {phase}, context {context}"


# --------------------------------------------------------------------------------------------------
# report: the analytic grid (chips x weight formats x batches)


def estimate_grid(
    model: ModelShape,
    chips: Sequence[Chip],
    *,
    weights: Sequence[str],
    batches: Sequence[int],
    **options: Any,
) -> list[StepEstimate]:
    """`estimate` for every chip, weight format and batch, in that order; `options` go to each call."""
    return [
        estimate(model, chip, batch=b, weights=w, **options)
        for chip in chips
        for w in weights
        for b in batches
    ]


def estimate_row(e: StepEstimate) -> dict[str, Any]:
    """One estimate as a JSON row, its components and (as one more component) its collectives."""
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
        "usd_per_chip_hour": e.price_per_hour,
        "dominant_bound": e.dominant_bound,
        "fits": e.fits,
        "chips_needed": e.chips_needed,
        "tp": e.tp,
        "ep": e.ep,
        "comm_s": e.comm_s,
        "memory_gb": e.footprint.total / 1e9,
        "memory_per_chip_gb": e.memory_per_chip / 1e9,
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


def estimates_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The report's table: one line per row, its notes as numbered references listed under the table (a note
    that several rows share is listed once)."""
    columns = [
        ("chip", "<"), ("chips", ">"), ("tp×ep", ">"), ("weights", ">"), ("batch", ">"), ("step ms", ">"),
        ("comm ms", ">"), ("tokens/s", ">"), ("$/Mtok", ">"), ("$/chip-h", ">"), ("bound", ">"),
        ("GB", ">"), ("notes", "<"),
    ]  # fmt: skip
    notes: dict[str, int] = {}
    cells = []
    for r in rows:
        refs = [notes.setdefault(n, len(notes) + 1) for n in r.get("notes", ())]
        fit = "" if r["fits"] else f"does not fit: needs {r['chips_needed']} chips"
        cells.append(
            [
                r["chip"],
                str(r["chips"]),
                f"{r['tp']}×{r['ep']}",
                r["weights"],
                str(r["batch"]),
                f"{r['step_s'] * 1e3:.2f}",
                f"{r['comm_s'] * 1e3:.3f}",
                fmt_rate(r["tokens_per_s"]),
                fmt_money(r["usd_per_mtok"]),
                "n/a" if r.get("usd_per_chip_hour") is None else f"{r['usd_per_chip_hour']:.2f}",
                r["dominant_bound"],
                f"{r['memory_gb']:.1f}",
                " ".join([f"[{','.join(map(str, refs))}]" if refs else "", fit]).strip(),
            ]
        )
    lines = format_table(columns, cells)
    if notes:
        lines += ["notes:", *(f"[{i}] {n}" for n, i in notes.items())]
    return "\n".join(lines)


def report_json(
    model: ModelShape,
    chips: Sequence[Chip],
    estimates: Sequence[StepEstimate],
    *,
    phase: str,
    context: int,
    kv: str,
    group_size: int | None,
    compute_dtype: str,
    plot: str | None,
) -> dict[str, Any]:
    """The `report --json` document."""
    return {
        "model": model.name,
        "params": model.params(),
        "phase": phase,
        "context": context,
        "kv": kv,
        "group_size": group_size,
        "compute_dtype": compute_dtype,
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
        "rows": [estimate_row(e) for e in estimates],
        "plot": plot,
        "assumptions": ASSUMPTIONS,
    }


def report_text(report: Mapping[str, Any], chips: Sequence[Chip]) -> str:
    """`report` as text: a header, the table, what the numbers assume, and the host's measured roofline."""
    title = report_title(report["model"], report["phase"], report["context"])
    lines = [
        f"{title}: {report['params'] / 1e9:.1f}B parameters, KV {report['kv']}, "
        f"int4 group size {report['group_size'] or 'per-channel'}, computed in {report['compute_dtype']}",
        estimates_table(report["rows"]),
        "",
        "Roofline bounds: each component takes max(FLOPs / peak, bytes / bandwidth); with several chips the "
        "work splits evenly (chips = tp × ep) and comm ms adds per layer two ring all-reduces (tp > 1) and, "
        "for MoE with ep > 1, two all-to-alls over the chip's link. $/Mtok uses on-demand prices "
        "(roofline/data/prices.json), shown as $/chip-h (USD per chip-hour; $/Mtok = $/chip-h × chips / "
        "(tokens/s × 3600) × 1e6); n/a where no price is known (pass --price host=USD). GB: weights and KV "
        "cache of all chips together.",
    ]
    for c in chips:
        if c.name == "host":
            lines.append(
                f"host: {c.peak('fp32') / 1e9:.0f} GFLOP/s fp32, {c.bandwidth / 1e9:.1f} GB/s "
                f"({c.sources['bandwidth']})"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# measure: the measured runs, and the analytic projection of each onto the catalogue


def projection(
    model: ModelShape, e: StepEstimate, *, context: int, kv: str, prices: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Per catalogue chip, the analytic estimate of the measured run's step (fp32 weights projected as bf16),
    at the prices given where given."""
    out = {}
    for name, cat in CHIPS.items():
        if name in prices:
            cat = cat.with_price(prices[name])
        p = estimate(
            model,
            cat,
            batch=e.batch,
            context=context,
            weights=e.weights if e.weights != "fp32" else "bf16",
            kv=kv,
        )
        out[name] = {
            "chips": p.chips,
            "step_s": p.step_s,
            "tokens_per_s": p.tokens_per_s,
            "usd_per_mtok": p.usd_per_mtok,
            "usd_per_chip_hour": p.price_per_hour,
        }
    return out


def measure_json(
    model: ModelShape,
    chip: Chip,
    results: Sequence[Measurement],
    *,
    context: int,
    kv: str,
    prices: Mapping[str, float],
) -> dict[str, Any]:
    """The `measure --json` document; where `chip` is a catalogue chip's silicon, each component's fraction of
    that chip's datasheet roofline too."""
    sheet = CHIPS[chip.catalogue_entry] if chip.catalogue_entry in CHIPS else None
    report: dict[str, Any] = {
        "model": model.name,
        "context": context,
        "kv": kv,
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
            "projection": projection(model, e, context=context, kv=kv, prices=prices),
        }
        run["host_fractions"] = {c["name"]: c["fraction"] for c in run["components"]}
        report["runs"].append(run)
    return report


def measure_text(report: Mapping[str, Any]) -> str:
    """`measure` as text: per run, the component table, the step, the notes and the projection."""
    sheet = report["datasheet_chip"]
    price = report["price_per_hour"]
    lines = []
    for run in report["runs"]:
        lines.append(
            f"\n{report['model']}: {run['weights']} weights, batch {run['batch']}, "
            f"context {report['context']}, KV {report['kv']}, on {report['device']}"
        )
        columns = [("component", "<"), ("count", ">"), ("measured ms", ">"), ("bound ms", ">")]
        columns += [("fraction", ">")] + ([(f"of {sheet}", ">")] if sheet is not None else [])
        columns += [("share", ">"), ("implementation", "<")]
        rows = []
        for c in run["components"]:
            datasheet = [f"{c['fraction_of_datasheet']:.1%}"] if sheet is not None else []
            rows.append(
                [
                    c["name"],
                    str(c["count"]),
                    f"{c['measured_s'] * 1e3:.3f}",
                    f"{c['bound_s'] * 1e3:.3f}",
                    f"{c['fraction']:.1%}",
                    *datasheet,
                    f"{c['share']:.1%}",
                    c["impl"],
                ]
            )
        lines += format_table(columns, rows)
        lines.append(
            f"step {run['step_s'] * 1e3:.1f} ms -> {run['tokens_per_s']:.2f} tokens/s, "
            f"$/Mtok {fmt_money(run['usd_per_mtok'])}"
            + (
                f" at ${price:.2f}/chip-hour"
                if price
                else " (pass --price host=USD_PER_HOUR for this machine)"
            )
        )
        lines += [f"note: {note}" for note in run["notes"]]
        lines.append(
            "analytic projection (roofline bounds; this host's fractions above are data, not applied):"
        )
        proj = [
            [
                name,
                f"x{p['chips']}",
                f"{p['step_s'] * 1e3:.2f} ms",
                f"{fmt_rate(p['tokens_per_s'])} tokens/s",
                f"$/Mtok {fmt_money(p['usd_per_mtok'])}",
                "" if p.get("usd_per_chip_hour") is None else f"at ${p['usd_per_chip_hour']:.2f}/chip-hour",
            ]
            for name, p in run["projection"].items()
        ]
        align = ["<", "<", ">", ">", ">", "<"]
        lines += ["  " + line for line in format_table(list(zip([""] * 6, align, strict=True)), proj)[2:]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# measure --devices: the sharded kernels against one device


def sharded_json(
    model: ModelShape, devices: int, context: int, runs: Sequence[ShardedMeasurement]
) -> dict[str, Any]:
    """The `measure --devices N --json` document."""
    return {
        "model": model.name,
        "devices": devices,
        "context": context,
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


def sharded_text(model: str, runs: Sequence[ShardedMeasurement]) -> str:
    """`measure --devices N` as text: per run, each component on one device and on N."""
    lines = []
    for r in runs:
        lines.append(
            f"\n{model}: one layer's kernels sharded over {r.devices} {r.platform} devices, "
            f"int4 weights, batch {r.batch}, context {r.context}"
        )
        columns = [
            ("component", "<"), ("layout", "<"), ("1 device ms", ">"), (f"{r.devices} devices ms", ">"),
            ("speedup", ">"),
        ]  # fmt: skip
        rows = [
            [c.name, c.layout, f"{c.single_s * 1e3:.3f}", f"{c.sharded_s * 1e3:.3f}", f"{c.speedup:.2f}x"]
            for c in r.components
        ]
        lines += format_table(columns, rows)
        lines += [f"note: {note}" for note in r.notes]
    return "\n".join(lines)


__all__ = [
    "ASSUMPTIONS",
    "estimate_grid",
    "estimate_row",
    "estimates_table",
    "fmt_money",
    "fmt_rate",
    "format_table",
    "measure_json",
    "measure_text",
    "projection",
    "report_json",
    "report_text",
    "report_title",
    "sharded_json",
    "sharded_text",
]

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
import tempfile
from collections.abc import Sequence
from pathlib import Path

from roofline import report as rep
from roofline.hardware import CHIPS, DTYPES, Chip, get_chip, measure_host
from roofline.models import MODELS, get_model
from roofline.plots import plot_measured, plot_roofline
from roofline.tokens import KV_FORMATS, PHASES, WEIGHT_FORMATS, tensor_parallel_problem, valid_tensor_parallel


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


def writable_path(text: str) -> str:
    """argparse `type` for an output file: '' (none), or a path this process can write now. Checked when the
    command line is parsed, so a bad path is a usage error (exit 2) before any work, not a traceback after.
    """
    if not text:
        return text
    path = Path(text)
    parent = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a directory")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory '{parent}' does not exist")
    if path.exists():
        ok = os.access(path, os.W_OK)
    else:
        try:  # os.access is not enough: root may "write" a read-only mount or /proc
            with tempfile.TemporaryFile(dir=parent):
                ok = True
        except OSError:
            ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def _write_plot(plot, *args) -> int:
    """Write a plot after the results were printed; 1 (with the reason) if the file cannot be written."""
    try:
        plot(*args)
    except OSError as err:
        print(f"error: could not write the plot {args[0]!r}: {err}", file=sys.stderr)
        return 1
    _progress(f"wrote {args[0]}")
    return 0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(document: dict, text: str, as_json: bool) -> int:
    """The command's result on stdout: only the JSON document with --json, else the text (if any)."""
    if as_json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif text:
        print(text)
    return 0


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
        problem = tensor_parallel_problem(model, args.tp)
        if problem is not None:
            valid = ", ".join(map(str, valid_tensor_parallel(model)))
            raise ValueError(f"--tp={args.tp} cannot split {model.name}: {problem}; valid --tp: {valid}")
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
        chip = measure_host(progress=_progress) if name == "host" else get_chip(name)
        if name in prices:
            chip = chip.with_price(prices[name])
        chips.append(chip)
    estimates = rep.estimate_grid(
        model,
        chips,
        weights=weights,
        batches=batches,
        context=args.context,
        phase=args.phase,
        group_size=group_size,
        kv=args.kv,
        compute_dtype=args.compute_dtype,
        tp=args.tp,
        ep=args.ep,
        mem_fraction=args.mem_fraction,
    )
    plot_chips = [c for c in chips if args.compute_dtype in c.peak_flops]
    plot = args.out if args.out and plot_chips else None
    report = rep.report_json(
        model,
        chips,
        estimates,
        phase=args.phase,
        context=args.context,
        kv=args.kv,
        group_size=group_size,
        compute_dtype=args.compute_dtype,
        plot=plot,
    )
    _emit(report, rep.report_text(report, chips), args.json)  # the table first, whatever happens next
    if plot is None:
        return 0
    title = rep.report_title(model.name, args.phase, args.context)
    return _write_plot(plot_roofline, plot, plot_chips, estimates, args.compute_dtype, title)


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
    report = rep.sharded_json(model, args.devices, args.context, runs)
    return _emit(report, rep.sharded_text(model.name, runs), args.json)


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
            results.append(
                measure_step(
                    model,
                    chip,
                    batch=b,
                    context=args.context,
                    weights=w,
                    kv=args.kv,
                    min_time_s=args.min_time,
                    progress=True,
                )
            )
    report = rep.measure_json(model, chip, results, context=args.context, kv=args.kv, prices=prices)
    _emit(report, rep.measure_text(report), args.json)  # the table first, whatever happens next
    if not (args.out and results):
        return 0
    last = results[-1].estimate
    title = (
        f"{model.name} on this host, {last.weights} weights, batch {last.batch}, context {args.context} "
        "(measured)"
    )
    return _write_plot(plot_measured, args.out, chip, last, title)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with "(default: X)" added only where it tells something: not for flags, not where
    there is no default (None, '' or an empty list), and not where the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default in ("", [])
        ):
            return action.help
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
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
    rep.add_argument(
        "--out", default="roofline.png", type=writable_path, help="roofline plot path ('' for none)"
    )
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
    mea.add_argument(
        "--out", default="roofline_measured.png", type=writable_path, help="plot path ('' for none)"
    )
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
    """Parse `argv` (default: the command line) and run the subcommand; 2 on bad input, with the reason on
    stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

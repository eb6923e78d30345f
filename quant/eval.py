"""Quantization quality on a real model: all-MiniLM-L6-v2 on real English text (`python -m quant.eval`).

What it measures
----------------
Every one of the model's 36 linear layers is quantized (4 bits by default; group 128 and per-channel) with
each method, calibrated on the activations the float model produces on calibration sentences:

- `rtn`             round to nearest on the min-max grid (`quant.quantize_rtn`)
- `gptq`            GPTQ, `H = 2/n XᵀX` of the layer's calibration inputs (`quant.gptq_quantize`)
- `gptq_act_order`  the same with act-order (`desc_act`)
- `awq`             AWQ with clip search, one scale vector per layer (`quant.awq_quantize`)
- `awq_shared`      the deployable AWQ form: q, k and v share one scale (`quant.awq_quantize_shared`),
                    attention-output's scale is folded into value (`quant.fold_scales_into_linear`);
                    intermediate and output keep their `act_scales` (BERT is post-LN, see `quant.awq`)

On held-out sentences (disjoint from the calibration ones) it reports:

- each layer's output error relative to float, `||X (W_q - W)||_F / ||X W||_F`, with `X` that layer's
  inputs in the float model (bias excluded: it is not quantized), and its mean over the 36 layers, also
  as a ratio to RTN at group 128;
- the cosine similarity of each sentence embedding to the float model's (mean and minimum);
- nearest-neighbour preservation: the fraction of held-out sentences whose most similar other held-out
  sentence (by float embeddings) is still the most similar one with the quantized model.

The text
--------
Real English that ships with Python: docstrings of a fixed list of pure-Python standard-library modules,
read with `ast` (nothing is imported), cut into sentences, filtered to prose (6-40 words, no code), and
de-duplicated. A seeded shuffle splits them into calibration sentences and held-out sentences; the two
sets share no sentence.

Axes: `n` calibration tokens, `K`/`N` a linear's input/output features, `B` sentences, `E` embedding size.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from quant import minilm
from quant.awq import awq_quantize, awq_quantize_shared, fold_scales_into_linear
from quant.format import Int4Weight
from quant.gptq import gptq_quantize, hessian
from quant.rtn import quantize_rtn

METHODS = ("rtn", "gptq", "gptq_act_order", "awq", "awq_shared")
# Pure-Python standard-library modules with plenty of prose in their docstrings. Only their source is read.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.cookies",
    "http.server", "imaplib", "importlib.abc", "importlib.metadata", "inspect", "ipaddress", "json",
    "json.decoder", "json.encoder", "locale", "logging", "logging.handlers", "lzma", "mailbox",
    "mimetypes", "multiprocessing.connection", "multiprocessing.pool", "netrc", "nntplib", "numbers",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
)  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_MARKS = (">>>", "::", "=", "{", "}", "[", "]", "\\", "|", "->", "`", "*", "#", "$", "<", ">", "__")
_MIN_WORDS, _MAX_WORDS = 6, 40


# -- the text ----------------------------------------------------------------------------------------------


def _docstrings(module: str) -> Iterable[str]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not (_MIN_WORDS <= len(words) <= _MAX_WORDS) or not sentence[0].isupper() or sentence[-1] != ".":
        return False
    if any(mark in sentence for mark in _CODE_MARKS):
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters >= 0.8 * sum(not c.isspace() for c in sentence)


def stdlib_sentences(modules: Iterable[str] = STDLIB_MODULES) -> list[str]:
    """Prose sentences from the docstrings of `modules`, unique (case-insensitively), in reading order."""
    seen, out = set(), []
    for module in modules:
        for doc in _docstrings(module):
            for para in re.split(r"\n\s*\n", doc):
                lines = para.splitlines()
                # Indented paragraphs are examples or tables, not prose.
                if any(line.startswith((" ", "\t")) for line in lines):
                    continue
                text = " ".join(line.strip() for line in lines)
                for sentence in _SENTENCE_END.split(text):
                    sentence = sentence.strip()
                    key = sentence.lower()
                    if key not in seen and _is_prose(sentence):
                        seen.add(key)
                        out.append(sentence)
    return out


def split_sentences(sentences: list[str], n_calib: int, n_eval: int, *, seed: int = 0) -> tuple[list, list]:
    """A seeded shuffle of `sentences` into disjoint calibration and held-out lists."""
    if n_calib <= 0 or n_eval <= 1:
        raise ValueError(f"n_calib={n_calib} must be >= 1 and n_eval={n_eval} >= 2 (for nearest neighbours)")
    if n_calib + n_eval > len(sentences):
        raise ValueError(f"n_calib + n_eval = {n_calib + n_eval} exceeds the {len(sentences)} sentences")
    order = np.random.default_rng(seed).permutation(len(sentences))
    picked = [sentences[i] for i in order[: n_calib + n_eval]]
    return picked[:n_calib], picked[n_calib:]


# -- running the model -------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, *, enabled: bool = True, width: int = 30, stream: Any = None):
        self.total, self.done, self.enabled, self.width = max(1, total), 0, enabled, width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def update(self, label: str, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:6.1f}s {label[:40]:<40}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _batches(tokenizer, sentences: list[str], batch: int):
    """Sentences sorted by length and batched (less padding), with each batch's positions in `sentences`."""
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences)]
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        ids, mask = minilm.tokenize(tokenizer, [sentences[j] for j in idx])
        yield idx, ids, mask


def embed(params, tokenizer, sentences: list[str], *, batch: int = 64) -> np.ndarray:
    """Embeddings `[B, E] float32` of `sentences`, in order."""
    out = np.empty((len(sentences), params["word"].shape[1]), np.float32)
    for idx, ids, mask in _batches(tokenizer, sentences, batch):
        out[idx] = np.asarray(minilm.minilm_encode(params, ids, mask))
    return out


def layer_inputs(params, tokenizer, sentences: list[str], *, batch: int = 64) -> tuple[np.ndarray, dict]:
    """Float embeddings `[B, E]` and each site's inputs `{"<layer>.<site>": [n, K] float32}` (real tokens)."""
    emb = np.empty((len(sentences), params["word"].shape[1]), np.float32)
    parts: dict[str, list] = {}
    for idx, ids, mask in _batches(tokenizer, sentences, batch):
        e, inputs = minilm.minilm_encode_with_inputs(params, ids, mask)
        emb[idx] = np.asarray(e)
        keep = mask.reshape(-1) > 0
        for site, x in inputs.items():
            parts.setdefault(site, []).append(np.asarray(x).reshape(-1, x.shape[-1])[keep])
    return emb, {site: np.concatenate(xs) for site, xs in parts.items()}


# -- quantizing the model ----------------------------------------------------------------------------------


def quantize_model(
    params: dict,
    calib: dict[str, np.ndarray],
    method: str,
    *,
    bits: int = 4,
    group_size: int = 128,
    grid: int = 20,
    on_layer: Callable[[str], None] | None = None,
) -> tuple[dict[str, Int4Weight], dict]:
    """Quantize every linear of `params` with `method`, calibrated on `calib` (see `layer_inputs`).

    Returns `(weights, params_q)`: the quantized weights `{name: Int4Weight}` as each layer was quantized
    (for `awq_shared`, before any folding), and the model to run (dequantized weights, folds applied).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    names = minilm.linear_names(params)
    weights: dict[str, Int4Weight] = {}
    hessians: dict[str, Any] = {}

    def done(name):
        if on_layer:
            on_layer(name)

    for name in names:
        if name in weights:
            done(name)
            continue
        w, _ = minilm.get_linear(params, name)
        site = minilm.site_of(name)
        x = calib[site]
        if method == "rtn":
            weights[name] = quantize_rtn(w, bits=bits, group_size=group_size)
        elif method.startswith("gptq"):
            if site not in hessians:
                hessians = {site: hessian(x)}  # q, k and v share theirs; keep one at a time
            weights[name] = gptq_quantize(
                w, hessians[site], bits=bits, group_size=group_size, act_order=method == "gptq_act_order"
            )
        elif method == "awq_shared" and name.endswith(".query"):
            layer = name.split(".")[0]
            trio = [f"{layer}.{role}" for role in ("query", "key", "value")]
            ws = [minilm.get_linear(params, n)[0] for n in trio]
            shared = awq_quantize_shared(ws, x, bits=bits, group_size=group_size, grid=grid)
            weights.update(zip(trio, shared, strict=True))
        else:
            weights[name] = awq_quantize(w, x, bits=bits, group_size=group_size, grid=grid)
        done(name)

    run = dict(weights)
    biases = {name: minilm.get_linear(params, name)[1] for name in names}
    if method == "awq_shared":
        for layer in range(len(params["layers"])):
            v, o = f"{layer}.value", f"{layer}.attn_out"
            run[v], biases[v], (run[o],) = fold_scales_into_linear(run[v], biases[v], [run[o]])
    params_q = minilm.replace_linears(
        params, {name: (np.asarray(qw.dequantize()), biases[name]) for name, qw in run.items()}
    )
    return weights, params_q


def layer_errors(params: dict, weights: dict[str, Int4Weight], held_out: dict[str, np.ndarray]) -> dict:
    """`||X (W_q - W)||_F / ||X W||_F` per linear, `X` its held-out inputs in the float model."""
    out = {}
    for name, qw in weights.items():
        w = np.asarray(minilm.get_linear(params, name)[0], np.float64)
        x = np.asarray(held_out[minilm.site_of(name)], np.float64)
        out[name] = float(
            np.linalg.norm(x @ (np.asarray(qw.dequantize(), np.float64) - w)) / np.linalg.norm(x @ w)
        )
    return out


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row, `[B]` (embeddings are unit norm)."""
    sim = np.asarray(emb, np.float64) @ np.asarray(emb, np.float64).T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def embedding_quality(emb_float: np.ndarray, emb_q: np.ndarray) -> dict[str, float]:
    """Cosine to float (mean, min) and nearest-neighbour preservation among the held-out sentences."""
    a, b = np.asarray(emb_float, np.float64), np.asarray(emb_q, np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    nn = float(np.mean(nearest_neighbours(a) == nearest_neighbours(b)))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "nn_preserved": nn}


def evaluate(
    *,
    n_calib: int = 512,
    n_eval: int = 256,
    methods: Iterable[str] = METHODS,
    group_sizes: Iterable[int] = (128, -1),
    bits: int = 4,
    grid: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole experiment; returns a JSON-ready dict (see `main` for the table it prints)."""
    methods, group_sizes = list(methods), [int(g) for g in group_sizes]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method {m!r} is not one of {METHODS}")
    params = minilm.load_params()
    tokenizer = minilm.load_tokenizer()
    calib_text, eval_text = split_sentences(stdlib_sentences(), n_calib, n_eval, seed=seed)
    names = minilm.linear_names(params)
    bar = Progress(2 + len(methods) * len(group_sizes) * (len(names) + 1), enabled=progress)
    _, calib = layer_inputs(params, tokenizer, calib_text)
    bar.update("calibration activations")
    emb_float, held_out = layer_inputs(params, tokenizer, eval_text)
    bar.update("held-out activations")
    runs = []
    for gs in group_sizes:
        for method in methods:
            label = f"{method} g{gs if gs > 0 else 'K'}"
            t0 = time.perf_counter()
            weights, params_q = quantize_model(
                params, calib, method, bits=bits, group_size=gs, grid=grid,
                on_layer=lambda n, label=label: bar.update(f"{label} {n}"),
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            errs = layer_errors(params, weights, held_out)
            quality = embedding_quality(emb_float, embed(params_q, tokenizer, eval_text))
            bar.update(f"{label} held-out embeddings")
            runs.append(
                {
                    "method": method,
                    "group_size": gs,
                    "layer_error_mean": float(np.mean(list(errs.values()))),
                    **quality,
                    "quantize_seconds": seconds,
                    "layer_errors": errs,
                }
            )
    base = next((r for r in runs if r["method"] == "rtn" and r["group_size"] == 128), None)
    for r in runs:
        r["layer_error_over_rtn_g128"] = r["layer_error_mean"] / base["layer_error_mean"] if base else None
    calib_tokens = int(next(iter(calib.values())).shape[0])
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "bits": bits,
        "grid": grid,
        "seed": seed,
        "n_calib": n_calib,
        "n_eval": n_eval,
        "calib_tokens": calib_tokens,
        "eval_tokens": int(next(iter(held_out.values())).shape[0]),
        "n_linears": len(names),
        "runs": runs,
    }


def format_table(result: dict[str, Any]) -> str:
    """The Markdown table of `result` (one row per method and group size)."""
    lines = [
        f"all-MiniLM-L6-v2, {result['bits']}-bit, {result['n_linears']} linears; calibration "
        f"{result['n_calib']} sentences ({result['calib_tokens']} tokens), held-out {result['n_eval']} "
        f"({result['eval_tokens']} tokens)",
        "",
        "| method | group | mean layer error | / RTN g128 | cosine mean | cosine min | NN preserved |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        ratio = r["layer_error_over_rtn_g128"]
        group = r["group_size"] if r["group_size"] > 0 else "K"
        lines.append(
            f"| {r['method']} | {group} | {r['layer_error_mean']:.4f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | "
            f"{r['nn_preserved']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quant.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", type=int, default=512, help="calibration sentences (default 512)")
    p.add_argument("--eval", type=int, default=256, help="held-out sentences (default 256)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    p.add_argument("--group-sizes", default="128,-1", help="comma-separated group sizes, -1 = per-channel")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--grid", type=int, default=20, help="AWQ's grid of exponents (and clip ratios)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split")
    p.add_argument("--json", action="store_true", help="print the full result (per-layer errors too) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    try:
        result = evaluate(
            n_calib=args.calib,
            n_eval=args.eval,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()],
            group_sizes=[int(g) for g in args.group_sizes.split(",") if g.strip()],
            bits=args.bits,
            grid=args.grid,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

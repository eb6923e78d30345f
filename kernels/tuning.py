"""Tuned kernel configurations: what `python -m benchmarks.accel --tune` found fastest, per (op,
implementation, shape class, device kind), read back by the kernels' default configurations.

Two files hold them, both `{"entries": [Entry, ...]}` as JSON:
- the user's, `tuned.json` in the lab's cache directory ($TOKENLAB_CACHE, else ~/.cache/tokenlab), written by
  `--tune` (or the file `--tune-out` names, which `TOKENLAB_TUNED` points the kernels at);
- the lab's, `kernels/tuned.json` shipped in the package, for chips already tuned.
The user's entry wins over the lab's for the same key. A missing or unreadable file is no entry (a kernel then
keeps its built-in default); an entry whose fields the kernel's Config rejects is a ValueError at that call.

An entry: {"op", "impl", "shape_class", "device_kind", "config": {field: value}, "ms", "date", "jax"}.
`shape_class` is the kernel's own name for a family of shapes that share a best configuration (e.g.
"decode" / "prefill", or a bucket of M); `device_kind` is the device's `device_kind` string
("NVIDIA H100 80GB HBM3"), or the compile-only target's when compiling for one.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax

PACKAGED = pathlib.Path(__file__).with_name("tuned.json")
KEY_FIELDS = ("op", "impl", "shape_class", "device_kind")


def user_file() -> pathlib.Path:
    """Where the user's tuned configurations live: $TOKENLAB_TUNED, else tuned.json in the cache directory."""
    if os.environ.get("TOKENLAB_TUNED"):
        return pathlib.Path(os.environ["TOKENLAB_TUNED"])
    root = os.environ.get("TOKENLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenlab"
    )
    return pathlib.Path(root) / "tuned.json"


def _key(entry: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(entry[f]) for f in KEY_FIELDS)


@functools.cache
def _read(path: str, mtime_ns: int) -> dict[tuple[str, ...], dict[str, Any]]:
    try:
        data = json.loads(pathlib.Path(path).read_text())
        return {_key(e): dict(e["config"]) for e in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _table(path: pathlib.Path) -> dict[tuple[str, ...], dict[str, Any]]:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {}
    return _read(str(path), mtime)


def lookup(op: str, impl: str, shape_class: str, device_kind: str | None) -> dict[str, Any] | None:
    """The tuned Config fields for this key (the user's file first, then the lab's), or None."""
    if not device_kind:
        return None
    key = (op, impl, shape_class, device_kind)
    for path in (user_file(), PACKAGED):
        found = _table(path).get(key)
        if found is not None:
            return dict(found)
    return None


def entry(
    op: str, impl: str, shape_class: str, device_kind: str, config: Mapping[str, Any], ms: float
) -> dict[str, Any]:
    """One record for `write`, dated today and stamped with the running JAX version."""
    return {
        "op": op,
        "impl": impl,
        "shape_class": shape_class,
        "device_kind": device_kind,
        "config": dict(config),
        "ms": float(ms),
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
    }


def write(entries: Iterable[Mapping[str, Any]], path: pathlib.Path | None = None) -> pathlib.Path:
    """Merge `entries` into the file at `path` (default `user_file()`): a new entry replaces the old one with
    the same key. Returns the path written."""
    path = pathlib.Path(path) if path is not None else user_file()
    old: list[dict[str, Any]] = []
    if path.exists():
        try:
            old = list(json.loads(path.read_text())["entries"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}: not a tuned-configuration file ({err}); move it aside or pass another path"
            ) from err
    merged = {_key(e): dict(e) for e in old}
    merged.update({_key(e): dict(e) for e in entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"entries": list(merged.values())}, indent=1, sort_keys=True) + "\n")
    return path

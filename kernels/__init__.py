"""Compute kernels for LLM serving: each a NumPy reference and a jitted JAX implementation."""

__all__: list[str] = []

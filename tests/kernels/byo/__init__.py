"""Backends brought by a user, for the tests of `kernels.registry.register` and `--impl-module`."""

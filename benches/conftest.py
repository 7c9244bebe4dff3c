"""Benchmarks share the tests' fixtures for ../shared/data and the CUDA skip marker."""

from tests.conftest import requires_cuda, shared_data, shared_file  # noqa: F401

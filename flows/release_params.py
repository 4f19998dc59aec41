"""Kept for scripts that import `flows.release_params.ReleaseParams` (the README's Python example,
bench/bench_extraction.py): the model is declared in `storage.params`, which new code imports."""

from storage.params import ReleaseParams

__all__ = ["ReleaseParams"]

"""Helpers for tests: spawn N gloo ranks on a free port, tiny models and reference runs."""

from skipjack.testing.spawn import run_ranks

__all__ = ["run_ranks"]

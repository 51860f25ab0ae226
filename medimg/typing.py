"""Type aliases shared across the library."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]  # progress(done, total): items done of a known total

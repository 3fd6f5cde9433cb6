"""How many CPU threads torch uses (``--threads``): one place for discover, evaluate, baseline,
report, sweep workers and compare-circuits.

Why it matters: on a shared machine or under a scheduler that gives a job fewer cores than the
machine has, torch's default (one thread per core) makes its threads wait for each other; and
results are byte-identical only between runs with the same number of threads (docs/runs.md).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from kcs_lens.errors import ConfigError


def set_threads(n: int | None) -> None:
    """Use ``n`` torch CPU threads in this process (intra-op, and inter-op where torch still allows
    setting it: only before its first parallel work). None leaves torch's defaults."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--threads {n!r}: must be an integer >= 1")
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # torch refuses once inter-op work has started; intra-op is what counts
            pass


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: leave as is), then restore."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)

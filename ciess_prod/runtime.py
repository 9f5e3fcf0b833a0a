"""Process-wide CPU settings that every entry point applies before its first tensor operation."""

from __future__ import annotations

import torch


def configure_cpu() -> bool:
    """Flushes denormal floats to zero (FTZ/DAZ); returns whether the CPU supports it.

    Why: after about 1000 batches some size plans leave values below 1.2e-38 in LightGCN's propagation and in Adam's
    moments, and x86 arithmetic on such denormals is many times slower: a frequency plan's fit on MovieLens-1M went
    from 8 to 40 s per 250 batches on 2 cores (``bench/denormals.py``). Flushing them changes no ranking. Threads take
    the setting only if created after it, so call this before the first parallel op of the process.
    """
    return torch.set_flush_denormal(True)

"""Named random streams: one seed per run, one independent generator per use."""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__: list[str] = []


def make_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator fixed by ``(seed, stream)``; different ``stream`` names give independent draws.

    Each transform of a run draws from its own stream, so changing one setting (say the label-noise rate)
    does not change what another (which examples the subset keeps) selects. ``seed`` must be >= 0.
    """
    entropy = [seed, zlib.crc32(stream.encode("utf-8"))]
    state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state & (2**63 - 1))

"""A seeded ``torch.Generator`` created lazily on the parameters' device, with a checkpointable state."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._foreach import is_sharded
from .._validation import check_int_at_least

__all__: list[str] = []


class LazyGenerator:
    """Private random stream of an optimizer (ESAM masks, SmoothOut noise).

    The generator is created on first use on the device of the tensors it fills (so CUDA noise is drawn on the
    GPU, without a host round trip), seeded with ``seed``. The same seed on every rank gives the same draws
    everywhere. ``state_dict`` carries the seed and the generator state; a checkpoint resumes the stream on a
    device of the same type.
    """

    def __init__(self, seed: int) -> None:
        self.seed = check_int_at_least("seed", seed, 0)
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None  # state loaded before the first draw

    def get(self, device: torch.device) -> torch.Generator:
        generator = self._generator
        if generator is None or generator.device.type != device.type:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            if self._pending is not None:
                try:
                    generator.set_state(self._pending)
                except RuntimeError as error:
                    raise RuntimeError(
                        f"Cannot resume the random stream on {device}: the checkpoint's generator state was saved "
                        f"on another device type ({error})"
                    ) from error
                self._pending = None
            self._generator = generator
        return generator

    def state_dict(self, device: torch.device | None = None) -> dict[str, Any]:
        """``{"seed", "generator"}``. ``device``: where the stream draws (the parameters'); a stream not drawn
        from yet is created there first, as its first draw would create it, so a fresh optimizer's state has
        the shape of a trained one's (DCP loads a checkpoint into the state of a fresh optimizer)."""
        if self._generator is None and self._pending is None and device is not None and device.type != "meta":
            self.get(device)
        state = self._generator.get_state() if self._generator is not None else self._pending
        return {"seed": self.seed, "generator": None if state is None else state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = check_int_at_least("seed", state["seed"], 0)
        saved = state.get("generator")
        self._generator = None
        self._pending = None if saved is None else saved.clone()


def shard_stream(generator: torch.Generator, like: Tensor) -> torch.Generator:
    """The generator that fills this rank's shards of tensors laid out as ``like``: ``generator`` itself for a
    whole tensor; for a ``DTensor`` (FSDP2) a fresh one, so that every shard gets its own numbers.

    Every rank holds the same shared ``generator`` (one state to checkpoint). Drawing a shard's noise from it
    directly would give every shard the *same* numbers (a Gaussian direction with repeated blocks, not
    isotropic). Instead the shard stream is seeded from the shared state (hashed with the rank's coordinates
    along the mesh dimensions that ``like`` is sharded on) and the shared stream moves one draw on, the same
    on every rank: replicas of a shard (HSDP) draw equal numbers, different shards independent ones, and the
    draws are reproducible from the seed. A sharded run's noise is not the one-process run's numbers (those
    would need every rank to draw the whole tensor), only the same distribution."""
    if not is_sharded(like):
        return generator
    coordinates = like.device_mesh.get_coordinate() or []
    shard = [c for c, placement in zip(coordinates, like.placements, strict=False) if placement.is_shard()]
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8)
    digest.update(repr(shard).encode())
    # the shared stream moves on by one draw on every rank (no host read: it stays on the generator's device)
    torch.empty((), dtype=torch.int64, device=generator.device).random_(generator=generator)
    stream = torch.Generator(device=generator.device)
    stream.manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
    return stream


def draw_device(optimizer: torch.optim.Optimizer) -> torch.device | None:
    """The device of the optimizer's first parameter, where its streams draw (None without parameters)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return None


class GeneratorCheckpoint:
    """Mixin for an optimizer drawing from ``self._rng`` (a :class:`LazyGenerator`): checkpoints the stream.

    The wrapper's entry (``state_dict()["param_groups"][0]["sharpness"]``) holds ``{"generator": ...}`` under
    ``_rng_key``; loading a state without it (saved by another optimizer) raises a ValueError. List it before
    the engine in the bases, e.g. ``class ESAM(GeneratorCheckpoint, SharpnessAwareOptimizer)``.
    """

    _rng: LazyGenerator
    _rng_key: ClassVar[str]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        state["sharpness"][self._rng_key] = {"generator": self._rng.state_dict(draw_device(self))}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        extra = state_dict["sharpness"].get(self._rng_key)
        if extra is None:
            raise ValueError(f"This state_dict has no {type(self).__name__} entry (saved by another optimizer); "
                             "cannot resume the random stream")
        self._rng.load_state_dict(extra["generator"])

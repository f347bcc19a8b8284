"""Where a stage's particle images come from: the :class:`ParticleSource` protocol and an in-memory source.

A stage reads particles by index or streams them in batches, and never sees where they are stored: a
:class:`cryostack.io.particles.ParticleStackReader` (object store), :class:`ArrayParticles` (memory) or a
benchmark's file reader all serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

# Particles per batch when the caller names no batch size.
DEFAULT_BATCH_SIZE = 1000


class ParticleSource(Protocol):
    """Where particle images come from (a :class:`cryostack.io.particles.ParticleStackReader` is one)."""

    box_px: int

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray: ...

    def iter_batches(
        self, indices: np.ndarray | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class ArrayParticles:
    """Particle images held in memory (N, D, D) float32, as a :class:`ParticleSource`."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = np.asarray(images, dtype=np.float32)  # (N, D, D)
        self.box_px = int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images at ``indices``: (B, D, D) float32."""
        return self.images[np.asarray(indices)]

    def iter_batches(
        self, indices: np.ndarray | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices (B,), images (B, D, D)) over ``indices`` (default all), ``batch_size`` at a time."""
        selected = np.arange(len(self)) if indices is None else np.asarray(indices)
        size = batch_size or DEFAULT_BATCH_SIZE
        for start in range(0, selected.size, size):
            chunk = selected[start : start + size]
            yield chunk, self.images[chunk]

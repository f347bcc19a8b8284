"""What the stage benchmarks share: simulated particle stacks cached on disk and streamed back, their CTF, memory.

A stack is simulated once into ``<cache>/<name>.npy`` (N, D, D) float32 and read back with plain file reads, as a
job streams particles from the store: only the images of the current batch are resident (a memory map would keep
every page it touched in the process's RSS, and the benchmarks report peak RSS).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Images read per batch when a whole stack is streamed.
READ_BATCH = 2048


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cached_stack(path: Path, simulator: Any) -> Path:
    """``path``, holding the simulator's images (N, D, D) float32 as ``.npy``; simulated on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        box = simulator.params.box_px
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                           shape=(simulator.params.n_particles, box, box))
        for batch in simulator.batches(READ_BATCH):
            images[batch.start : batch.start + len(batch.images)] = batch.images
        images.flush()
        del images
        partial.rename(path)
    return path


def ctf_of(simulator: Any) -> Any:
    """The ground-truth CTF parameters of a simulated set (what its particles.star carries)."""
    from cryostack.core.ctf import CtfParameters  # noqa: PLC0415

    truth, params = simulator.ground_truth, simulator.params
    n = len(truth)
    return CtfParameters(
        defocus_u_a=truth.defocus_u_a, defocus_v_a=truth.defocus_v_a, defocus_angle_deg=truth.defocus_angle_deg,
        voltage_kv=np.full(n, params.voltage_kv), cs_mm=np.full(n, params.cs_mm),
        amplitude_contrast=np.full(n, params.amplitude_contrast), phase_shift_deg=np.zeros(n), bfactor_a2=np.zeros(n),
    )


class StackFile:
    """A cached ``.npy`` stack (N, D, D) float32 read with plain file reads, as a classifier's ``ParticleSource``."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(handle)
            self._offset = handle.tell()
        self._descriptor = os.open(path, os.O_RDONLY)
        self._count, self.box_px = int(shape[0]), int(shape[-1])
        self._image_bytes = self.box_px * self.box_px * 4

    def __len__(self) -> int:
        return self._count

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images at ``indices`` (B,): (B, D, D) float32, each run of consecutive indices read at once."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((indices.size, self.box_px, self.box_px), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, indices.size], strict=True):
            data = os.pread(self._descriptor, int(last - first) * self._image_bytes,
                            self._offset + int(indices[first]) * self._image_bytes)
            out[first:last] = np.frombuffer(data, dtype=np.float32).reshape(-1, self.box_px, self.box_px)
        return out

    def iter_batches(
        self, indices: np.ndarray | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices (B,), images (B, D, D)) over ``indices`` (default all), ``batch_size`` at a time."""
        selected = np.arange(self._count) if indices is None else np.asarray(indices)
        size = batch_size or READ_BATCH
        for start in range(0, selected.size, size):
            chunk = selected[start : start + size]
            yield chunk, self.read(chunk)

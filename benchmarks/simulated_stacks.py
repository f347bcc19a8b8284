"""What the stage benchmarks share: simulated particle stacks cached on disk and streamed back, their CTF, memory.

A stack is simulated once into ``<cache>/<name>.npy`` (N, D, D) float32 and read back with plain file reads, as a
job streams particles from the store: only the images of the current batch are resident (a memory map would keep
every page it touched in the process's RSS, and the benchmarks report peak RSS).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# Images read per batch when a whole stack is streamed.
READ_BATCH = 2048


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_pool_mb(xp: Any) -> float | None:
    """MiB the GPU memory pool holds (it keeps what it allocated, so at the end of a run ~ its peak); None on CPU."""
    if xp is np:
        return None
    return xp.get_default_memory_pool().total_bytes() / 2**20


def synchronise(xp: Any) -> None:
    """Wait for queued GPU work so timings cover it (no-op on CPU)."""
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def sgemm_gflops(xp: Any, size: int = 2048, repeats: int = 5) -> float:
    """Best float32 square matrix-product rate on the device of ``xp``, GFLOP/s: the machine's nominal ceiling."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((size, size), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((size, size), dtype=np.float32))
    a @ b
    synchronise(xp)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronise(xp)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def cached_stack(path: Path, simulator: Any) -> Path:
    """``path``, holding the simulator's images (N, D, D) float32 as ``.npy``; simulated on first use.

    The images are simulated in chunks of ``READ_BATCH`` by one forked process per core: each particle's image
    depends only on its index (seeded noise), so the stack is the same however it is split.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        box, n = simulator.params.box_px, simulator.params.n_particles
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, box, box)).flush()
        chunks = [(partial, start, min(start + READ_BATCH, n)) for start in range(0, n, READ_BATCH)]
        global _SIMULATOR
        _SIMULATOR = simulator
        workers = min(len(chunks), os.cpu_count() or 1)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_simulate_chunk, chunks))
        _SIMULATOR = None
        partial.rename(path)
    return path


# The simulator of the stack being written, inherited by the forked workers of :func:`cached_stack`.
_SIMULATOR: Any = None


def _simulate_chunk(chunk: tuple[Path, int, int]) -> None:
    path, start, stop = chunk
    images = np.load(path, mmap_mode="r+")
    images[start:stop] = _SIMULATOR.images(start, stop)
    images.flush()


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
    """A cached ``.npy`` stack (N, D, D) float32 read with plain file reads, as a
    :class:`cryostack.core.sources.ParticleSource`."""

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

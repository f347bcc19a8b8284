"""Projection and back-projection throughput (images/s) of the Fourier-slice projector at box 64 and 128.

Measures, per box: building a Projector (pad 2x, gridding correction, one 3D FFT), projecting full D×D slices,
projecting a coefficient subset (the disc inside 0.5·Nyquist, as the scoring kernel asks for), inserting slices
with weights into the Fourier accumulators, the adjoint back-projection to a real volume, and a Reconstructor's
insertion of CTF-weighted images (with its half-shell resampling near the origin). Each timing
is the best of ``--repeats`` runs. Results go to ``benchmarks/results/projection.json`` with the machine's facts.

    uv run python benchmarks/bench_projection.py [--boxes 64 128] [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy

from cryostack.core.backend import default_xp, describe_backend, fft_workers, to_device
from cryostack.core.fourier import resolution_mask
from cryostack.core.geometry import uniform_random_rotations
from cryostack.core.projection import FourierAccumulator, Projector, backproject
from cryostack.core.reconstruction import Reconstructor
from simulated_stacks import synchronise

RESULTS = Path(__file__).resolve().parent / "results" / "projection.json"


def _best_seconds(run: Callable[[], Any], repeats: int, xp: Any) -> float:
    """Shortest wall time of ``repeats`` calls of ``run``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronise(xp)
        best = min(best, time.perf_counter() - start)
    return best


def bench_box(box: int, n_images: int, repeats: int, xp: Any) -> dict[str, Any]:
    """Throughput figures for one box size."""
    rng = np.random.default_rng(box)
    volume = to_device(rng.standard_normal((box, box, box)).astype(np.float32), xp)
    rotations = to_device(uniform_random_rotations(n_images, rng), xp)
    subset = resolution_mask(box, 1.0, 4.0, xp=xp)  # |k| <= D/4: half of Nyquist
    projector = Projector(volume)
    build_s = _best_seconds(lambda: Projector(volume), repeats, xp)
    project_s = _best_seconds(lambda: projector.project(rotations), repeats, xp)
    subset_s = _best_seconds(lambda: projector.project(rotations, coefficients=subset), repeats, xp)
    slices = projector.project(rotations)
    weights = xp.ones(slices.shape, dtype=np.float32)

    def insert() -> None:
        FourierAccumulator(box, xp=xp).insert(slices, rotations, weights)

    insert_s = _best_seconds(insert, repeats, xp)
    backproject_s = _best_seconds(lambda: backproject(slices, rotations), repeats, xp)
    ctf = xp.asarray(rng.uniform(-1, 1, slices.shape).astype(np.float32))

    def reconstructor_insert() -> None:
        Reconstructor(box, xp=xp).insert(slices, rotations, ctf=ctf)

    reconstructor_s = _best_seconds(reconstructor_insert, repeats, xp)
    return {
        "box_px": box,
        "images": n_images,
        "subset_coefficients": int(subset.sum()),
        "projector_build_s": build_s,
        "project_images_per_s": n_images / project_s,
        "project_subset_images_per_s": n_images / subset_s,
        "insert_with_weights_images_per_s": n_images / insert_s,
        "backproject_images_per_s": n_images / backproject_s,
        "reconstructor_insert_with_ctf_images_per_s": n_images / reconstructor_s,
    }


def main() -> None:
    """Run the benchmark and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    xp = default_xp()
    report = {
        "benchmark": "projection",
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": fft_workers(),
            "load_average_1min": os.getloadavg()[0],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            **describe_backend(),
        },
        "results": [bench_box(box, args.images, args.repeats, xp) for box in args.boxes],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

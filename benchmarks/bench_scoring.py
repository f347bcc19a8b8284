"""Scoring-kernel throughput next to the machine's own SGEMM throughput, measured in the same run.

For realistic sizes (box 64 and 128 at 3 Å/px, box 128 at 1.5 Å/px; resolution limits 20 Å and 8 Å; a few thousand
templates; with and without a local shift grid) it times the force-max and the marginalised top-k scoring and
counts the useful flops of the kernel's two GEMMs (:func:`cryostack.core.scoring.scoring_flops`). The reference is
a plain float32 matmul of the cross-term GEMM's own shape, ``(N·S, 2C) @ (2C, M)``, timed in alternation with the
kernel (so both see the same machine load; best of ``--repeats``); the ratio kernel / SGEMM is the figure (target
≥ 0.5). Coefficients are the half-plane of the centred transform inside the resolution limit (what a caller
passes for real images). Templates are laid out once per configuration (:func:`prepare_templates`, timed apart),
as a stage does once per iteration. Results go to ``benchmarks/results/scoring.json`` with the machine's facts:
thread pools (threadpoolctl), BLAS environment variables, library versions, load average.

    uv run python benchmarks/bench_scoring.py [--repeats 3] [--quick]
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

from cryostack.core.backend import default_xp, describe_backend, to_device
from cryostack.core.fourier import centered_frequency_indices, resolution_mask
from cryostack.core.poses import shift_grid_px
from cryostack.core.scoring import prepare_templates, score_force_max, score_top_k, scoring_flops, shift_phase_ramps
from simulated_stacks import sgemm_gflops, synchronise

RESULTS = Path(__file__).resolve().parent / "results" / "scoring.json"
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# (box_px, pixel_size_a, resolution_a, n_particles, n_templates, with_shifts)
CONFIGS = [
    (64, 3.0, 20.0, 1000, 4000, False),
    (64, 3.0, 20.0, 200, 4000, True),
    (64, 3.0, 8.0, 1000, 4000, False),
    (64, 3.0, 8.0, 200, 4000, True),
    (128, 3.0, 20.0, 1000, 4000, False),
    (128, 3.0, 20.0, 200, 4000, True),
    (128, 3.0, 8.0, 500, 2000, False),
    (128, 3.0, 8.0, 100, 2000, True),
    (128, 1.5, 20.0, 1000, 4000, False),
    (128, 1.5, 8.0, 1000, 4000, False),
    (128, 1.5, 8.0, 200, 4000, True),
]
QUICK_CONFIGS = [CONFIGS[0], CONFIGS[3], CONFIGS[6]]


def _seconds(run: Callable[[], Any], xp: Any) -> float:
    start = time.perf_counter()
    run()
    synchronise(xp)
    return time.perf_counter() - start


def _half_plane_coefficients(box: int, pixel_size_a: float, resolution_a: float, xp: Any) -> Any:
    """Boolean (D, D) mask: inside the resolution limit, one of each Friedel pair (ky > 0, or ky = 0 and kx >= 0)."""
    k = centered_frequency_indices(box, np)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    half = (ky > 0) | ((ky == 0) & (kx >= 0))
    return to_device(np.asarray(resolution_mask(box, pixel_size_a, resolution_a)) & half, xp)


def bench_config(
    box: int,
    pixel_size_a: float,
    resolution_a: float,
    n_particles: int,
    n_templates: int,
    with_shifts: bool,
    repeats: int,
    xp: Any,
) -> dict[str, Any]:
    """Kernel and SGEMM figures for one configuration."""
    rng = np.random.default_rng(box + n_templates)
    mask = _half_plane_coefficients(box, pixel_size_a, resolution_a, xp)
    n_coeffs = int(mask.sum())
    shifts = shift_grid_px(resolution_a, pixel_size_a) if with_shifts else None  # (S, 2): local grid, 3 steps
    n_shifts = 1 if shifts is None else shifts.shape[0]

    def complex_normal(shape: tuple[int, int]) -> Any:
        return to_device((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64), xp)

    particles = complex_normal((n_particles, n_coeffs))
    templates = complex_normal((n_templates, n_coeffs))
    ctf = to_device(rng.uniform(-1.0, 1.0, (n_particles, n_coeffs)).astype(np.float32), xp)
    noise_var = to_device(rng.uniform(0.5, 2.0, n_coeffs).astype(np.float32), xp)
    ramps = None if shifts is None else shift_phase_ramps(to_device(shifts, xp), box, mask)
    prepared = prepare_templates(templates)
    prepare_s = min(_seconds(lambda: prepare_templates(templates), xp) for _ in range(repeats))
    kwargs = dict(ctf=ctf, noise_var=noise_var, shift_ramps=ramps)

    rows = n_particles * n_shifts
    a = to_device(rng.standard_normal((rows, 2 * n_coeffs)).astype(np.float32), xp)
    b = to_device(rng.standard_normal((n_templates, 2 * n_coeffs)).astype(np.float32), xp)
    sgemm_flops = 2 * rows * (2 * n_coeffs) * n_templates
    flops = scoring_flops(n_particles, n_templates, n_coeffs, n_shifts)

    runs = {
        "sgemm": lambda: a @ b.T,
        "force_max": lambda: score_force_max(particles, prepared, **kwargs),
        "top_k": lambda: score_top_k(particles, prepared, 10, **kwargs),
    }
    for run in runs.values():  # warm-up: thread pools, allocator, FFT plans
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():  # alternate, so load from other processes hits all alike
            best[name] = min(best[name], _seconds(run, xp))
    sgemm_gflops = sgemm_flops / best["sgemm"] / 1e9
    result: dict[str, Any] = {
        "box_px": box,
        "pixel_size_a": pixel_size_a,
        "resolution_a": resolution_a,
        "coefficients": n_coeffs,
        "particles": n_particles,
        "templates": n_templates,
        "shifts": n_shifts,
        "useful_gflop": flops / 1e9,
        "sgemm_shape": [rows, 2 * n_coeffs, n_templates],
        "sgemm_gflops": sgemm_gflops,
        "prepare_templates_s": prepare_s,
    }
    for mode in ("force_max", "top_k"):
        gflops = flops / best[mode] / 1e9
        result[mode] = {
            "seconds": best[mode],
            "gflops": gflops,
            "ratio_to_sgemm": gflops / sgemm_gflops,
            "particles_per_s": n_particles / best[mode],
        }
    return result


def machine_facts() -> dict[str, Any]:
    """Library versions, thread pools, BLAS environment and load: what the figures depend on."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas_env": {name: os.environ.get(name) for name in BLAS_ENV},
        **describe_backend(),
    }
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415

        facts["threadpools"] = threadpool_info()
    except ImportError:
        facts["threadpools"] = "threadpoolctl not installed"
    return facts


def main() -> None:
    """Run every configuration and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    args = parser.parse_args()
    xp = default_xp()
    report: dict[str, Any] = {
        "benchmark": "scoring",
        "machine": machine_facts(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "square_sgemm_2048_gflops": sgemm_gflops(xp, 2048, args.repeats),
        "configs": [],
    }
    for config in QUICK_CONFIGS if args.quick else CONFIGS:
        result = bench_config(*config, repeats=args.repeats, xp=xp)
        report["configs"].append(result)
        print(
            f"box {result['box_px']} @ {result['pixel_size_a']} Å/px, {result['resolution_a']} Å: "
            f"C={result['coefficients']} N={result['particles']} M={result['templates']} S={result['shifts']}: "
            f"SGEMM {result['sgemm_gflops']:.1f} GFLOP/s, force-max {result['force_max']['gflops']:.1f} "
            f"({result['force_max']['ratio_to_sgemm']:.2f}), top-k {result['top_k']['gflops']:.1f} "
            f"({result['top_k']['ratio_to_sgemm']:.2f})",
            flush=True,
        )
    report["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    ratios = [c[mode]["ratio_to_sgemm"] for c in report["configs"] for mode in ("force_max", "top_k")]
    report["summary"] = {"min_ratio": min(ratios), "median_ratio": float(np.median(ratios)), "target_ratio": 0.5}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

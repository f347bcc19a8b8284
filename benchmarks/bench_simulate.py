"""Benchmark of the particle simulator: wall time, particles/s and peak RSS of writing a dataset to a folder.

Usage: ``uv run python benchmarks/bench_simulate.py [--scenario floppy] [--particles 20000] [--box 64]``; writes
``benchmarks/results/simulate.json``. Peak memory should depend on the box and the projector cache, not on the
particle count (apart from the ground-truth tables, about 100 bytes per particle).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

from cryostack.core.backend import describe_backend, fft_workers
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    """Simulate one dataset into a temporary folder and record the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="floppy")
    parser.add_argument("--particles", type=int, default=20_000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel-size", type=float, default=3.0)
    args = parser.parse_args()
    params = SimulationParameters(n_particles=args.particles, box_px=args.box, pixel_size_a=args.pixel_size, seed=0)
    started = time.perf_counter()
    simulator = ParticleSimulator(scenario(args.scenario), params)
    with tempfile.TemporaryDirectory(prefix="cryostack-simulate-bench-") as folder:
        write_simulated_dataset(simulator, folder)
    wall_s = time.perf_counter() - started
    result = {
        "benchmark": "simulate",
        "scenario": args.scenario,
        "n_particles": args.particles,
        "box_px": args.box,
        "rendered_conformations": len(simulator.conformations),
        "wall_s": round(wall_s, 3),
        "particles_per_s": round(args.particles / wall_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_threads": fft_workers(),
        "machine": platform.processor() or platform.machine(),
        **describe_backend(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

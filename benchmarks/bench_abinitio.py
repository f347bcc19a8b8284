"""Ab-initio reconstruction on simulated data (box 64, 3 Å/px, SNR 0.1, CTF): quality against ground truth, speed
and memory, and ASPIRE-Python's common-lines ab-initio on the same particles.

Cases (each in its own process, so its peak RSS is its own; particle images are simulated once into a cache and
read back in batches, as a job streams them from the store):

- ``k1``: K = 1 on a single-conformation set (``--particles``, 10k) with each of ``--seeds`` (three): FSC against
  the true map after rigid alignment with a hand check (0.5-threshold resolution, which hand, correlation).
- ``k1_matched``: K = 1, first seed, with ``--matched-iterations`` (fewer), for a wall time comparable to ASPIRE's.
- ``k3``: K = 3 on the ``three-state`` scenario: ARI against the true state, and per class × state the FSC-0.5
  resolution and correlation after alignment (each class should match its own state best).
- ``k6``: K = 6 on the ``three-state`` scenario: the same figures (six classes for three states).
- ``large``: K = 1, 3 and 6 on ``--large-particles`` (100k) of the ``three-state`` scenario with the iteration
  counts ``--large-iterations`` (fewer than the defaults, said in the record): wall time and peak RSS.
- ``concurrent``: K = 1, 3 and 6 on the ``three-state`` set at the same time in one process, as the service runs
  them (each job reads its own copy of the particles; BLAS threads shared by
  :class:`cryostack.services.abinitio.servicer.BlasShare`): wall time of the three together, of each, peak RSS.
- ``aspire``: ASPIRE-Python's ab-initio pipeline on the same phase-flipped particles as ``k1``, downsampled to
  ``--aspire-downsample`` px: class averaging (``DefaultClassAvgSource``), common-lines orientation estimation
  (``CLSyncVoting``) of the ``--aspire-classes``
  selected averages, mean estimation (``MeanEstimator``) from them; time and the same FSC metrics.

Runs use the process's backend (``CRYOSTACK_BACKEND``; the GPU when CuPy finds one), named in each record.
Every cryostack record has: wall time (reading + iterations + final pass, and each part), peak RSS, iterations
and minibatch schedule, the final half-set resolutions, and the parameters.

    uv run python benchmarks/bench_abinitio.py [--cases k1 k1_matched k3 k6 concurrent aspire large] [--particles 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from simulated_stacks import StackFile, cached_stack, ctf_of, gpu_pool_mb, peak_rss_mb

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "abinitio.json"
CACHE = Path(os.environ.get("CRYOSTACK_BENCH_CACHE", "/tmp/cryostack-bench-abinitio"))
BOX_PX = 64
PIXEL_SIZE_A = 3.0
SNR = 0.1
DATA_SEED = 0


def scenario_of(name: str) -> Any:
    """A simulator scenario: ``single`` (one rigid conformation) or one of the core's named scenarios."""
    from cryostack.core.simulate import ConformationState, Scenario, scenario  # noqa: PLC0415

    if name == "single":
        return Scenario(name="single", states=(ConformationState("closed", 1.0, True, (0.0, 0.0)),))
    return scenario(name)


def simulator_of(name: str, n_particles: int) -> Any:
    """The simulator of a benchmark dataset."""
    from cryostack.core.simulate import ParticleSimulator, SimulationParameters  # noqa: PLC0415

    params = SimulationParameters(n_particles=n_particles, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, snr=SNR,
                                  seed=DATA_SEED)
    return ParticleSimulator(scenario_of(name), params)


def stack_path(name: str, n_particles: int) -> Path:
    """The cached image stack of a dataset, simulated on first use: a ``.npy`` of (N, D, D) float32."""
    return cached_stack(CACHE / f"{name}_{n_particles}_{BOX_PX}_{DATA_SEED}.npy", simulator_of(name, n_particles))


def true_maps(simulator: Any) -> dict[str, np.ndarray]:
    """The ground-truth map of each discrete state, by label."""
    return {state.label: simulator.source.volume(state.hinge_range_deg[0], domain_present=state.domain_present)
            for state in simulator.scenario.states}


def map_metrics(volume: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """FSC against a reference after rigid alignment (either hand): 0.5 resolution, hand, correlation, curve."""
    from cryostack.core.metrics import compare_to_reference  # noqa: PLC0415

    comparison = compare_to_reference(volume, reference, PIXEL_SIZE_A)
    return {
        "fsc_0.5_resolution_a": comparison.resolution_a,
        "hand": "mirrored" if comparison.alignment.flipped else "same",
        "correlation": comparison.alignment.correlation,
        "fsc": [round(float(v), 4) for v in comparison.fsc],
    }


def run_cryostack(spec: dict[str, Any]) -> dict[str, Any]:
    """One ab-initio run in this process: timings, memory and quality against the truth."""
    from cryostack.core.backend import default_xp, describe_backend  # noqa: PLC0415
    from cryostack.core.metrics import adjusted_rand_index  # noqa: PLC0415
    from cryostack.core.spectra import SpectralLayout, collect_spectra  # noqa: PLC0415
    from cryostack.services.abinitio.algorithm import AbinitioRun  # noqa: PLC0415
    from cryostack.services.abinitio.parameters import AbinitioParameters  # noqa: PLC0415

    name, n_particles, k = spec["scenario"], spec["particles"], spec["classes"]
    path = stack_path(name, n_particles)
    simulator = simulator_of(name, n_particles)
    params = AbinitioParameters(class_count=k, initial_iterations=spec["initial_iterations"],
                                final_iterations=spec["final_iterations"])
    start = time.perf_counter()
    layout = SpectralLayout.for_resolution(BOX_PX, PIXEL_SIZE_A, params.max_resolution_a)
    spectra = collect_spectra(StackFile(path).iter_batches(), n_particles, ctf_of(simulator), layout, default_xp())
    read_s = time.perf_counter() - start
    run = AbinitioRun(spectra, params, spec["seed"])
    trace = []
    while not run.done:
        report = run.step()
        if report.iteration % 25 == 0 or run.done:
            trace.append({"iteration": report.iteration, "resolution_a": round(report.resolution_a, 2),
                          "class_fractions": [round(float(f), 3) for f in report.class_fractions],
                          "objective": round(report.objective, 5), "elapsed_s": round(time.perf_counter() - start, 1)})
            print(json.dumps(trace[-1]), file=sys.stderr, flush=True)
    iterations_s = time.perf_counter() - start - read_s
    result = run.finish()
    wall = time.perf_counter() - start
    record: dict[str, Any] = {
        **spec,
        **describe_backend(),
        "wall_s": wall, "read_s": read_s, "iterations_s": iterations_s, "final_pass_s": wall - read_s - iterations_s,
        "peak_rss_mb": peak_rss_mb(), "gpu_pool_mb": gpu_pool_mb(default_xp()), "working_box_px": layout.working_box_px,
        "coefficients_per_particle": layout.n_coefficients, "class_sizes": result.class_sizes.tolist(),
        "half_map_resolution_a": [float(r) for r in result.resolution_a], "trace": trace,
    }
    if not spec.get("quality", True):
        return record
    maps = true_maps(simulator)
    if k == 1 and len(maps) == 1:
        record["vs_truth"] = map_metrics(result.volumes[0], next(iter(maps.values())))
        return record
    record["ari"] = adjusted_rand_index(simulator.ground_truth.state, result.best_class)
    record["class_vs_state"] = {
        f"class_{c + 1}": {label: {key: value for key, value in map_metrics(result.volumes[c], truth).items()
                                   if key != "fsc"} for label, truth in maps.items()}
        for c in range(k)
    }
    record["states"] = list(maps)
    return record


def run_concurrent(spec: dict[str, Any]) -> dict[str, Any]:
    """K = 1, 3 and 6 jobs at once, each on its own thread with its own copy of the particles."""
    import threading  # noqa: PLC0415

    from cryostack.core.backend import default_xp  # noqa: PLC0415
    from cryostack.core.metrics import adjusted_rand_index  # noqa: PLC0415
    from cryostack.core.spectra import SpectralLayout, collect_spectra  # noqa: PLC0415
    from cryostack.services.abinitio.algorithm import AbinitioRun  # noqa: PLC0415
    from cryostack.services.abinitio.parameters import AbinitioParameters  # noqa: PLC0415
    from cryostack.services.abinitio.servicer import BlasShare  # noqa: PLC0415

    name, n_particles = spec["scenario"], spec["particles"]
    path = stack_path(name, n_particles)
    simulator = simulator_of(name, n_particles)
    share = BlasShare()
    jobs: dict[int, dict[str, Any]] = {}

    def job(k: int) -> None:
        with share.job():
            begin = time.perf_counter()
            params = AbinitioParameters(class_count=k, initial_iterations=spec["initial_iterations"],
                                        final_iterations=spec["final_iterations"])
            layout = SpectralLayout.for_resolution(BOX_PX, PIXEL_SIZE_A, params.max_resolution_a)
            spectra = collect_spectra(StackFile(path).iter_batches(), n_particles, ctf_of(simulator), layout,
                                      default_xp())
            run = AbinitioRun(spectra, params, spec["seed"])
            while not run.done:
                run.step()
            result = run.finish()
            jobs[k] = {"wall_s": time.perf_counter() - begin, "class_sizes": result.class_sizes.tolist(),
                       "ari": adjusted_rand_index(simulator.ground_truth.state, result.best_class)}
            print(json.dumps({"classes": k, **jobs[k]}), file=sys.stderr, flush=True)

    start = time.perf_counter()
    threads = [threading.Thread(target=job, args=(k,)) for k in spec["class_counts"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {**spec, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "jobs": {f"k{k}": jobs.get(k, {"failed": True}) for k in spec["class_counts"]}}


def run_aspire(spec: dict[str, Any]) -> dict[str, Any]:
    """ASPIRE's ab-initio pipeline on the same (phase-flipped) particles: time and FSC against the truth.

    The pipeline of ASPIRE's own ab-initio example: downsample, class averages (``DefaultClassAvgSource``), the
    selected averages' orientations by common lines (``CLSyncVoting``), then mean estimation from them.
    """
    os.chdir(tempfile.mkdtemp(prefix="aspire-"))  # ASPIRE writes logs and checkpoints into the working directory
    import aspire  # noqa: PLC0415
    from aspire.abinitio import CLSyncVoting  # noqa: PLC0415
    from aspire.classification import NeighborVarianceClassSelector  # noqa: PLC0415
    from aspire.denoising import DefaultClassAvgSource  # noqa: PLC0415
    from aspire.reconstruction import MeanEstimator  # noqa: PLC0415
    from aspire.source import ArrayImageSource, OrientedSource  # noqa: PLC0415

    from cryostack.core.ctf import ctf_2d  # noqa: PLC0415
    from cryostack.core.fourier import fft2_centered, fft3_centered, ifft2_centered, ifft3_centered  # noqa: PLC0415

    name, n_particles, box = spec["scenario"], spec["particles"], spec["downsample_px"]
    path = stack_path(name, n_particles)
    simulator = simulator_of(name, n_particles)
    truth, params = simulator.ground_truth, simulator.params
    start = time.perf_counter()
    flipped = np.empty((n_particles, BOX_PX, BOX_PX), dtype=np.float32)
    for rows, images in StackFile(path).iter_batches():
        ctf = ctf_2d(BOX_PX, PIXEL_SIZE_A, truth.defocus_u_a[rows], truth.defocus_v_a[rows],
                     truth.defocus_angle_deg[rows], params.voltage_kv, params.cs_mm, params.amplitude_contrast)
        flipped[rows] = ifft2_centered(fft2_centered(images) * np.sign(ctf)).real
    source = ArrayImageSource(flipped, pixel_size=PIXEL_SIZE_A).downsample(box)
    averages = DefaultClassAvgSource(source, n_nbor=spec["neighbours"], class_selector=NeighborVarianceClassSelector())
    selected = averages[: spec["aspire_classes"]]
    selected.images[:]  # the class averages are computed lazily: time them here
    class_averaging_s = time.perf_counter() - start
    oriented = OrientedSource(selected, CLSyncVoting(selected, n_theta=spec["n_theta"]))
    small = MeanEstimator(oriented, checkpoint_iterations=None).estimate().asnumpy()[0].astype(np.float32)
    wall = time.perf_counter() - start
    # Back to the particles' box by Fourier padding (the downsampled map has the same physical extent).
    padded = np.zeros((BOX_PX,) * 3, dtype=np.complex64)
    first = BOX_PX // 2 - box // 2
    padded[first : first + box, first : first + box, first : first + box] = fft3_centered(small)
    volume = np.asarray(ifft3_centered(padded).real, dtype=np.float32)
    return {
        **spec, "aspire_version": aspire.__version__, "wall_s": wall, "class_averaging_s": class_averaging_s,
        "common_lines_and_mean_s": wall - class_averaging_s, "peak_rss_mb": peak_rss_mb(),
        "vs_truth": map_metrics(volume, next(iter(true_maps(simulator).values()))),
    }


def child(args: argparse.Namespace) -> None:
    """Run one case in this process and print its JSON record."""
    spec = json.loads(args.child)
    runners = {"aspire": run_aspire, "concurrent": run_concurrent, "cryostack": run_cryostack}
    record = runners[spec["kind"]](spec)
    record["load_average_end"] = os.getloadavg()
    print("RESULT " + json.dumps(record))


def specs_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs the requested cases consist of."""
    iterations = {"initial_iterations": args.initial_iterations, "final_iterations": args.final_iterations}
    specs: list[dict[str, Any]] = []
    if "k1" in args.cases:
        specs += [{"kind": "cryostack", "label": f"k1_seed{seed}", "scenario": "single", "particles": args.particles,
                   "classes": 1, "seed": seed, **iterations} for seed in args.seeds]
    if "k1_matched" in args.cases:
        initial, final = args.matched_iterations
        specs.append({"kind": "cryostack", "label": "k1_matched", "scenario": "single", "particles": args.particles,
                      "classes": 1, "seed": args.seeds[0], "initial_iterations": initial, "final_iterations": final,
                      "note": "fewer iterations, for a wall time comparable to ASPIRE's"})
    for k, case in ((3, "k3"), (6, "k6")):
        if case in args.cases:
            specs.append({"kind": "cryostack", "label": case, "scenario": "three-state", "particles": args.particles,
                          "classes": k, "seed": args.seeds[0], **iterations})
    if "concurrent" in args.cases:
        specs.append({"kind": "concurrent", "label": "concurrent", "scenario": "three-state",
                      "particles": args.particles, "class_counts": [1, 3, 6], "seed": args.seeds[0], **iterations})
    if "aspire" in args.cases:
        specs.append({"kind": "aspire", "label": "aspire", "scenario": "single", "particles": args.particles,
                      "neighbours": args.aspire_neighbours, "aspire_classes": args.aspire_classes,
                      "n_theta": args.aspire_n_theta, "downsample_px": args.aspire_downsample})
    if "large" in args.cases:
        initial, final = args.large_iterations
        specs += [{"kind": "cryostack", "label": f"large_k{k}", "scenario": "three-state",
                   "particles": args.large_particles, "classes": k, "seed": args.seeds[0], "quality": False,
                   "initial_iterations": initial, "final_iterations": final,
                   "note": f"{initial} + {final} iterations instead of the defaults 200 + 300"}
                  for k in args.large_classes]
    return specs


def main() -> None:
    """Run the requested cases, each in a fresh process, and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = ["k1", "k1_matched", "k3", "k6", "concurrent", "aspire", "large"]
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases)
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--initial-iterations", type=int, default=200)
    parser.add_argument("--final-iterations", type=int, default=300)
    parser.add_argument("--large-particles", type=int, default=100_000)
    parser.add_argument("--large-iterations", type=int, nargs=2, default=[100, 100], metavar=("INITIAL", "FINAL"))
    parser.add_argument("--matched-iterations", type=int, nargs=2, default=[40, 20], metavar=("INITIAL", "FINAL"))
    parser.add_argument("--large-classes", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--aspire-neighbours", type=int, default=20)
    parser.add_argument("--aspire-classes", type=int, default=200)
    parser.add_argument("--aspire-downsample", type=int, default=32)
    parser.add_argument("--aspire-n-theta", type=int, default=72)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    specs = specs_of(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "abinitio",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"box_px": BOX_PX, "pixel_size_a": PIXEL_SIZE_A, "snr": SNR, "seed": DATA_SEED, "ctf": True},
        "runs": [],
    }
    for spec in specs:
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        # The child's progress goes straight to this process's stderr; its last stdout line is the record.
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        record = json.loads(lines[-1][7:]) if lines else {**spec, "failed": True, "returncode": completed.returncode}
        # Read the file again: another invocation may have added its records while this one ran.
        previous = json.loads(RESULTS.read_text()).get("runs", []) if RESULTS.exists() else []
        report["runs"] = [r for r in previous if r.get("label") != record["label"]] + [record]
        RESULTS.write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k not in ("trace", "class_vs_state")}), flush=True)


if __name__ == "__main__":
    main()

"""Heterogeneous and homogeneous refinement on simulated data (box 64, 3 Å/px, SNR 0.1, CTF): quality against the
ground truth and its oracle, speed, memory and the scoring kernel's share of the machine's SGEMM.

Cases (each in its own process, so its peak RSS is its own; images are simulated once into a cache and streamed
back in batches, as a job streams them from the store):

- ``homo``: one rigid conformation, ``--particles`` (10k): GSFSC (corrected masked FSC-0.143) resolution, FSC
  against the true map (0.5), median rotation and shift errors, the largest excess of the corrected FSC over the
  FSC against the truth. Oracles: the same particles reconstructed at their true poses and shifts (FSC-0.5
  against the truth); the median rotation error where the local search settles when started from the true poses.
- ``hetero_k3``: the ``three-state`` scenario, K = 3 from ``--start``: ``truth`` (each state's true map low-passed
  to 30 Å) or ``abinitio`` (the maps of an ab-initio K = 3 run on the same particles, ``--abinitio-iterations``):
  ARI against the true state, per class the FSC-0.5 resolution against each true map. Oracles: each state
  reconstructed from its particles at their true poses (FSC-0.5); the ARI of the Bayes decision at each particle's
  true pose and shift between the true maps, and between those reconstructions; and the ARI of this refinement's
  own scoring (local search around the true poses, at Nyquist) against those reconstructions.
- ``hetero_k6``: the same with K = 6 ab-initio maps (or truth maps twice): ARI after merging classes by their
  best-matching state, and whether every state is some class's best match.
- ``large_homo``: ``--large-particles`` (100k), homogeneous refinement bounded to ``--large-iterations``
  iterations: wall, particles/s, peak RSS (to compare with ``homo``'s).

Each record has the wall time, per-iteration phase, resolution, particles/s and time, peak RSS, the time in the
scoring kernel (coarse, marginalised and local scoring of :class:`cryostack.core.search.PoseSearch`) with its
GFLOP/s next to the SGEMM GFLOP/s measured in the same process, and the backend.

    uv run python benchmarks/bench_refine.py [--cases homo hetero_k3 hetero_k6 large_homo] [--particles 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_abinitio import map_metrics, scenario_of
from simulated_stacks import StackFile, cached_stack, ctf_of, peak_rss_mb, sgemm_gflops

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "refine.json"
CACHE = Path(os.environ.get("CRYOSTACK_BENCH_CACHE", "/tmp/cryostack-bench-refine"))
BOX_PX = 64
PIXEL_SIZE_A = 3.0
SNR = 0.1
DATA_SEED = 0


def simulator_of(name: str, n_particles: int) -> Any:
    """The simulator of a benchmark dataset (its shifts: σ = 2 px per axis, the simulator's default)."""
    from cryostack.core.simulate import ParticleSimulator, SimulationParameters  # noqa: PLC0415

    params = SimulationParameters(n_particles=n_particles, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, snr=SNR,
                                  seed=DATA_SEED)
    return ParticleSimulator(scenario_of(name), params)


class KernelTimer:
    """Wraps the pose search's scoring methods to add up their time and floating-point work."""

    def __init__(self) -> None:
        from cryostack.core import search  # noqa: PLC0415
        from cryostack.core.scoring import scoring_flops  # noqa: PLC0415

        self.seconds = 0.0
        self.flops = 0.0
        cls = search.PoseSearch

        def timed(name: str, flops_of: Any) -> None:
            original = getattr(cls, name)

            def wrapper(this: Any, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = original(this, *args, **kwargs)
                self.seconds += time.perf_counter() - start
                self.flops += flops_of(*args)
                return out

            setattr(cls, name, wrapper)

        # (batch, count, templates, shifts, ...) for coarse; (batch, count, rotations, templates, shifts, ...) and
        # (batch, count, rotations, templates, own, shifts, ...) for the marginalisations.
        timed("coarse", lambda batch, count, templates, shifts, *_: scoring_flops(
            batch.n_particles, templates.shape[0], count, shifts.shape[0]))
        timed("marginalise", lambda batch, count, rotations, templates, shifts, *_: scoring_flops(
            batch.n_particles, templates.shape[0], count, shifts.shape[0]))
        timed("marginalise_local", lambda batch, count, rotations, templates, own, shifts, *_: scoring_flops(
            batch.n_particles, own.shape[1], count, shifts.shape[0]))
        self._scoring_flops = scoring_flops


def _oracle_map(images: StackFile, simulator: Any, rows: np.ndarray) -> np.ndarray:
    """The map of particles ``rows`` reconstructed at their true poses and shifts (Wiener, half-set FSC)."""
    from cryostack.core.fourier import fft2_centered, phase_shift_2d  # noqa: PLC0415
    from cryostack.core.geometry import relion_origin_to_shift_px  # noqa: PLC0415
    from cryostack.core.reconstruction import HalfMapReconstructor  # noqa: PLC0415

    truth = simulator.ground_truth
    ctf = ctf_of(simulator)
    reconstructor = HalfMapReconstructor(BOX_PX)
    half = np.random.default_rng(0).integers(1, 3, len(truth))
    fy, fx = np.meshgrid(*(2 * [(np.arange(BOX_PX) - BOX_PX // 2) / (BOX_PX * PIXEL_SIZE_A)]), indexing="ij")
    for start in range(0, rows.size, 2000):
        chunk = rows[start : start + 2000]
        shifts = relion_origin_to_shift_px(np.stack([truth.origin_x_a[chunk], truth.origin_y_a[chunk]], 1),
                                           PIXEL_SIZE_A)
        # Undo each particle's shift, so it sits where its projection does.
        images_ft = phase_shift_2d(fft2_centered(images.read(chunk)), -shifts)
        reconstructor.insert(images_ft, truth.rotations(chunk), half[chunk], ctf.take(chunk).at(fy, fx))
    return np.asarray(reconstructor.reconstruct().merged)


def _known_pose_ari(images: StackFile, simulator: Any, maps: list[np.ndarray]) -> float:
    """ARI of the Bayes decision between the true maps at each particle's true pose and shift (white noise): what
    a classifier that knew every pose and the maps could reach."""
    from cryostack.core.fourier import fft2_centered, phase_shift_2d  # noqa: PLC0415
    from cryostack.core.geometry import relion_origin_to_shift_px  # noqa: PLC0415
    from cryostack.core.metrics import adjusted_rand_index  # noqa: PLC0415
    from cryostack.core.projection import Projector  # noqa: PLC0415

    truth = simulator.ground_truth
    ctf = ctf_of(simulator)
    projectors = [Projector(m) for m in maps]
    fy, fx = np.meshgrid(*(2 * [(np.arange(BOX_PX) - BOX_PX // 2) / (BOX_PX * PIXEL_SIZE_A)]), indexing="ij")
    decided = np.empty(len(truth), dtype=np.int64)
    for start in range(0, len(truth), 1000):
        rows = np.arange(start, min(start + 1000, len(truth)))
        shifts = relion_origin_to_shift_px(np.stack([truth.origin_x_a[rows], truth.origin_y_a[rows]], 1),
                                           PIXEL_SIZE_A)
        data = fft2_centered(images.read(rows))
        c = ctf.take(rows).at(fy, fx)
        rotations = truth.rotations(rows)
        distance = [np.sum(np.abs(data - phase_shift_2d(c * p.project(rotations), shifts)) ** 2, axis=(1, 2))
                    for p in projectors]
        decided[rows] = np.argmin(np.stack(distance, axis=1), axis=1)
    return adjusted_rand_index(truth.state, decided)


def _true_poses(simulator: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every particle's true rotation (N, 3, 3) and image shift (N, 2) px."""
    from cryostack.core.geometry import relion_origin_to_shift_px  # noqa: PLC0415

    truth = simulator.ground_truth
    shifts = relion_origin_to_shift_px(np.stack([truth.origin_x_a, truth.origin_y_a], 1), PIXEL_SIZE_A)
    return truth.rotations(slice(None)), shifts


def _local_search_from_truth(images: StackFile, simulator: Any, truth_map: np.ndarray, iterations: int) -> float:
    """Median rotation error (deg) where homogeneous refinement's local search settles when started from the true
    poses: the scatter of best poses that the data leave, which no estimator of them beats by much."""
    from cryostack.core.metrics import rotation_error  # noqa: PLC0415
    from cryostack.services.refine.homo import HomogeneousRefinement  # noqa: PLC0415
    from cryostack.services.refine.parameters import HomoParameters  # noqa: PLC0415

    rotations, shifts = _true_poses(simulator)
    params = HomoParameters(max_iterations=HomoParameters().global_iterations + iterations)
    run = HomogeneousRefinement(images, ctf_of(simulator), truth_map, PIXEL_SIZE_A, params, seed=1)
    run.state.rotations[:], run.state.shift_px[:] = rotations, shifts
    run.state.iteration = params.global_iterations  # straight to the local iterations
    run.state.resolution_a = 15.0
    while not run.done:
        run.step()
    return rotation_error(run.state.rotations, rotations).median_deg


def _known_pose_local_ari(images: StackFile, simulator: Any, maps: list[np.ndarray]) -> float:
    """ARI of heterogeneous refinement's scoring (a local search around each particle's true pose, at Nyquist) of
    every particle against the maps reconstructed at the true poses of each state's particles."""
    from cryostack.core.metrics import adjusted_rand_index  # noqa: PLC0415
    from cryostack.services.refine import common  # noqa: PLC0415
    from cryostack.services.refine.hetero import HeterogeneousRefinement  # noqa: PLC0415
    from cryostack.services.refine.parameters import HeteroParameters  # noqa: PLC0415

    rotations, shifts = _true_poses(simulator)
    run = HeterogeneousRefinement(images, ctf_of(simulator), np.stack(maps), PIXEL_SIZE_A,
                                  HeteroParameters(final_full_iterations=2), seed=1)
    working = np.stack([common.working_volume(m, run.layout, None) for m in maps])
    for _ in range(2):  # the second pass scores with the noise model the first one measured
        run._volumes = working  # noqa: SLF001  (the oracle's maps stay fixed)
        run.state.rotations[:], run.state.shift_px[:] = rotations, shifts
        run.state.online_done, run.state.full_done, run.state.resolution_a = True, 1, 2 * PIXEL_SIZE_A
        run.step()
    return adjusted_rand_index(simulator.ground_truth.state, np.argmax(run.state.posteriors, axis=1))


def run_homo(spec: dict[str, Any]) -> dict[str, Any]:
    """One homogeneous refinement: timings, memory and quality against the truth and the oracle."""
    from cryostack.core.backend import default_xp, describe_backend  # noqa: PLC0415
    from cryostack.core.fsc import fsc_curve, resolution_at_threshold  # noqa: PLC0415
    from cryostack.core.geometry import relion_origin_to_shift_px  # noqa: PLC0415
    from cryostack.core.metrics import compare_to_reference, rotation_error  # noqa: PLC0415
    from cryostack.services.refine.homo import HomogeneousRefinement  # noqa: PLC0415
    from cryostack.services.refine.parameters import HomoParameters  # noqa: PLC0415

    n = spec["particles"]
    simulator = simulator_of("single", n)
    images = StackFile(cached_stack(CACHE / f"single_{n}_{BOX_PX}_{DATA_SEED}.npy", simulator))
    truth_map = simulator.source.volume(0.0, domain_present=True)
    timer = KernelTimer()
    sgemm = sgemm_gflops(default_xp())
    params = HomoParameters(max_iterations=spec.get("max_iterations"))
    start = time.perf_counter()
    run = HomogeneousRefinement(images, ctf_of(simulator), truth_map, PIXEL_SIZE_A, params, seed=1, xp=default_xp())
    trace = []
    while not run.done:
        t0 = time.perf_counter()
        report = run.step()
        seconds = time.perf_counter() - t0
        trace.append({"iteration": report.iteration, "phase": report.phase, "resolution_a": report.resolution_a,
                      "gsfsc_a": float(report.half_map_resolution_a[0]), "seconds": round(seconds, 1),
                      "particles_per_s": round(n / seconds, 1)})
        print(json.dumps(trace[-1]), file=sys.stderr, flush=True)
    result = run.finish()
    wall = time.perf_counter() - start
    record: dict[str, Any] = {
        **spec, "backend": describe_backend(), "wall_s": round(wall, 1), "peak_rss_mb": round(peak_rss_mb()),
        "iterations": trace, "sgemm_gflops": round(sgemm, 1), "kernel_s": round(timer.seconds, 1),
        "kernel_share_of_wall": round(timer.seconds / wall, 3),
        "kernel_gflops": round(timer.flops / max(timer.seconds, 1e-9) / 1e9, 1),
    }
    record["kernel_over_sgemm"] = round(record["kernel_gflops"] / sgemm, 3)
    if spec.get("quality", True):
        truth = simulator.ground_truth
        true_shift = relion_origin_to_shift_px(np.stack([truth.origin_x_a, truth.origin_y_a], 1), PIXEL_SIZE_A)
        error = rotation_error(result.rotations, truth.rotations(slice(None)))
        # Against the truth after rigid alignment (SPEC §4): a refinement's frame may drift by a fraction of a
        # degree from the start's; the unaligned curve is kept beside it.
        truth_fsc = compare_to_reference(result.map, truth_map, PIXEL_SIZE_A, allow_flip=False).fsc
        unaligned_fsc = np.asarray(fsc_curve(result.map, truth_map))
        oracle = _oracle_map(images, simulator, np.arange(n))
        record.update({
            "gsfsc_resolution_a": result.resolution_a,
            "unmasked_resolution_a": result.unmasked_resolution_a,
            "fsc_truth_0.5_a": resolution_at_threshold(truth_fsc, BOX_PX, PIXEL_SIZE_A, 0.5),
            "oracle_fsc_truth_0.5_a": resolution_at_threshold(np.asarray(fsc_curve(oracle, truth_map)), BOX_PX,
                                                              PIXEL_SIZE_A, 0.5),
            "median_rotation_error_deg": error.median_deg,
            "oracle_local_search_from_truth_rotation_error_deg": _local_search_from_truth(images, simulator,
                                                                                          truth_map, 5),
            "median_shift_error_px": float(np.median(np.linalg.norm(result.shift_px - true_shift, axis=1))),
            "max_corrected_minus_truth_fsc": float(np.max(result.fsc_corrected[1:] - truth_fsc[1:])),
            "fsc_corrected": [round(float(v), 4) for v in result.fsc_corrected],
            "fsc_truth": [round(float(v), 4) for v in truth_fsc],
            "unaligned_fsc_truth_0.5_a": resolution_at_threshold(unaligned_fsc, BOX_PX, PIXEL_SIZE_A, 0.5),
            "global_rotation_deg": float(np.degrees(np.arccos(np.clip((np.trace(error.global_rotation) - 1) / 2,
                                                                      -1, 1)))),
        })
    return record


def _abinitio_maps(images: StackFile, simulator: Any, k: int, iterations: list[int]) -> np.ndarray:
    """Class maps (K, D, D, D) of an ab-initio run on the same particles."""
    from cryostack.core.spectra import SpectralLayout, collect_spectra  # noqa: PLC0415
    from cryostack.services.abinitio.algorithm import AbinitioRun  # noqa: PLC0415
    from cryostack.services.abinitio.parameters import AbinitioParameters  # noqa: PLC0415

    params = AbinitioParameters(class_count=k, initial_iterations=iterations[0], final_iterations=iterations[1])
    layout = SpectralLayout.for_resolution(BOX_PX, PIXEL_SIZE_A, params.max_resolution_a)
    spectra = collect_spectra(images.iter_batches(), len(images), ctf_of(simulator), layout)
    run = AbinitioRun(spectra, params, seed=1)
    while not run.done:
        run.step()
    return run.finish().volumes


def run_hetero(spec: dict[str, Any]) -> dict[str, Any]:
    """One heterogeneous refinement: timings, memory, ARI and per-class FSC against the true maps."""
    from cryostack.core.backend import default_xp, describe_backend  # noqa: PLC0415
    from cryostack.core.filters import lowpass  # noqa: PLC0415
    from cryostack.core.metrics import adjusted_rand_index  # noqa: PLC0415
    from cryostack.services.refine.hetero import HeterogeneousRefinement  # noqa: PLC0415
    from cryostack.services.refine.parameters import HeteroParameters  # noqa: PLC0415

    n, k = spec["particles"], spec["classes"]
    simulator = simulator_of("three-state", n)
    images = StackFile(cached_stack(CACHE / f"three-state_{n}_{BOX_PX}_{DATA_SEED}.npy", simulator))
    states = simulator.scenario.states
    maps = [simulator.source.volume(s.hinge_range_deg[0], domain_present=s.domain_present) for s in states]
    t0 = time.perf_counter()
    if spec["start"] == "abinitio":
        starts = _abinitio_maps(images, simulator, k, spec["abinitio_iterations"])
    else:
        starts = np.stack([lowpass(maps[i % len(maps)], PIXEL_SIZE_A, 30.0, ndim=3) for i in range(k)])
    start_s = time.perf_counter() - t0
    timer = KernelTimer()
    sgemm = sgemm_gflops(default_xp())
    start = time.perf_counter()
    run = HeterogeneousRefinement(images, ctf_of(simulator), starts, PIXEL_SIZE_A, HeteroParameters(), seed=1,
                                  xp=default_xp())
    trace = []
    while not run.done:
        t1 = time.perf_counter()
        report = run.step()
        seconds = time.perf_counter() - t1
        trace.append({"iteration": report.iteration, "phase": report.phase, "resolution_a": report.resolution_a,
                      "class_change": report.class_change_fraction, "seconds": round(seconds, 1),
                      "particles_per_s": round(report.particles_scored / seconds, 1),
                      "class_fractions": [round(float(f), 3) for f in report.class_fractions]})
        print(json.dumps(trace[-1]), file=sys.stderr, flush=True)
    result = run.finish()
    wall = time.perf_counter() - start
    true_state = simulator.ground_truth.state
    labels = result.best_class
    class_vs_state = [[map_metrics(result.volumes[c], truth)["fsc_0.5_resolution_a"] for truth in maps]
                      for c in range(k)]
    best_state = [int(np.argmin(row)) for row in class_vs_state]
    merged = np.asarray(best_state)[labels]
    oracle_maps = [_oracle_map(images, simulator, np.flatnonzero(true_state == s)) for s in range(len(maps))]
    oracle = [resolution_of(m, truth) for m, truth in zip(oracle_maps, maps, strict=True)]
    record = {
        **spec, "backend": describe_backend(), "start_s": round(start_s, 1), "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_rss_mb()), "iterations": trace, "sgemm_gflops": round(sgemm, 1),
        "kernel_s": round(timer.seconds, 1), "kernel_share_of_wall": round(timer.seconds / wall, 3),
        "kernel_gflops": round(timer.flops / max(timer.seconds, 1e-9) / 1e9, 1),
        "ari": adjusted_rand_index(true_state, labels), "ari_merged_by_best_state": adjusted_rand_index(true_state,
                                                                                                       merged),
        "class_sizes": result.class_sizes.tolist(), "class_gsfsc_a": result.resolution_a.tolist(),
        "class_vs_state_fsc_0.5_a": class_vs_state, "best_state_of_class": best_state,
        "every_state_matched": sorted(set(best_state)) == list(range(len(maps))),
        "oracle_state_fsc_0.5_a": oracle,
        "known_pose_ari": _known_pose_ari(images, simulator, maps),
        "known_pose_ari_reconstructed_maps": _known_pose_ari(images, simulator, oracle_maps),
        "known_pose_local_search_ari": _known_pose_local_ari(images, simulator, oracle_maps),
    }
    record["kernel_over_sgemm"] = round(record["kernel_gflops"] / sgemm, 3)
    return record


def resolution_of(volume: np.ndarray, truth: np.ndarray) -> float:
    """FSC-0.5 resolution (Å) of a map against the truth, without alignment (both in the truth's frame)."""
    from cryostack.core.fsc import fsc_curve, resolution_at_threshold  # noqa: PLC0415

    return resolution_at_threshold(np.asarray(fsc_curve(volume, truth)), BOX_PX, PIXEL_SIZE_A, 0.5)


def child(args: argparse.Namespace) -> None:
    """Run one case in this process and print its record as the last line."""
    spec = json.loads(args.child)
    record = {"homo": run_homo, "hetero": run_hetero}[spec["kind"]](spec)
    record["load_average_end"] = os.getloadavg()
    print("RESULT " + json.dumps(record))


def specs_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs the requested cases consist of."""
    specs: list[dict[str, Any]] = []
    if "homo" in args.cases:
        specs.append({"kind": "homo", "label": "homo", "particles": args.particles})
    for k, case in ((3, "hetero_k3"), (6, "hetero_k6")):
        if case in args.cases:
            specs.append({"kind": "hetero", "label": f"{case}_{args.start}", "particles": args.particles,
                          "classes": k, "start": args.start, "abinitio_iterations": args.abinitio_iterations})
    if "large_homo" in args.cases:
        specs.append({"kind": "homo", "label": "large_homo", "particles": args.large_particles, "quality": False,
                      "max_iterations": args.large_iterations,
                      "note": f"bounded to {args.large_iterations} iterations"})
    return specs


def main() -> None:
    """Run the requested cases, each in a fresh process, and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = ["homo", "hetero_k3", "hetero_k6", "large_homo"]
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases)
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--start", choices=["truth", "abinitio"], default="abinitio")
    parser.add_argument("--abinitio-iterations", type=int, nargs=2, default=[200, 300], metavar=("INITIAL", "FINAL"))
    parser.add_argument("--large-particles", type=int, default=100_000)
    parser.add_argument("--large-iterations", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "refine",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"box_px": BOX_PX, "pixel_size_a": PIXEL_SIZE_A, "snr": SNR, "seed": DATA_SEED, "ctf": True},
        "runs": [],
    }
    for spec in specs_of(args):
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        record = json.loads(lines[-1][7:]) if lines else {**spec, "failed": True, "returncode": completed.returncode}
        previous = json.loads(RESULTS.read_text()).get("runs", []) if RESULTS.exists() else []
        report["runs"] = [r for r in previous if r.get("label") != record["label"]] + [record]
        RESULTS.write_text(json.dumps(report, indent=1))
        print(json.dumps({key: value for key, value in record.items() if not key.startswith("fsc")}), flush=True)


if __name__ == "__main__":
    main()

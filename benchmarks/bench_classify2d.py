"""2D classification on the `floppy` scenario: quality with and without the per-class cap, speed, and ASPIRE.

Cases (each in its own process, so its peak RSS is its own; particle images are simulated once into a cache and
read back in batches with plain file reads, as a job streams them from the store):

- ``quality``: the floppy scenario (preferred orientation, hinge 0–60°, 30% domain missing; SNR 0.1, 3 Å/px) at
  ``--particles`` (20k) and box 64, K = 50, cryoSPARC's schedule (20 online iterations, ``--final-full`` full ones,
  default 1), once without and once with the cap (``--cap-multiple`` × N/K). Per run: max class size vs the cap,
  % empty classes, tiny classes (< 10% of N/K), each non-empty class average's correlation with the best
  noise-free ground-truth projection (the CTF-free projections at the true view and conformation of up to 12 of its
  members, psi free: best in-plane rotation and translation, both low-passed to ``--lowpass`` Å, inside the
  particle mask), per-class purity of domain present/absent, the particles in a class of the other state and how
  many of them lie off the preferred views, and the montage PNG.
- ``cap_sweep``: the capped quality run at each cap multiple of ``--sweep-multiples`` (1.0, 1.2, 1.5, 2.0 × N/K)
  and classifier seed of ``--sweep-seeds`` (0, 1, 2): how the choice of cap moves occupancy and purity, and how much
  of that is the seed.
- ``snr_sweep``: the quality runs, without and with the cap, on the same scenario simulated at each SNR of
  ``--sweep-snrs`` (0.03 … 1.0): where the per-class purity bar is data-limited and where it is not.
- ``timing``: wall time, particles/s (particle × iteration evaluations per second), peak RSS for N in
  ``--timing-particles`` and K in ``--timing-classes``, with the schedule reduced to ``--timing-online`` online
  iterations + ``--timing-full`` full passes (default 1; those before the last are soft), each without a cap and
  with a cap of ``--timing-cap-multiple`` × N/K (default 1.0, the tightest, where the final pass's exact
  assignment moves the most particles and scores some of them again against every class; the counts are in the
  record); the full-schedule time is extrapolated from the measured per-iteration times.
- every cryostack run reports the scoring kernel's share of the wall time and its GFLOP/s (the coarse global
  search through :func:`cryostack.core.scoring.iter_log_likelihoods` and the local refinement's batched GEMMs) next
  to SGEMM GFLOP/s measured in the same process.
- ``oracle``: what an assignment by likelihood can reach on this data: K classes built from the ground truth
  (for particles near a preferred view: presence x view x ``ORACLE_HINGE_BINS`` hinge bins, one class per view for
  the absent ones; the rest clustered by view direction, separately by presence), each class average the mean
  noise-free CTF-free projection of its members, then one final full pass of the classifier from those averages
  (no cap): the same metrics for the classes the particles then choose.
- ``known_pose``: what the images themselves say about presence: the Bayes-optimal present/absent decision for
  ``--known-pose-particles`` random particles given each one's true pose, shift and CTF (every conformation of the
  set rendered there, scored under the simulator's white noise): error rates and the purity of the two called pools,
  per preferred view and off-view. The gap between it and the classes' purity is what 2D classes cannot see.
- ``aspire``: ASPIRE-Python's 2D class averaging (``DefaultClassAvgSource``: rotationally invariant features,
  nearest neighbours, BFT averaging; the K classes of lowest neighbour-distance variance) on the same
  phase-flipped images, K class averages of ``--aspire-neighbours`` neighbours each: time and the same metrics.

    uv run python benchmarks/bench_classify2d.py [--cases quality aspire oracle known_pose timing cap_sweep snr_sweep]
        [--classifier-seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from classify2d_quality import (
    BOX_PX,
    PIXEL_SIZE_A,
    SEED,
    ORACLE_HINGE_BINS,
    ORACLE_VIEW_RADIUS_DEG,
    class_quality,
    nearest_preferred_view,
    oracle_averages,
    oracle_groups,
)
from simulated_stacks import StackFile, cached_stack, ctf_of, gpu_pool_mb, peak_rss_mb, sgemm_gflops, synchronise

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "classify2d.json"
CACHE = Path(os.environ.get("CRYOSTACK_BENCH_CACHE", "/tmp/cryostack-bench-classify2d"))
SNR = 0.1


def dataset(n_particles: int, snr: float = SNR) -> tuple[Path, Any]:
    """The floppy set of ``n_particles`` at ``snr`` (cached ``.npy`` stack, simulator); simulated once, then cached.

    The poses, states, hinge angles and defoci depend on the seed only, so sets of one size at different SNRs are
    the same particles under different noise.
    """
    from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario  # noqa: PLC0415

    params = SimulationParameters(n_particles=n_particles, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, snr=snr, seed=SEED)
    simulator = ParticleSimulator(scenario("floppy"), params)
    return cached_stack(CACHE / f"floppy_{n_particles}_{BOX_PX}_{SEED}_snr{snr:g}.npy", simulator), simulator


class KernelMeter:
    """Times the scoring kernel inside a run and counts its useful floating-point operations."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self.seconds = 0.0
        self.flops = 0.0

    def install(self) -> None:
        """Wrap the classifier's coarse scoring call and local search with timers."""
        from cryostack.core.scoring import scoring_flops  # noqa: PLC0415
        from cryostack.services.classify2d import search  # noqa: PLC0415

        original_iter = search.iter_log_likelihoods
        original_local = search.PoseSearch._local_search
        meter = self

        def timed_iter(particles: Any, templates: Any, **options: Any) -> Any:
            ramps = options.get("shift_ramps")
            shifts = 1 if ramps is None else ramps.shape[0]
            generator = original_iter(particles, templates, **options)
            while True:
                start = time.perf_counter()
                try:
                    block = next(generator)
                    synchronise(meter.xp)
                except StopIteration:
                    meter.seconds += time.perf_counter() - start
                    return
                meter.seconds += time.perf_counter() - start
                n = block.particles.stop - block.particles.start
                m = block.templates.stop - block.templates.start
                meter.flops += scoring_flops(n, m, particles.shape[1], shifts)
                yield block

        def timed_local(self: Any, x: Any, ctf: Any, noise_var: Any, fine: Any, coarse_ramps: Any, local_ramps: Any,
                        plan: Any, rows: Any, *rest: Any) -> Any:
            start = time.perf_counter()
            out = original_local(self, x, ctf, noise_var, fine, coarse_ramps, local_ramps, plan, rows, *rest)
            synchronise(meter.xp)
            meter.seconds += time.perf_counter() - start
            pairs, coefficients = rows.size, x.shape[1]
            window, shifts = plan.angle_window.size, local_ramps.shape[0]
            meter.flops += pairs * (2.0 * shifts * 2 * coefficients * window + 2.0 * coefficients * window)
            return out

        search.iter_log_likelihoods = timed_iter
        search.PoseSearch._local_search = timed_local


class RescoredCount(logging.Handler):
    """Counts the particles the capped E-steps of full passes scored again against every class (from the log): in
    the final assignment and in soft passes."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.final = 0
        self.soft = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "scored again against every class" in record.msg:
            if record.msg.startswith("soft full pass"):
                self.soft += int(record.args[0])
            else:
                self.final += int(record.args[0])


def run_cryostack(args: argparse.Namespace, n_particles: int, n_classes: int, cap_multiple: float | None,
                  online: int, final_full: int, with_quality: bool, label: str, snr: float = SNR) -> dict[str, Any]:
    """One classification run in this process: timings, kernel share, memory and (optionally) quality."""
    from cryostack.core.backend import default_xp, describe_backend  # noqa: PLC0415
    from cryostack.services.classify2d.algorithm import Classifier2D  # noqa: PLC0415
    from cryostack.services.classify2d.outputs import montage_png, sort_classes  # noqa: PLC0415
    from cryostack.services.classify2d.parameters import Classify2DParameters  # noqa: PLC0415

    path, simulator = dataset(n_particles, snr)  # before the GPU is touched: the cache is written by forked processes
    xp = default_xp()
    sgemm = sgemm_gflops(xp)
    meter = KernelMeter(xp)
    meter.install()
    params = Classify2DParameters(class_count=n_classes, online_em_iterations=online,
                                  final_full_iterations=final_full, max_particles_per_class_mean_multiple=cap_multiple)
    stamps: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    classifier = Classifier2D(params, StackFile(path), PIXEL_SIZE_A, ctf_of(simulator), seed=args.classifier_seed,
                              xp=xp)

    def on_iteration(state: Any, report: Any) -> None:
        stamps.append((report.iteration, time.perf_counter() - start, report.resolution_a))
        print(f"[{label}] iteration {report.iteration}/{report.total_iterations} at {stamps[-1][1]:.0f} s, "
              f"{report.resolution_a:.1f} Å, largest class {report.occupancy.max():.0f}", file=sys.stderr, flush=True)

    rescored = RescoredCount()
    logging.getLogger(Classifier2D.__module__).addHandler(rescored)
    logging.getLogger(Classifier2D.__module__).setLevel(logging.INFO)
    result = classifier.run(on_iteration=on_iteration)
    wall = time.perf_counter() - start
    seen = n_particles * params.final_full_iterations + online * min(n_particles, 100 * n_classes)
    online_times = np.diff([0.0] + [t for _, t, _ in stamps[:online]])
    full_time = stamps[-1][1] - (stamps[online - 1][1] if online else 0.0)
    # The first online iteration also holds the start (noise estimate, initial classes).
    steady = float(np.median(online_times[1:])) if online > 1 else float(online_times[0]) if online else 0.0
    extrapolated = (online_times[0] if online else 0.0) + steady * (20 - 1) + full_time
    counts = result.counts
    record: dict[str, Any] = {
        "label": label, **describe_backend(), "particles": n_particles, "classes": n_classes, "box_px": BOX_PX,
        "snr": snr, "classifier_seed": args.classifier_seed,
        "online_em_iterations": online, "final_full_iterations": params.final_full_iterations,
        "cap": result.capacity, "wall_s": wall, "particle_evaluations": seen, "particles_per_s": seen / wall,
        "peak_rss_mb": peak_rss_mb(), "gpu_pool_mb": gpu_pool_mb(xp),
        "iteration_times_s": [round(t, 2) for _, t, _ in stamps],
        "resolution_a_per_iteration": [round(r, 2) for _, _, r in stamps],
        "steady_online_iteration_s": steady, "full_pass_s": full_time,
        "final_pass_particles_scored_again": rescored.final,
        "soft_passes_particles_scored_again": rescored.soft,
        "extrapolated_full_schedule_s": extrapolated,
        "scoring_kernel": {"seconds": meter.seconds, "share_of_wall": meter.seconds / wall,
                           "gflops": meter.flops / max(meter.seconds, 1e-9) / 1e9, "sgemm_gflops": sgemm,
                           "ratio_to_sgemm": meter.flops / max(meter.seconds, 1e-9) / 1e9 / sgemm},
        "occupancy": {"max_class": int(counts.max()), "empty_classes": int(np.sum(counts == 0)),
                      "percent_empty": 100.0 * float(np.mean(counts == 0)),
                      "tiny_classes": int(np.sum((counts > 0) & (counts < 0.1 * n_particles / n_classes))),
                      "every_class_within_cap": None if result.capacity is None
                      else bool(counts.max() <= result.capacity),
                      "counts_sorted": np.sort(counts)[::-1].tolist(), "reseeded": result.reseeded},
    }
    if with_quality:
        classes = sort_classes(result)
        montage = RESULTS.parent / f"classify2d_montage_{label}.png"
        montage.write_bytes(montage_png(classes))
        record["montage_png"] = str(montage)
        labels = result.assignment.labels
        members_of = [np.flatnonzero(labels == c) for c in range(n_classes)]
        radius_px = params.mask_diameters_a(BOX_PX, PIXEL_SIZE_A)[0] / 2 / PIXEL_SIZE_A
        record["quality"] = class_quality(result.averages, members_of, simulator, n_particles, args.lowpass, radius_px)
        record["quality"]["lowpass_a"] = args.lowpass
    return record


def run_oracle(args: argparse.Namespace, n_particles: int, n_classes: int) -> dict[str, Any]:
    """Classes from the truth, then the classifier's final full pass from their averages: the same metrics."""
    from cryostack.services.classify2d.algorithm import Classifier2D  # noqa: PLC0415
    from cryostack.services.classify2d.parameters import Classify2DParameters  # noqa: PLC0415

    path, simulator = dataset(n_particles)
    groups = oracle_groups(simulator, n_classes)
    params = Classify2DParameters(class_count=n_classes, online_em_iterations=0, final_full_iterations=1)
    classifier = Classifier2D(params, StackFile(path), PIXEL_SIZE_A, ctf_of(simulator), seed=args.classifier_seed)
    state = classifier.initial_state()
    state.averages = oracle_averages(simulator, groups, n_classes) * classifier.mask
    state.occupancy = np.bincount(groups, minlength=n_classes).astype(np.float64)
    state.resolution_a = params.resolution_limit_a(PIXEL_SIZE_A)
    result = classifier.run(state)
    labels = result.assignment.labels
    radius_px = params.mask_diameters_a(BOX_PX, PIXEL_SIZE_A)[0] / 2 / PIXEL_SIZE_A
    members_of = [np.flatnonzero(labels == c) for c in range(n_classes)]
    quality = class_quality(result.averages, members_of, simulator, n_particles, args.lowpass, radius_px)
    quality["lowpass_a"] = args.lowpass
    return {
        "label": "oracle", "particles": n_particles, "classes": n_classes,
        "view_radius_deg": ORACLE_VIEW_RADIUS_DEG, "hinge_bins": ORACLE_HINGE_BINS,
        "group_sizes": np.bincount(groups, minlength=n_classes).tolist(),
        "occupancy": {"max_class": int(result.counts.max()), "empty_classes": int(np.sum(result.counts == 0))},
        "quality": quality,
    }


def run_known_pose(args: argparse.Namespace, n_particles: int) -> dict[str, Any]:
    """The Bayes-optimal domain present/absent decision on the benchmark's noisy images, given each particle's true
    pose, shift and CTF: how much the images themselves say about presence, with no pose or class to infer.

    For particle ``x`` and every conformation ``c`` of the set (absent, or present at one hinge level), the clean
    image ``C_c`` rendered at the particle's true pose, shift and CTF gives ``log p(x | c) = −|x − C_c|² / 2σ²``
    (white noise of the simulator's σ, up to a constant); presence is decided by the posterior with the scenario's
    weight of each presence spread equally over its conformations. Run on ``--known-pose-particles`` random
    particles.
    """
    from scipy.special import logsumexp  # noqa: PLC0415

    from cryostack.core.ctf import ctf_2d  # noqa: PLC0415
    from cryostack.core.geometry import relion_origin_to_shift_px  # noqa: PLC0415
    from cryostack.core.simulate import render_clean_images  # noqa: PLC0415

    path, simulator = dataset(n_particles)
    truth, sim_params = simulator.ground_truth, simulator.params
    rng = np.random.default_rng(SEED)
    rows = np.sort(rng.choice(n_particles, size=min(args.known_pose_particles, n_particles), replace=False))
    images = StackFile(path).read(rows).astype(np.float64)  # (n, D, D)
    ctf = ctf_2d(BOX_PX, PIXEL_SIZE_A, truth.defocus_u_a[rows], truth.defocus_v_a[rows],
                 truth.defocus_angle_deg[rows], sim_params.voltage_kv, sim_params.cs_mm, sim_params.amplitude_contrast)
    origins = np.stack([truth.origin_x_a[rows], truth.origin_y_a[rows]], axis=1)  # (n, 2) Å
    shifts_px = relion_origin_to_shift_px(origins, PIXEL_SIZE_A)
    rotations = truth.rotations(rows)
    noise_var = simulator.noise_sigma**2
    state_weight = {flag: sum(s.weight for s in simulator.scenario.states if s.domain_present == flag)
                    for flag in (True, False)}
    levels = {flag: sum(present == flag for present, _ in simulator.conformations) for flag in state_weight}
    log_joint: dict[bool, list[np.ndarray]] = {flag: [] for flag in state_weight}
    for conformation, (present, _) in enumerate(simulator.conformations):
        clean = render_clean_images(simulator._projector(conformation), rotations, ctf, shifts_px)
        log_likelihood = -np.sum((images - clean) ** 2, axis=(1, 2)) / (2 * noise_var)  # (n,)
        log_joint[present].append(log_likelihood + np.log(state_weight[present] / levels[present]))
    called_present = logsumexp(np.stack(log_joint[True]), axis=0) > logsumexp(np.stack(log_joint[False]), axis=0)
    present = truth.domain_present[rows].astype(bool)
    near, on_view = (part[rows] for part in nearest_preferred_view(simulator))
    groups = {f"view_{rot:g}_{tilt:g}": on_view & (near == view)
              for view, (rot, tilt) in enumerate(simulator.scenario.poses.preferred_views)}
    groups["off_view"] = ~on_view
    groups["all"] = np.ones(rows.size, dtype=bool)

    def errors(selected: np.ndarray) -> dict[str, float | None]:
        truly, called = present[selected], called_present[selected]
        return {
            "particles": int(selected.sum()),
            "present_called_absent": float(np.mean(~called[truly])) if truly.any() else None,
            "absent_called_present": float(np.mean(called[~truly])) if (~truly).any() else None,
            "purity_of_called_present": float(np.mean(truly[called])) if called.any() else None,
            "purity_of_called_absent": float(np.mean(~truly[~called])) if (~called).any() else None,
        }

    return {"label": "known_pose", "particles": n_particles, "evaluated": int(rows.size),
            "view_radius_deg": ORACLE_VIEW_RADIUS_DEG,
            "groups": {name: errors(selected) for name, selected in groups.items()}}


def run_aspire(args: argparse.Namespace, n_particles: int, n_classes: int) -> dict[str, Any]:
    """ASPIRE's class averaging on the same (phase-flipped) images, timed, with the same metrics."""
    os.chdir(tempfile.mkdtemp(prefix="aspire-"))  # ASPIRE writes its logs into the working directory
    import aspire  # noqa: PLC0415
    from aspire.classification import NeighborVarianceClassSelector, RIRClass2D  # noqa: PLC0415
    from aspire.denoising import DefaultClassAvgSource  # noqa: PLC0415
    from aspire.source import ArrayImageSource  # noqa: PLC0415

    from cryostack.core.ctf import ctf_2d  # noqa: PLC0415
    from cryostack.core.fourier import fft2_centered, ifft2_centered  # noqa: PLC0415
    from cryostack.services.classify2d import evaluation, outputs  # noqa: F401, PLC0415  (fail before the long run)

    path, simulator = dataset(n_particles)
    truth, params = simulator.ground_truth, simulator.params
    start = time.perf_counter()
    flipped = np.empty((n_particles, BOX_PX, BOX_PX), dtype=np.float32)
    for rows, images in StackFile(path).iter_batches(batch_size=2048):
        ctf = ctf_2d(BOX_PX, PIXEL_SIZE_A, truth.defocus_u_a[rows], truth.defocus_v_a[rows],
                     truth.defocus_angle_deg[rows], params.voltage_kv, params.cs_mm, params.amplitude_contrast)
        flipped[rows] = ifft2_centered(fft2_centered(images) * np.sign(ctf)).real
    source = ArrayImageSource(flipped, pixel_size=PIXEL_SIZE_A)
    # DefaultClassAvgSource's own classifier, seeded: its random projections otherwise change the classes run to run.
    classifier = RIRClass2D(source, fspca_components=400, bispectrum_components=300, n_nbor=args.aspire_neighbours,
                            large_pca_implementation="legacy", nn_implementation="sklearn",
                            bispectrum_implementation="legacy", seed=SEED)
    averages_source = DefaultClassAvgSource(source, n_nbor=args.aspire_neighbours, classifier=classifier,
                                            class_selector=NeighborVarianceClassSelector())
    averages = averages_source.images[:n_classes].asnumpy().astype(np.float32)
    wall = time.perf_counter() - start
    selected = np.asarray(averages_source.selection_indices[:n_classes])
    members_of = [np.asarray(averages_source.class_indices[i]) for i in selected]
    radius_px = 0.85 * BOX_PX / 2
    quality = class_quality(averages, members_of, simulator, n_particles, args.lowpass, radius_px)
    quality["lowpass_a"] = args.lowpass
    montage = RESULTS.parent / "classify2d_montage_aspire.png"
    _aspire_montage(averages, [m.size for m in members_of], montage)
    return {
        "label": "aspire", "aspire_version": aspire.__version__, "particles": n_particles, "classes": n_classes,
        "neighbours_per_class": args.aspire_neighbours, "classifier_seed": SEED, "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "note": "ASPIRE forms each class from one image's nearest neighbours (classes overlap and do not partition "
                "the set), so occupancy limits do not apply; metrics cover the K selected classes",
        "montage_png": str(montage), "quality": quality,
    }


def _aspire_montage(averages: np.ndarray, sizes: list[int], path: Path) -> None:
    from cryostack.services.classify2d.outputs import SortedClasses, montage_png  # noqa: PLC0415

    k = averages.shape[0]
    classes = SortedClasses(order=np.arange(k), number=np.arange(1, k + 1), averages=averages,
                            counts=np.asarray(sizes), frc=np.zeros((k, 1)), frc_resolution_a=np.full(k, np.nan))
    path.write_bytes(montage_png(classes))


def child(args: argparse.Namespace) -> None:
    """Run one case in this process and print its JSON record."""
    spec = json.loads(args.child)
    if spec["kind"] == "aspire":
        record = run_aspire(args, spec["particles"], spec["classes"])
    elif spec["kind"] == "oracle":
        record = run_oracle(args, spec["particles"], spec["classes"])
    elif spec["kind"] == "known_pose":
        record = run_known_pose(args, spec["particles"])
    else:
        record = run_cryostack(args, spec["particles"], spec["classes"], spec.get("cap_multiple"), spec["online"],
                               spec.get("final_full", 1), spec["quality"], spec["label"], spec.get("snr", SNR))
    record["load_average_end"] = os.getloadavg()
    print("RESULT " + json.dumps(record))


def main() -> None:
    """Run the requested cases, each in a fresh process, and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = ["quality", "aspire", "oracle", "known_pose", "timing", "cap_sweep", "snr_sweep"]
    parser.add_argument("--cases", nargs="+", default=cases[:-2], choices=cases,
                        help="default: all but the sweeps (cap_sweep: twelve full runs, snr_sweep: fourteen)")
    parser.add_argument("--particles", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--cap-multiple", type=float, default=1.5, help="cap as a multiple of N/K (quality case)")
    parser.add_argument("--online", type=int, default=20, help="online iterations of the quality runs")
    parser.add_argument("--final-full", type=int, default=1, help="final full iterations of the quality runs")
    parser.add_argument("--classifier-seed", type=int, default=SEED,
                        help="random seed of the cryostack classifications (the data's seed stays fixed)")
    parser.add_argument("--lowpass", type=float, default=12.0, help="low-pass (Å) before correlating with the truth")
    parser.add_argument("--aspire-neighbours", type=int, default=50)
    parser.add_argument("--known-pose-particles", type=int, default=4000,
                        help="random particles the known_pose case evaluates")
    parser.add_argument("--timing-particles", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--timing-classes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--timing-online", type=int, default=2)
    parser.add_argument("--timing-full", type=int, default=1, help="full passes of the timing runs (the last hard)")
    parser.add_argument("--timing-cap-multiple", type=float, default=1.0)
    parser.add_argument("--sweep-multiples", type=float, nargs="+", default=[1.0, 1.2, 1.5, 2.0])
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep-snrs", type=float, nargs="+", default=[0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    specs: list[dict[str, Any]] = []
    if "quality" in args.cases:
        specs += [
            {"kind": "cryostack", "label": "no_cap", "particles": args.particles, "classes": args.classes,
             "online": args.online, "final_full": args.final_full, "quality": True},
            {"kind": "cryostack", "label": "cap", "particles": args.particles, "classes": args.classes,
             "online": args.online, "final_full": args.final_full, "quality": True, "cap_multiple": args.cap_multiple},
        ]
    if "aspire" in args.cases:
        specs.append({"kind": "aspire", "particles": args.particles, "classes": args.classes})
    if "oracle" in args.cases:
        specs.append({"kind": "oracle", "label": "oracle", "particles": args.particles, "classes": args.classes})
    if "known_pose" in args.cases:
        specs.append({"kind": "known_pose", "label": "known_pose", "particles": args.particles})
    if "timing" in args.cases:
        specs += [
            {"kind": "cryostack", "label": f"timing_{n}_{k}{'_cap' if multiple else ''}", "particles": n, "classes": k,
             "online": args.timing_online, "final_full": args.timing_full, "quality": False, "cap_multiple": multiple}
            for n in args.timing_particles for k in args.timing_classes for multiple in (None, args.timing_cap_multiple)
        ]
    if "cap_sweep" in args.cases:
        specs += [
            {"kind": "cryostack", "label": f"cap_sweep_{multiple:g}_seed{seed}", "particles": args.particles,
             "classes": args.classes, "online": args.online, "final_full": args.final_full, "quality": True,
             "cap_multiple": multiple, "classifier_seed": seed}
            for multiple in args.sweep_multiples for seed in args.sweep_seeds
        ]
    if "snr_sweep" in args.cases:
        specs += [
            {"kind": "cryostack", "label": f"snr_sweep_{snr:g}_{'cap' if multiple else 'no_cap'}",
             "particles": args.particles, "classes": args.classes, "online": args.online,
             "final_full": args.final_full, "quality": True, "cap_multiple": multiple, "snr": snr}
            for snr in args.sweep_snrs for multiple in (None, args.cap_multiple)
        ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "classify2d",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "scenario": {"name": "floppy", "box_px": BOX_PX, "pixel_size_a": PIXEL_SIZE_A, "snr": SNR, "seed": SEED},
        "runs": [],
    }
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text())
        report["runs"] = [r for r in previous.get("runs", []) if r.get("label") not in
                          {s.get("label", s["kind"]) for s in specs}]
    for spec in specs:
        command = [sys.executable, __file__, "--child", json.dumps(spec), "--lowpass", str(args.lowpass),
                   "--aspire-neighbours", str(args.aspire_neighbours), "--classifier-seed",
                   str(spec.get("classifier_seed", args.classifier_seed)),
                   "--known-pose-particles", str(args.known_pose_particles)]
        # The child's progress goes straight to this process's stderr; its last stdout line is the record.
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        record = json.loads(lines[-1][7:]) if lines else {
            "label": spec.get("label", spec["kind"]), "failed": True, "returncode": completed.returncode,
        }
        report["runs"].append(record)
        RESULTS.write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k not in ("quality", "occupancy")}), flush=True)


if __name__ == "__main__":
    main()

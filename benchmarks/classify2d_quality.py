"""How good 2D classes are against the simulator's ground truth, and the oracle classes cut from it, for
``bench_classify2d.py``: class averages against noise-free projections, domain purity, who sits in a class of the
other state, and the ground-truth classes of the ``oracle`` case."""

from __future__ import annotations

from typing import Any

import numpy as np

# The benchmark's simulated data: box, pixel size, and the seed of data and k-means.
BOX_PX = 64
PIXEL_SIZE_A = 3.0
SEED = 0
MAX_GT_PROJECTIONS = 12
# Ground-truth classes of the ``oracle`` case: a particle within this angle of a preferred view is "on" that view
# (about two spreads of the scenario's von Mises-Fisher clusters), and each view's present particles are cut into
# this many hinge-angle bins of equal size.
ORACLE_VIEW_RADIUS_DEG = 25.0
ORACLE_HINGE_BINS = 8


def gt_projections(simulator: Any, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise-free, CTF-free, centred projections (M, D, D) at the true view and conformation of some members."""
    from cryostack.core.fourier import ifft2_centered  # noqa: PLC0415
    from cryostack.core.geometry import euler_to_matrix  # noqa: PLC0415

    chosen = rng.choice(members, size=min(MAX_GT_PROJECTIONS, members.size), replace=False)
    truth = simulator.ground_truth
    images = []
    for index in chosen:
        rotation = euler_to_matrix(truth.rot_deg[index], truth.tilt_deg[index], 0.0)[None]
        projector = simulator._projector(int(simulator.conformation_index[index]))
        images.append(ifft2_centered(projector.project(rotation)[0]).real)
    return np.stack(images).astype(np.float32)


def class_quality(averages: np.ndarray, members_of: list[np.ndarray], simulator: Any, n_particles: int,
                  lowpass_a: float, mask_radius_px: float) -> dict[str, Any]:
    """Correlation with the best ground-truth projection and domain purity of each class with members."""
    from cryostack.services.classify2d.evaluation import best_reference_correlation  # noqa: PLC0415

    rng = np.random.default_rng(1)
    present = simulator.ground_truth.domain_present
    correlations, purities, sizes = [], [], []
    for average, members in zip(averages, members_of, strict=True):
        if members.size == 0:
            continue
        references = gt_projections(simulator, members, rng)
        correlation, _ = best_reference_correlation(average, references, pixel_size_a=PIXEL_SIZE_A,
                                                    lowpass_a=lowpass_a, mask_radius_px=mask_radius_px)
        fraction = present[members].mean()
        correlations.append(correlation)
        purities.append(max(fraction, 1.0 - fraction))
        sizes.append(members.size)
    correlations, purities, sizes = np.array(correlations), np.array(purities), np.array(sizes)
    return {
        "minority_members": minority_members(members_of, simulator),
        "classes_with_particles": int(sizes.size),
        "per_class_size": sizes.tolist(),
        "correlation_to_best_gt_projection": {
            "median": float(np.median(correlations)), "min": float(correlations.min()),
            "fraction_at_least_0.9": float(np.mean(correlations >= 0.9)), "per_class": correlations.round(4).tolist(),
        },
        "domain_purity": {
            "median": float(np.median(purities)), "min": float(purities.min()),
            "fraction_at_least_0.9": float(np.mean(purities >= 0.9)),
            "particle_weighted_mean": float(np.sum(purities * sizes) / sizes.sum()),
            "per_class": purities.round(4).tolist(),
        },
    }


def minority_members(members_of: list[np.ndarray], simulator: Any) -> dict[str, Any]:
    """Who sits in a class of the other state: particles whose presence differs from their class's majority, split
    by their own state, with the fraction of them seen from off the preferred views next to the population's. An
    off-view fraction well above the population's says the impure classes are made by the directions the data
    covers thinly, not by the state being hard to see."""
    present = simulator.ground_truth.domain_present.astype(bool)
    _, on_view = nearest_preferred_view(simulator)
    minority = np.zeros(present.size, dtype=bool)
    for members in members_of:
        if members.size:
            majority_present = present[members].mean() >= 0.5
            minority[members[present[members] != majority_present]] = True
    record: dict[str, Any] = {"view_radius_deg": ORACLE_VIEW_RADIUS_DEG}
    for name, state in (("present_in_absent_classes", present), ("absent_in_present_classes", ~present)):
        selected = minority & state
        record[name] = {
            "particles": int(selected.sum()), "of_state": int(state.sum()),
            "off_view_fraction": float(np.mean(~on_view[selected])) if selected.any() else None,
            "state_off_view_fraction": float(np.mean(~on_view[state])),
        }
    return record


def nearest_preferred_view(simulator: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's nearest preferred view (N,) int and whether it lies within ``ORACLE_VIEW_RADIUS_DEG`` (N,)."""
    directions = simulator.ground_truth.view_directions()  # (N, 3)
    rot, tilt = np.deg2rad(np.asarray(simulator.scenario.poses.preferred_views, dtype=np.float64).T)
    preferred = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=1)  # (V, 3)
    angle = np.rad2deg(np.arccos(np.clip(np.abs(directions @ preferred.T), 0.0, 1.0)))  # opposite: mirror view
    return angle.argmin(axis=1), angle.min(axis=1) <= ORACLE_VIEW_RADIUS_DEG


def oracle_groups(simulator: Any, n_classes: int) -> np.ndarray:
    """Ground-truth classes (N,) in [0, n_classes): see the ``oracle`` case."""
    from sklearn.cluster import KMeans  # noqa: PLC0415

    truth = simulator.ground_truth
    present = truth.domain_present.astype(bool)
    directions = truth.view_directions()  # (N, 3)
    near, on_view = nearest_preferred_view(simulator)
    groups = np.empty(present.size, dtype=np.int64)
    next_group = 0
    for view in range(len(simulator.scenario.poses.preferred_views)):
        rows = np.flatnonzero(present & on_view & (near == view))
        hinge = truth.hinge_angle_deg[rows]
        edges = np.quantile(hinge, np.linspace(0.0, 1.0, ORACLE_HINGE_BINS + 1)[1:-1])
        groups[rows] = next_group + np.searchsorted(edges, hinge, side="right")
        groups[~present & on_view & (near == view)] = next_group + ORACLE_HINGE_BINS
        next_group += ORACLE_HINGE_BINS + 1
    left = n_classes - next_group
    if left < 2:
        raise ValueError(f"the oracle needs more than {next_group + 1} classes, got {n_classes}")
    off_view_present = min(left - 1, max(1, round(left * present[~on_view].mean())))
    for flag, count in ((True, off_view_present), (False, left - off_view_present)):
        rows = np.flatnonzero(~on_view & (present == flag))
        folded = directions[rows] * np.where(directions[rows, 2:] < 0, -1.0, 1.0)
        groups[rows] = next_group + KMeans(count, n_init=4, random_state=SEED).fit_predict(folded)
        next_group += count
    return groups


def oracle_averages(simulator: Any, groups: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean noise-free, CTF-free, centred projection of each group's members (K, D, D) float32.

    In-plane angle 0, except near the top view (tilt < 30°), where rot is an in-plane turn and psi = -rot undoes it.
    """
    from cryostack.core.fourier import ifft2_centered  # noqa: PLC0415
    from cryostack.core.geometry import euler_to_matrix  # noqa: PLC0415

    truth = simulator.ground_truth
    psi = np.where(truth.tilt_deg < 30.0, -truth.rot_deg, 0.0)
    sums = np.zeros((n_classes, BOX_PX, BOX_PX), dtype=np.float64)
    for conformation in np.unique(simulator.conformation_index):
        rows = np.flatnonzero(simulator.conformation_index == conformation)
        projector = simulator._projector(int(conformation))
        for start in range(0, rows.size, 2048):
            chunk = rows[start : start + 2048]
            rotations = euler_to_matrix(truth.rot_deg[chunk], truth.tilt_deg[chunk], psi[chunk])
            images = ifft2_centered(projector.project(rotations)).real
            np.add.at(sums, groups[chunk], images)
    counts = np.bincount(groups, minlength=n_classes)
    return (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)

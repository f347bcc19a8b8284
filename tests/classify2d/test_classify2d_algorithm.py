"""2D classification against ground truth: class separation, poses, CTF correction, the cap, resumption, validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from classify2d_data import PIXEL_SIZE_A, blob_image, make_set, two_references

from cryostack.core.backend import cupy_available
from cryostack.core.fourier import frequency_radius_px
from cryostack.core.metrics import adjusted_rand_index
from cryostack.core.scoring import LogLikelihoodBlock
from cryostack.core.sources import ArrayParticles
from cryostack.errors import InvalidArgumentError
from cryostack.services.classify2d import algorithm, mstep
from cryostack.services.classify2d.algorithm import Classifier2D
from cryostack.services.classify2d.parameters import Classify2DParameters, validate_parameters
from cryostack.services.classify2d.search import Alignment, fold_coarse_block, half_plane_coefficients
from cryostack.services.classify2d.state import ClassificationResult, ClassificationState
from cryostack.services.classify2d.evaluation import align_to_reference, aligned_frc

FAST = {"max_resolution_a": 8.0, "online_em_iterations": 4, "batch_size_per_class": 100}


def _circular_error_deg(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """|estimate − truth − offset| on the circle, with the class's common offset (its frame) removed."""
    difference = np.deg2rad(estimate - truth)
    offset = np.angle(np.mean(np.exp(1j * difference)))
    return np.abs(np.rad2deg(np.angle(np.exp(1j * (difference - offset)))))


@pytest.mark.parametrize(
    ("box_px", "force_max"), [(32, True), (31, True), (32, False)], ids=["even-force-max", "odd-force-max", "marginal"]
)
def test_two_class_mixture_is_separated_and_poses_recovered(box_px: int, force_max: bool) -> None:
    data = make_set(two_references(box_px), 400, seed=1, snr=0.3, with_ctf=True)
    params = Classify2DParameters(class_count=2, force_max_over_poses_shifts=force_max, **FAST)

    result = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=5).run()

    labels = result.assignment.labels
    assert adjusted_rand_index(data.labels, labels) >= 0.95
    for c in range(2):
        members = labels == c
        # Angles are recovered up to the class average's own in-plane frame; re-centred classes share the origin.
        angle_error = _circular_error_deg(result.assignment.psi_deg[members], data.psi_deg[members])
        assert np.median(angle_error) <= 3.0
        shift_error = np.linalg.norm(result.assignment.shift_px[members] - data.shift_px[members], axis=1)
        assert np.median(shift_error) <= 0.75
    for c in range(2):
        # Each class average is one of the references, in some in-plane frame.
        reference = data.references[np.bincount(data.labels[labels == c]).argmax()]
        assert align_to_reference(result.averages[c], reference).correlation >= 0.95


def test_ctf_correction_gives_sharper_averages_than_none() -> None:
    reference = two_references(32)[:1]
    data = make_set(reference, 300, seed=2, snr=0.3, with_ctf=True)
    params = Classify2DParameters(class_count=1, online_em_iterations=3, max_resolution_a=8.0, batch_size_per_class=150)

    corrected = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=5).run()
    uncorrected = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, None, seed=5).run()

    frc_corrected = aligned_frc(corrected.averages[0], reference[0])
    frc_uncorrected = aligned_frc(uncorrected.averages[0], reference[0])
    # Shells 2..8 carry the reference's power (its blobs are a few pixels wide); the CTF zeros fall among them.
    signal = slice(2, 9)
    assert frc_corrected[signal].mean() >= frc_uncorrected[signal].mean() + 0.05
    correlation_corrected = align_to_reference(corrected.averages[0], reference[0]).correlation
    correlation_uncorrected = align_to_reference(uncorrected.averages[0], reference[0]).correlation
    assert correlation_corrected >= 0.95
    assert correlation_corrected >= correlation_uncorrected + 0.05


def test_cap_is_never_exceeded_while_an_uncapped_run_crowds_one_class() -> None:
    # 80% of the particles show one view: without a cap the classes it attracts hold most of them.
    references = two_references(32)
    data = make_set(references, 400, seed=3, snr=0.3, with_ctf=True, proportions=np.array([0.8, 0.2]))
    capped_params = Classify2DParameters(class_count=4, max_particles_per_class_mean_multiple=1.25, **FAST)
    cap = capped_params.capacity(400)
    assert cap == 125
    occupancies: list[np.ndarray] = []

    capped = Classifier2D(capped_params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=7).run(
        on_iteration=lambda state, report: occupancies.append(report.occupancy)
    )
    uncapped = Classifier2D(Classify2DParameters(class_count=4, **FAST), ArrayParticles(data.images),
                            PIXEL_SIZE_A, data.ctf, seed=7).run()

    assert capped.counts.sum() == 400 and capped.counts.max() <= cap
    assert np.bincount(capped.assignment.labels, minlength=4).max() <= cap
    # The expected occupancy inside every E-step stayed within the cap too.
    assert all(np.all(occupancy <= cap * (1 + 1e-9)) for occupancy in occupancies)
    assert uncapped.counts.max() > cap
    # Forced apart, the particles still sort by view: every capped class is (nearly) pure.
    for c in np.flatnonzero(capped.counts):
        fractions = np.bincount(data.labels[capped.assignment.labels == c], minlength=2) / capped.counts[c]
        assert fractions.max() >= 0.9


def test_the_final_pass_keeps_few_classes_per_particle_and_assigns_as_if_it_kept_all(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A cap of exactly N/K binds in the final pass: some particles must go beyond their best class.
    data = make_set(two_references(32), 300, seed=6, snr=0.3, with_ctf=True, proportions=np.array([0.8, 0.2]))
    params = Classify2DParameters(class_count=4, max_particles_per_class_count=75, **FAST)

    def run(kept_classes: int) -> ClassificationResult:
        monkeypatch.setattr(algorithm, "PASS_KEPT_CLASSES", kept_classes)
        return Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=2).run()

    every = run(4)
    with caplog.at_level("INFO", logger=algorithm.__name__):
        best_only = run(1)

    assert "scored again against every class" in caplog.text
    np.testing.assert_array_equal(np.bincount(best_only.assignment.labels, minlength=4), np.full(4, 75))
    np.testing.assert_array_equal(best_only.assignment.labels, every.assignment.labels)
    np.testing.assert_allclose(best_only.assignment.psi_deg, every.assignment.psi_deg)
    np.testing.assert_allclose(best_only.assignment.shift_px, every.assignment.shift_px)
    np.testing.assert_allclose(best_only.assignment.probability, every.assignment.probability, rtol=1e-3)
    np.testing.assert_allclose(best_only.averages, every.averages, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cap", "force_max"), [(None, True), (60, True), (60, False)], ids=["uncapped", "capped", "capped-marginal"]
)
def test_soft_full_passes_keep_few_classes_per_particle_and_insert_as_if_they_kept_all(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cap: int | None, force_max: bool
) -> None:
    data = make_set(two_references(32), 300, seed=8, snr=0.3, with_ctf=True, proportions=np.array([0.8, 0.2]))
    # Two soft full passes after the online ones, then the hard one.
    params = Classify2DParameters(class_count=6, max_particles_per_class_count=cap,
                                  force_max_over_poses_shifts=force_max,
                                  **{**FAST, "online_em_iterations": 2, "final_full_iterations": 3})

    def run(kept_classes: int) -> tuple[ClassificationResult, list[np.ndarray]]:
        monkeypatch.setattr(algorithm, "PASS_KEPT_CLASSES", kept_classes)
        occupancies: list[np.ndarray] = []
        result = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=3).run(
            on_iteration=lambda state, report: occupancies.append(report.occupancy)
        )
        return result, occupancies[2:4]  # the soft full passes' expected occupancies

    every, every_occupancy = run(6)
    with caplog.at_level("INFO", logger=algorithm.__name__):
        few, few_occupancy = run(mstep.INSERT_CLASSES)

    # The cap scales the crowded classes down until some particles belong elsewhere: those are scored again.
    assert ("soft full pass" in caplog.text) == (cap is not None)

    # A particle enters at most INSERT_CLASSES classes: keeping that many loses nothing it would insert.
    np.testing.assert_array_equal(few.assignment.labels, every.assignment.labels)
    np.testing.assert_allclose(few.averages, every.averages, rtol=1e-5, atol=1e-6 * np.abs(every.averages).max())
    for occupancy in every_occupancy:
        assert occupancy.sum() == pytest.approx(300, rel=1e-9)
    for occupancy in few_occupancy:  # less what the left-out classes hold: under MIN_INSERT_WEIGHT of a particle
        assert 300 * (1 - mstep.MIN_INSERT_WEIGHT) <= occupancy.sum() <= 300 * (1 + 1e-9)
    for occupancy in every_occupancy + few_occupancy:
        if cap is not None:
            assert np.all(occupancy <= cap + 1e-3)  # the capped E-step's tolerance, in particles
    if cap is not None:
        assert max(occupancy.max() for occupancy in every_occupancy) == pytest.approx(cap, abs=1e-3)  # it binds


def test_resumed_run_ends_equal_to_an_uninterrupted_one() -> None:
    data = make_set(two_references(32), 300, seed=4, snr=0.3, with_ctf=True)
    # Eight online iterations, so that the cap's rebalancing splits classes on both sides of the resumption.
    params = Classify2DParameters(class_count=3, max_particles_per_class_count=120,
                                  **{**FAST, "online_em_iterations": 8})
    saved: dict[int, bytes] = {}

    def keep(state: ClassificationState, report: object) -> None:
        saved[state.iteration] = state.to_bytes()

    particles = ArrayParticles(data.images)
    uninterrupted = Classifier2D(params, particles, PIXEL_SIZE_A, data.ctf, seed=9).run(on_iteration=keep)
    restarted = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=9)
    resumed = restarted.run(ClassificationState.from_bytes(saved[2]))
    assert 1 <= ClassificationState.from_bytes(saved[2]).reseeded < uninterrupted.reseeded

    np.testing.assert_array_equal(resumed.assignment.labels, uninterrupted.assignment.labels)
    np.testing.assert_array_equal(resumed.assignment.psi_deg, uninterrupted.assignment.psi_deg)
    np.testing.assert_array_equal(resumed.assignment.shift_px, uninterrupted.assignment.shift_px)
    np.testing.assert_array_equal(resumed.averages, uninterrupted.averages)
    # A state saved after the last iteration already holds the answer.
    finished = restarted.run(ClassificationState.from_bytes(saved[params.total_iterations]))
    np.testing.assert_array_equal(finished.assignment.labels, uninterrupted.assignment.labels)


def test_starving_classes_are_reseeded_from_the_largest_only_when_asked() -> None:
    data = make_set(two_references(32), 300, seed=5, snr=0.3, with_ctf=True)
    params = Classify2DParameters(class_count=5, min_particles_per_class=40, **FAST)
    result = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=11).run()
    assert result.reseeded >= 1
    assert result.counts.sum() == 300
    # Off by default, as in cryoSPARC: the same run without the minimum leaves its starving classes alone.
    plain = Classifier2D(replace(params, min_particles_per_class=None), ArrayParticles(data.images), PIXEL_SIZE_A,
                         data.ctf, seed=11).run()
    assert plain.reseeded == 0
    assert plain.counts.min() < 40


@pytest.mark.gpu
@pytest.mark.parametrize("force_max", [True, False], ids=["force-max", "marginal"])
def test_a_run_on_the_gpu_matches_the_same_run_on_the_cpu(force_max: bool) -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    data = make_set(two_references(32), 400, seed=1, snr=0.3, with_ctf=True)
    params = Classify2DParameters(class_count=3, max_particles_per_class_count=200,
                                  force_max_over_poses_shifts=force_max, **FAST)

    def run(xp: object) -> ClassificationResult:
        return Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=5, xp=xp).run()

    host, device = run(np), run(cupy)

    # The same batches and searches in float32 arithmetic of another order: equal up to poses that nearly tie.
    assert isinstance(device.averages, np.ndarray) and isinstance(device.assignment.labels, np.ndarray)
    assert np.mean(device.assignment.labels == host.assignment.labels) >= 0.99
    assert device.counts.max() <= 200
    for c in range(3):
        assert np.corrcoef(device.averages[c].ravel(), host.averages[c].ravel())[0, 1] >= 0.999
    same = device.assignment.labels == host.assignment.labels
    angle_difference = _circular_error_deg(device.assignment.psi_deg[same], host.assignment.psi_deg[same])
    assert np.median(angle_difference) <= 0.5


def _three_references(box_px: int) -> np.ndarray:
    """The two references of :func:`two_references` and a third shape: (3, D, D) float32."""
    third = blob_image(box_px, [(-4.0, -4.0, 2.0, 1.0), (5.0, 3.0, 3.0, 0.9), (-2.0, 7.0, 1.5, 0.7)])
    return np.concatenate([two_references(box_px), third[None]])


def test_the_cap_gives_a_class_it_holds_back_an_underused_class(monkeypatch: pytest.MonkeyPatch) -> None:
    # Half the particles show one shape, too many for one class at the cap: it needs two classes of the four.
    data = make_set(_three_references(32), 400, seed=6, snr=0.3, with_ctf=True,
                    proportions=np.array([0.5, 0.25, 0.25]))
    params = Classify2DParameters(class_count=4, max_particles_per_class_mean_multiple=1.5, max_resolution_a=8.0,
                                  online_em_iterations=10, batch_size_per_class=100)
    cap, underused = params.capacity(400), algorithm.REBALANCE_UNDERUSE * 400 / 4

    def run() -> ClassificationResult:
        return Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=0).run()

    rebalanced = run()
    monkeypatch.setattr(algorithm, "REBALANCE_UNDERUSE", 0.0)
    left_alone = run()

    assert rebalanced.reseeded >= 1 and left_alone.reseeded == 0
    for result in (rebalanced, left_alone):
        assert result.counts.max() <= cap
    # Left alone, the big shape's overflow sits in a second class that stays underused; rebalanced, no class is.
    assert left_alone.counts.min() < underused <= rebalanced.counts.min()
    labels = rebalanced.assignment.labels
    majority = [np.bincount(data.labels[labels == c], minlength=3).argmax() for c in range(4)]
    assert sorted(majority) == [0, 0, 1, 2]
    for c in range(4):
        assert np.mean(data.labels[labels == c] == majority[c]) >= 0.95


def test_rebalancing_splits_the_class_most_over_the_cap_into_the_least_occupied_one() -> None:
    data = make_set(_three_references(32), 400, seed=6, snr=0.3, with_ctf=True)
    params = Classify2DParameters(class_count=4, **{**FAST, "online_em_iterations": 8})
    saved: dict[int, bytes] = {}
    # States from an uncapped run (which never rebalances), handed to a capped classifier of the same set.
    Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=2).run(
        on_iteration=lambda state, report: saved.setdefault(state.iteration, state.to_bytes())
    )
    params = replace(params, max_particles_per_class_count=150)
    classifier = Classifier2D(params, ArrayParticles(data.images), PIXEL_SIZE_A, data.ctf, seed=2)
    occupancy = np.array([120.0, 60.0, 130.0, 90.0])  # class 1 under 0.75 · N/K = 75, class 3 not
    demand = np.array([100.0, 50.0, 70.0, 180.0])  # class 3 over the cap of 150

    def rebalanced(iteration: int, occupancy: np.ndarray, demand: np.ndarray) -> ClassificationState:
        state = ClassificationState.from_bytes(saved[iteration])
        state.occupancy = occupancy.copy()
        return classifier._rebalance(state, demand)

    before = ClassificationState.from_bytes(saved[2])
    assert before.sums_weight.any(axis=(0, 2, 3)).all()  # every class holds particles
    after = rebalanced(2, occupancy, demand)
    assert after.reseeded == before.reseeded + 1
    np.testing.assert_array_equal(after.occupancy, [120.0, 45.0, 130.0, 45.0])
    assert not after.sums_data[:, 1].any() and not after.sums_weight[:, 1].any()
    np.testing.assert_array_equal(after.frc[1], before.frc[3])
    for kept in (0, 2, 3):
        np.testing.assert_array_equal(after.sums_data[:, kept], before.sums_data[:, kept])
        np.testing.assert_array_equal(after.averages[kept], before.averages[kept])

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    # The new class 1 is a noisier copy of class 3 (its first half-set), no longer the old class 1.
    assert correlation(after.averages[1], before.averages[3]) >= 0.9
    assert correlation(after.averages[1], before.averages[3]) > correlation(after.averages[1], before.averages[1])
    # No split when no class is over the cap, when none is underused, or in the iterations that settle the classes.
    for iteration, occupancy_k, demand_k in [
        (2, occupancy, np.minimum(demand, 149.0)),
        (2, np.maximum(occupancy, 76.0), demand),
        (params.online_em_iterations - algorithm.REBALANCE_SETTLE_ITERATIONS, occupancy, demand),
    ]:
        unchanged = rebalanced(iteration, occupancy_k, demand_k)
        state = ClassificationState.from_bytes(saved[iteration])
        assert unchanged.reseeded == state.reseeded
        np.testing.assert_array_equal(unchanged.averages, state.averages)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"class_count": 0}, "parameters.class_count"),
        ({"class_count": 101}, "parameters.class_count"),
        ({"max_resolution_a": 7.9}, "parameters.max_resolution_a"),
        ({"circular_mask_outer_diameter_a": 130.0}, "parameters.circular_mask_outer_diameter_a"),
        ({"circular_mask_inner_diameter_a": 100.0, "circular_mask_outer_diameter_a": 90.0},
         "parameters.circular_mask_inner_diameter_a"),
        ({"max_particles_per_class_count": 9}, "parameters.max_particles_per_class_count"),
        ({"max_particles_per_class_mean_multiple": 0.5}, "parameters.max_particles_per_class_mean_multiple"),
        ({"initial_uncertainty_factor": 0.5}, "parameters.initial_uncertainty_factor"),
        ({"batch_size_per_class": 0}, "parameters.batch_size_per_class"),
        ({"final_full_iterations": 0}, "parameters.final_full_iterations"),
        ({"min_particles_per_class": 20.0}, "parameters.min_particles_per_class"),
        ({"max_particles_per_class_count": 12, "min_particles_per_class": 13.0}, "parameters.min_particles_per_class"),
    ],
)
def test_unusable_parameters_are_invalid_argument_naming_the_field(changes: dict, field: str) -> None:
    # 100 particles, box 32 at 4 Å: Nyquist 8 Å, box width 128 Å.
    params = Classify2DParameters(**{"class_count": 10, "max_resolution_a": 8.0, **changes})
    with pytest.raises(InvalidArgumentError) as caught:
        validate_parameters(params, 100, 32, PIXEL_SIZE_A)
    assert caught.value.field == field


def test_default_parameters_are_valid_for_a_typical_set() -> None:
    validate_parameters(Classify2DParameters(), 20_000, 64, 3.0)
    # Unset, the 6 Å limit gives way to a coarser Nyquist; asked for explicitly, it does not.
    assert Classify2DParameters().resolution_limit_a(4.0) == 8.0
    validate_parameters(Classify2DParameters(), 20_000, 64, 4.0)
    with pytest.raises(InvalidArgumentError):
        validate_parameters(Classify2DParameters(max_resolution_a=6.0), 20_000, 64, 4.0)


@pytest.mark.parametrize("box_px", [32, 33])
def test_half_plane_coefficients_hold_one_of_each_friedel_pair(box_px: int) -> None:
    coefficients = half_plane_coefficients(box_px, 2.0, 8.0)
    radius = frequency_radius_px(box_px, 2).ravel()
    limit = np.float32(box_px / 4)  # 8 Å at 2 Å/px on a box of D pixels: shell D / 4
    inside = np.flatnonzero(radius <= limit)
    # Every coefficient inside the limit is in the list or its mate is, never both (a self-mate counts once).
    half = box_px // 2
    ky, kx = inside // box_px - half, inside % box_px - half
    mates = ((-ky + half) % box_px) * box_px + ((-kx + half) % box_px)
    listed = set(coefficients.flat.tolist())
    assert all((i in listed) != (m in listed) or i == m for i, m in zip(inside, mates, strict=True))
    assert coefficients.flat[0] == half * box_px + half  # DC first
    assert np.all(np.diff(coefficients.radius) >= 0)
    assert coefficients.multiplicity.sum() == inside.size


@pytest.mark.parametrize("template_blocks", [[(0, 60)], [(0, 25), (25, 60)], [(0, 7), (7, 13), (13, 48), (48, 60)]])
def test_coarse_blocks_fold_to_each_class_best_angle_and_shift(template_blocks: list[tuple[int, int]]) -> None:
    # Scores (n, S, K·R1) for K = 5 classes of R1 = 12 angles, as shift terms minus a per-template offset,
    # folded whole or in template blocks that split classes, must give each class's best score with the (first)
    # arg-max angle and shift.
    rng = np.random.default_rng(len(template_blocks))
    n, n_shifts, k, r1 = 7, 4, 5, 12
    shift_terms = rng.standard_normal((n, n_shifts, k * r1)).astype(np.float32)
    offset = rng.integers(-3, 4, (n, k * r1)).astype(np.float32)
    offset[0, 3] = offset[0, 5] = 2.0
    shift_terms[0, 1, 3] = shift_terms[0, 2, 3] = shift_terms[0, 3, 5] = 11.0  # a tie over shifts and angles
    values = shift_terms - offset[:, None, :]
    best_ll = np.full((n, k), -np.inf)
    best_angle = np.zeros((n, k), dtype=np.int64)
    best_shift = np.zeros((n, k), dtype=np.int64)
    for start, stop in template_blocks:
        block = LogLikelihoodBlock(particles=slice(0, n), templates=slice(start, stop),
                                   shift_terms=shift_terms[:, :, start:stop], offset=offset[:, start:stop])
        fold_coarse_block(block, r1, best_ll, best_angle, best_shift)
    per_class = values.reshape(n, n_shifts, k, r1)
    flat = per_class.transpose(0, 2, 3, 1).reshape(n, k, -1)  # (n, K, R1·S): angle-major, then shift
    expected = np.argmax(flat, axis=2)
    np.testing.assert_array_equal(best_ll, flat.max(axis=2))
    np.testing.assert_array_equal(best_angle, expected // n_shifts)
    np.testing.assert_array_equal(best_shift, expected % n_shifts)
    assert (best_angle[0, 0], best_shift[0, 0]) == (3, 1)


def test_batch_alignments_gather_into_one_table_by_row_and_back() -> None:
    rng = np.random.default_rng(3)
    n, k, kc = 7, 4, 2

    def part(rows: np.ndarray) -> Alignment:
        b = rows.size
        return Alignment(
            class_ll=rows[:, None] + np.arange(k)[None, :] / 10.0, angle_deg=rng.random((b, k), dtype=np.float32),
            shift_px=rng.random((b, k, 2), dtype=np.float32), candidates=np.tile(np.arange(kc), (b, 1)),
            pose_angle_deg=None, pose_shift_px=None, pose_weight=None,
            residual_power=np.full(3, float(b)), residual_count=np.ones(3),
        )

    batches = [np.array([4, 5, 6]), np.array([0, 1]), np.array([2, 3])]  # out of order: rows, not arrival, place them
    parts = [(rows, part(rows)) for rows in batches]
    table = Alignment.gather(iter(parts), n)

    np.testing.assert_array_equal(table.class_ll[:, 0], np.arange(n))
    for rows, piece in parts:
        taken = table.take(rows)
        np.testing.assert_array_equal(taken.angle_deg, piece.angle_deg)
        np.testing.assert_array_equal(taken.shift_px, piece.shift_px)
        assert taken.pose_weight is None
    np.testing.assert_array_equal(table.residual_power, np.full(3, 7.0))  # summed over the batches
    np.testing.assert_array_equal(table.residual_count, np.full(3, 3.0))


def test_blob_references_are_centred() -> None:
    image = blob_image(32, [(5.0, -3.0, 2.0, 1.0)])
    coords = np.arange(32) - 16
    assert abs((image.sum(axis=0) * coords).sum() / image.sum()) < 0.05

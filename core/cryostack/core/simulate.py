"""Simulated particle images with ground truth: poses, shifts, defocus, conformation, CTF and noise.

The image model, in the platform's own conventions, is for particle ``i``

    image_i = ifft2_centered( CTF_i · phase_shift_2d( P(V_i, A_i), s_i ) ).real  +  n_i,

- ``V_i`` the volume of the particle's conformation (state, hinge angle) from a phantom
  (:mod:`cryostack.core.phantom`), ``A_i`` the RELION ZYZ rotation of ``(rot, tilt, psi)`` and ``P`` the Fourier
  central slice of :class:`cryostack.core.projection.Projector`;
- ``s_i = relion_origin_to_shift_px(origin_i) = -origin_i / pixel_size_a``: from the true ``rlnOriginXAngst/YAngst``
  with the sign of :mod:`cryostack.core.geometry` (pinned against ``relion_project``), so shifting the image by
  ``+origin_i`` recentres it, as RELION does;
- ``CTF_i`` from :func:`cryostack.core.ctf.ctf_2d` with the particle's defocus U/V/angle (CTFFIND/RELION
  convention and sign). Images are neither contrast-inverted nor otherwise flipped: the CTF module's sign is the
  model every stage of the platform fits, so a refinement sees exactly this forward model;
- ``n_i`` white Gaussian noise with one standard deviation ``σ`` for the whole dataset.

SNR definition (used once, everywhere): ``SNR = mean_i var(clean_i inside the particle disc) / σ²``, where the
particle disc radius is the largest, over the conformations at both ends of each state's hinge range, of the
radius (px) about the centre that holds 99% of the mass (:func:`cryostack.core.phantom.particle_radius_px`); the
mean runs over the first ``min(N, 512)`` particles, an i.i.d. sample of the dataset, so σ is fixed before any image
is written and does not depend on the batch size.

Continuous hinge angles are drawn on a grid of ``hinge_step_deg`` (default 2°, i.e. 31 volumes over 0–60°); the
ground truth records the exact angle each particle was rendered at. Particles are stored in random order (the
draw order); each batch groups its particles by conformation and projects each conformation's volume once per
batch, keeping recently used projectors in a memory-bounded cache.

Determinism: the ground truth comes from ``seed`` alone, and the noise of particle ``i`` from ``(seed, i)``, so a
seed gives identical output for any batch size.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import to_device, to_host
from cryostack.core.ctf import ctf_2d
from cryostack.core.fourier import ifft2_centered, phase_shift_2d
from cryostack.core.geometry import euler_to_matrix, relion_origin_to_shift_px
from cryostack.core.phantom import BlobPhantom, ConformationSource, particle_radius_px
from cryostack.core.projection import Projector
from cryostack.errors import InvalidArgumentError

# Independent random streams derived from the seed: one for the ground truth, one for the noise.
_GROUND_TRUTH_STREAM = 1
_NOISE_STREAM = 2
# Particles whose clean images fix the noise level (see the module docstring).
SNR_REFERENCE_PARTICLES = 512
SNR_DEFINITION = (
    "SNR = mean over the first min(N, 512) particles of the variance of the clean image (CTF applied) inside the "
    "particle disc, divided by the variance of the white Gaussian noise added to every pixel; the disc radius is "
    "the largest, over the conformations at both ends of each state's hinge range, of the radius that holds 99% "
    "of the mass"
)


@dataclass(frozen=True)
class ConformationState:
    """One discrete state of a scenario: with or without the domain, and the range its hinge angle is drawn from."""

    label: str
    weight: float
    domain_present: bool = True
    hinge_range_deg: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class PoseDistribution:
    """Viewing directions: uniform on SO(3), or a mixture of von Mises–Fisher clusters around preferred views.

    ``preferred_views`` are ``(rot_deg, tilt_deg)`` view directions (RELION: the direction
    ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``), chosen with equal weight; ``kappa`` is the
    concentration (angular spread about ``1/sqrt(kappa)`` radians); a fraction ``uniform_fraction`` of the particles
    has a uniform direction. The in-plane angle psi is always uniform.
    """

    preferred_views: tuple[tuple[float, float], ...] = ()
    kappa: float = 20.0
    uniform_fraction: float = 1.0


@dataclass(frozen=True)
class Scenario:
    """A named mixture of conformations and a pose distribution."""

    name: str
    states: tuple[ConformationState, ...]
    poses: PoseDistribution = field(default_factory=PoseDistribution)


SCENARIOS: dict[str, Scenario] = {
    # The user's case: a floppy domain, missing in 30% of particles, with preferred orientation.
    "floppy": Scenario(
        name="floppy",
        states=(
            ConformationState("domain_present", 0.7, True, (0.0, 60.0)),
            ConformationState("domain_absent", 0.3, False),
        ),
        poses=PoseDistribution(preferred_views=((0.0, 0.0), (0.0, 90.0), (120.0, 60.0)), kappa=20.0,
                               uniform_fraction=0.2),
    ),
    # Three clearly different discrete conformations, uniform poses.
    "three-state": Scenario(
        name="three-state",
        states=(
            ConformationState("closed", 1 / 3, True, (0.0, 0.0)),
            ConformationState("open", 1 / 3, True, (60.0, 60.0)),
            ConformationState("domain_absent", 1 / 3, False),
        ),
    ),
    # Continuous motion only, uniform poses.
    "hinge": Scenario(name="hinge", states=(ConformationState("domain_present", 1.0, True, (0.0, 60.0)),)),
}


def scenario(name: str) -> Scenario:
    """The scenario of a name in :data:`SCENARIOS`."""
    if name not in SCENARIOS:
        raise InvalidArgumentError("scenario", f"unknown scenario {name!r}; choose one of {sorted(SCENARIOS)}")
    return SCENARIOS[name]


@dataclass(frozen=True)
class SimulationParameters:
    """Everything besides the scenario and the volumes that a simulated dataset depends on."""

    n_particles: int
    box_px: int = 64
    pixel_size_a: float = 3.0
    snr: float = 0.1
    seed: int = 0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    defocus_min_a: float = 10_000.0
    defocus_max_a: float = 25_000.0
    astigmatism_max_a: float = 400.0
    shift_sigma_px: float = 2.0
    hinge_step_deg: float = 2.0

    def __post_init__(self) -> None:
        checks = {
            "n_particles": self.n_particles >= 1,
            "box_px": self.box_px >= 8,
            "pixel_size_a": self.pixel_size_a > 0,
            "snr": self.snr > 0 and math.isfinite(self.snr),
            "seed": self.seed >= 0,
            "voltage_kv": self.voltage_kv > 0,
            "cs_mm": self.cs_mm >= 0,
            "amplitude_contrast": 0 <= self.amplitude_contrast < 1,
            "defocus_min_a": 0 < self.defocus_min_a <= self.defocus_max_a,
            "astigmatism_max_a": 0 <= self.astigmatism_max_a < 2 * self.defocus_min_a,
            "shift_sigma_px": self.shift_sigma_px >= 0,
            "hinge_step_deg": self.hinge_step_deg > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidArgumentError(name, f"out of range: {getattr(self, name)!r}")

    def as_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class GroundTruth:
    """Per-particle truth, every array ``(N,)``; angles RELION ZYZ, origins as ``rlnOriginXAngst/YAngst``."""

    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    origin_x_a: np.ndarray
    origin_y_a: np.ndarray
    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_deg: np.ndarray
    state: np.ndarray  # (N,) int index into the scenario's states
    domain_present: np.ndarray  # (N,) bool
    hinge_angle_deg: np.ndarray  # (N,) float, NaN where the domain is absent

    def __len__(self) -> int:
        return int(self.rot_deg.shape[0])

    def columns(self) -> dict[str, np.ndarray]:
        """The fields by name, in table order."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def rotations(self, indices: np.ndarray | slice) -> np.ndarray:
        """Rotation matrices of the selected particles: (B, 3, 3) float64."""
        return euler_to_matrix(self.rot_deg[indices], self.tilt_deg[indices], self.psi_deg[indices])

    def view_directions(self) -> np.ndarray:
        """Unit viewing directions ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``: (N, 3) float64."""
        return _direction(self.rot_deg, self.tilt_deg)


def _direction(rot_deg: np.ndarray, tilt_deg: np.ndarray) -> np.ndarray:
    """RELION's view direction of (rot, tilt) in degrees: (..., 3) float64."""
    rot, tilt = np.deg2rad(rot_deg), np.deg2rad(tilt_deg)
    return np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=-1)


def hinge_levels_deg(state: ConformationState, step_deg: float) -> np.ndarray:
    """The hinge angles a state's particles are rendered at: its range on a grid of at most ``step_deg``: (L,)."""
    if not state.domain_present:
        return np.array([np.nan])
    low, high = state.hinge_range_deg
    count = max(1, math.ceil((high - low) / step_deg - 1e-9) + 1) if high > low else 1
    return np.linspace(low, high, count)


def sample_view_directions(
    poses: PoseDistribution, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Viewing directions drawn from a pose distribution, as RELION ``(rot_deg, tilt_deg)``: two (count,) float64."""
    z = rng.uniform(-1.0, 1.0, count)
    phi = rng.uniform(-np.pi, np.pi, count)
    directions = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], axis=-1)
    if poses.preferred_views and poses.uniform_fraction < 1.0:
        clustered = rng.random(count) >= poses.uniform_fraction
        choice = rng.integers(0, len(poses.preferred_views), count)
        means = _direction(*np.asarray(poses.preferred_views, dtype=np.float64).T)[choice]  # (count, 3)
        vmf = _sample_von_mises_fisher(means, poses.kappa, rng)
        directions = np.where(clustered[:, None], vmf, directions)
    rot = np.rad2deg(np.arctan2(directions[:, 1], directions[:, 0]))
    tilt = np.rad2deg(np.arccos(np.clip(directions[:, 2], -1.0, 1.0)))
    return rot, tilt


def _sample_von_mises_fisher(means: np.ndarray, kappa: float, rng: np.random.Generator) -> np.ndarray:
    """One von Mises–Fisher draw on S² around each unit mean direction (count, 3) (Wood's inversion for 3D)."""
    count = means.shape[0]
    u = rng.random(count)
    # Inverse CDF of w = cos(angle to the mean), written to stay finite for large kappa.
    w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa
    phi = rng.uniform(0.0, 2 * np.pi, count)
    helper = np.where(np.abs(means[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e1 = np.cross(means, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(means, e1)
    radial = np.sqrt(np.clip(1.0 - w * w, 0.0, None))[:, None]
    return w[:, None] * means + radial * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)


def sample_ground_truth(scenario: Scenario, params: SimulationParameters, rng: np.random.Generator) -> GroundTruth:
    """Draw every particle's pose, origin, defocus and conformation for a scenario."""
    n = params.n_particles
    weights = np.asarray([s.weight for s in scenario.states], dtype=np.float64)
    state = rng.choice(len(scenario.states), size=n, p=weights / weights.sum()).astype(np.int32)
    hinge = np.empty(n, dtype=np.float64)
    for index, conformation in enumerate(scenario.states):
        members = np.flatnonzero(state == index)
        levels = hinge_levels_deg(conformation, params.hinge_step_deg)
        hinge[members] = levels[rng.integers(0, levels.size, members.size)]
    domain_present = np.asarray([s.domain_present for s in scenario.states])[state]
    rot, tilt = sample_view_directions(scenario.poses, n, rng)
    psi = rng.uniform(-180.0, 180.0, n)
    origin = rng.normal(0.0, params.shift_sigma_px * params.pixel_size_a, (n, 2))
    # CTFFIND convention: U is the larger defocus, along the angle; the mean defocus is uniform over the range.
    mean_defocus = rng.uniform(params.defocus_min_a, params.defocus_max_a, n)
    astigmatism = rng.uniform(0.0, params.astigmatism_max_a, n)
    defocus_angle = rng.uniform(0.0, 180.0, n)
    return GroundTruth(
        rot_deg=rot,
        tilt_deg=tilt,
        psi_deg=psi,
        origin_x_a=origin[:, 0],
        origin_y_a=origin[:, 1],
        defocus_u_a=mean_defocus + astigmatism / 2,
        defocus_v_a=mean_defocus - astigmatism / 2,
        defocus_angle_deg=defocus_angle,
        state=state,
        domain_present=domain_present,
        hinge_angle_deg=hinge,
    )


def render_clean_images(projector: Projector, rotations: Any, ctf: Any, shifts_px: Any) -> Any:
    """CTF-modulated, shifted projections of one volume, (B, D, D) float32 in real space.

    ``rotations`` (B, 3, 3), ``ctf`` (B, D, D) and ``shifts_px`` (B, 2) live on the projector's device.
    """
    slices = projector.project(rotations)  # (B, D, D) complex64, centred
    return ifft2_centered(phase_shift_2d(slices * ctf, shifts_px)).real.astype(np.float32)


def white_noise(seed: int, indices: np.ndarray, box_px: int) -> np.ndarray:
    """Standard normal noise of the given particles, each from its own stream ``(seed, index)``: (B, D, D) float32."""
    noise = np.empty((indices.size, box_px, box_px), dtype=np.float32)
    for row, index in enumerate(indices):
        stream = np.random.SeedSequence(seed, spawn_key=(_NOISE_STREAM, int(index)))
        noise[row] = np.random.Generator(np.random.PCG64(stream)).standard_normal((box_px, box_px), np.float32)
    return noise


def disc_mask(box_px: int, radius_px: float) -> np.ndarray:
    """Pixels within ``radius_px`` of the image origin ``D // 2``: (D, D) bool."""
    k = np.arange(box_px) - box_px // 2
    return (k[:, None] ** 2 + k[None, :] ** 2) <= radius_px**2


@dataclass(frozen=True)
class ParticleBatch:
    """A contiguous run of simulated particles: indices ``start .. start + B``, noisy images (B, D, D) float32."""

    start: int
    images: np.ndarray


class ParticleSimulator:
    """Draws a dataset's ground truth and renders its particle images in memory-bounded batches.

    ``source`` supplies the volumes (the built-in :class:`BlobPhantom` by default); ``xp`` chooses where
    projection runs (numpy or cupy); images come back on the host. ``cache_bytes`` bounds the memory held by
    projectors of recently used conformations.
    """

    def __init__(
        self,
        scenario: Scenario,
        params: SimulationParameters,
        source: ConformationSource | None = None,
        xp: ModuleType = np,
        cache_bytes: int = 768 * 1024**2,
    ) -> None:
        source = source if source is not None else BlobPhantom(params.box_px)
        if source.box_px != params.box_px:
            raise InvalidArgumentError("box_px", f"volume source box {source.box_px} differs from {params.box_px}")
        self.scenario = scenario
        self.params = params
        self.source = source
        self.xp = xp
        stream = np.random.SeedSequence(params.seed, spawn_key=(_GROUND_TRUTH_STREAM,))
        self.ground_truth = sample_ground_truth(scenario, params, np.random.Generator(np.random.PCG64(stream)))
        # Conformations as (domain_present, hinge_angle_deg); each particle points to one.
        present = self.ground_truth.domain_present
        hinge_key = np.where(present, self.ground_truth.hinge_angle_deg, -1.0)
        keys, self.conformation_index = np.unique(np.stack([present, hinge_key], axis=1), axis=0, return_inverse=True)
        self.conformation_index = self.conformation_index.reshape(-1)  # (N,) int
        self.conformations: list[tuple[bool, float]] = [(bool(p), float(h)) for p, h in keys]
        projector_bytes = 8 * (2 * params.box_px + 2) ** 3  # complex64 table of the 2x padded volume
        self._cache_capacity = max(1, cache_bytes // projector_bytes)
        self._projectors: collections.OrderedDict[int, Projector] = collections.OrderedDict()
        self._noise_sigma: float | None = None
        self._particle_radius_px: float | None = None

    def volume(self, conformation: int) -> np.ndarray:
        """The volume of one entry of :attr:`conformations`: (D, D, D) float32 on the host."""
        present, hinge = self.conformations[conformation]
        return self.source.volume(hinge if present else 0.0, domain_present=present)

    def _projector(self, conformation: int) -> Projector:
        """The projector of a conformation, from the LRU cache or freshly built."""
        if conformation in self._projectors:
            self._projectors.move_to_end(conformation)
            return self._projectors[conformation]
        projector = Projector(to_device(self.volume(conformation), self.xp))
        self._projectors[conformation] = projector
        if len(self._projectors) > self._cache_capacity:
            self._projectors.popitem(last=False)
        return projector

    def clean_images(self, start: int, stop: int) -> Any:
        """Noise-free images of particles ``start .. stop`` (B, D, D) float32, on the device of ``xp``."""
        xp, params, truth = self.xp, self.params, self.ground_truth
        stop = min(stop, len(truth))
        rows = slice(start, stop)
        rotations = to_device(truth.rotations(rows), xp)  # (B, 3, 3)
        ctf = ctf_2d(
            params.box_px, params.pixel_size_a,
            to_device(truth.defocus_u_a[rows], xp), to_device(truth.defocus_v_a[rows], xp),
            to_device(truth.defocus_angle_deg[rows], xp),
            params.voltage_kv, params.cs_mm, params.amplitude_contrast,
        )  # (B, D, D)
        origins = np.stack([truth.origin_x_a[rows], truth.origin_y_a[rows]], axis=1)  # (B, 2) Å
        shifts_px = to_device(relion_origin_to_shift_px(origins, params.pixel_size_a), xp)  # (B, 2)
        images = xp.empty((stop - start, params.box_px, params.box_px), dtype=np.float32)
        batch_conformations = self.conformation_index[rows]
        # Grouping by conformation lets each volume be projected once per batch; cached projectors go first, so
        # a cache smaller than the number of conformations rebuilds only the shortfall, not every projector.
        needed = sorted(np.unique(batch_conformations).tolist(), key=lambda c: c not in self._projectors)
        for conformation in needed:
            members = to_device(np.flatnonzero(batch_conformations == conformation), xp)
            images[members] = render_clean_images(
                self._projector(conformation), rotations[members], ctf[members], shifts_px[members]
            )
        return images

    @property
    def particle_radius_px(self) -> float:
        """Radius (px) of the disc the SNR is measured in (see the module docstring)."""
        if self._particle_radius_px is None:
            self._particle_radius_px = max(particle_radius_px(self.volume(c)) for c in self._extreme_conformations())
        return self._particle_radius_px

    def _extreme_conformations(self) -> list[int]:
        """The first and last conformation with and without the domain: the ends of the hinge ranges."""
        by_presence: dict[bool, list[int]] = {}
        for index, (present, _) in enumerate(self.conformations):
            by_presence.setdefault(present, []).append(index)
        ends = {members[0] for members in by_presence.values()} | {members[-1] for members in by_presence.values()}
        return sorted(ends)

    @property
    def noise_sigma(self) -> float:
        """Standard deviation of the added noise, from the SNR definition in the module docstring."""
        if self._noise_sigma is None:
            count = min(len(self.ground_truth), SNR_REFERENCE_PARTICLES)
            mask = disc_mask(self.params.box_px, self.particle_radius_px)
            clean = to_host(self.clean_images(0, count))[:, mask]  # (count, pixels in disc)
            signal_variance = float(np.mean(np.var(clean.astype(np.float64), axis=1)))
            self._noise_sigma = math.sqrt(signal_variance / self.params.snr)
        return self._noise_sigma

    def images(self, start: int, stop: int) -> np.ndarray:
        """Noisy images of particles ``start .. stop``: (B, D, D) float32 on the host."""
        stop = min(stop, len(self.ground_truth))
        clean = to_host(self.clean_images(start, stop))
        noise = white_noise(self.params.seed, np.arange(start, stop), self.params.box_px)
        return clean + np.float32(self.noise_sigma) * noise

    def batches(self, batch_size: int = 1024) -> Iterator[ParticleBatch]:
        """All particles in order, ``batch_size`` at a time."""
        if batch_size < 1:
            raise InvalidArgumentError("batch_size", f"must be positive, got {batch_size}")
        for start in range(0, len(self.ground_truth), batch_size):
            yield ParticleBatch(start, self.images(start, start + batch_size))

    def ground_truth_maps(self) -> dict[str, np.ndarray]:
        """True maps by name, each (D, D, D) float32: per state (at the ends and middle of a hinge range) and the mean.

        Names: ``state{i}_{label}`` for a fixed conformation, ``state{i}_{label}_hinge{deg:03d}`` along a hinge range,
        and ``mean`` (the particle-weighted average of every rendered conformation: what a consensus map converges to).
        """
        maps: dict[str, np.ndarray] = {}
        for index, state in enumerate(self.scenario.states):
            stem = f"state{index}_{state.label}"
            low, high = state.hinge_range_deg
            if not state.domain_present or high == low:
                maps[stem] = self.source.volume(low, domain_present=state.domain_present)
                continue
            for angle in (low, (low + high) / 2, high):
                maps[f"{stem}_hinge{round(angle):03d}"] = self.source.volume(angle)
        counts = np.bincount(self.conformation_index, minlength=len(self.conformations))
        mean = np.zeros((self.params.box_px,) * 3, dtype=np.float64)
        for conformation in np.flatnonzero(counts):
            mean += counts[conformation] * self.volume(int(conformation))
        maps["mean"] = (mean / counts.sum()).astype(np.float32)
        return maps

"""Small simulated particle sets with ground truth for the ab-initio tests (in memory, core simulator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryostack.core.ctf import CtfParameters
from cryostack.core.simulate import ConformationState, ParticleSimulator, Scenario, SimulationParameters
from cryostack.core.spectra import ParticleSpectra, SpectralLayout, collect_spectra
from cryostack.services.abinitio.parameters import AbinitioParameters

# One rigid conformation (the phantom with its domain closed).
SINGLE = Scenario(name="single", states=(ConformationState("closed", 1.0, True, (0.0, 0.0)),))
# Two clearly different conformations: the domain present, or absent.
TWO_STATES = Scenario(
    name="two-states",
    states=(ConformationState("closed", 0.5, True, (0.0, 0.0)), ConformationState("absent", 0.5, False)),
)


@dataclass(frozen=True)
class SimulatedSet:
    """A simulated particle set in memory, with the truth it was drawn from."""

    images: np.ndarray  # (N, D, D) float32
    ctf: CtfParameters
    pixel_size_a: float
    state: np.ndarray  # (N,) int true conformation
    rotations: np.ndarray  # (N, 3, 3) true poses (RELION matrices)
    maps: list[np.ndarray]  # true volume of each state, (D, D, D) float32

    def spectra(self, params: AbinitioParameters) -> ParticleSpectra:
        """The particles' kept coefficients for a run with ``params``."""
        box = self.images.shape[-1]
        layout = SpectralLayout.for_resolution(box, self.pixel_size_a, params.max_resolution_a)
        rows = np.arange(self.images.shape[0])
        return collect_spectra([(rows, self.images)], rows.size, self.ctf, layout)


def simulate(scenario: Scenario, n_particles: int, *, box_px: int = 32, pixel_size_a: float = 6.0,
             snr: float = 0.1, seed: int = 0, shift_sigma_px: float = 1.0) -> SimulatedSet:
    """Render a scenario with the core simulator (CTF always on; a huge SNR stands for clean projections)."""
    params = SimulationParameters(n_particles=n_particles, box_px=box_px, pixel_size_a=pixel_size_a, snr=snr,
                                  seed=seed, shift_sigma_px=shift_sigma_px)
    simulator = ParticleSimulator(scenario, params)
    images = simulator.images(0, n_particles)
    truth = simulator.ground_truth
    ones = np.ones(n_particles)
    ctf = CtfParameters(
        defocus_u_a=truth.defocus_u_a, defocus_v_a=truth.defocus_v_a, defocus_angle_deg=truth.defocus_angle_deg,
        voltage_kv=params.voltage_kv * ones, cs_mm=params.cs_mm * ones,
        amplitude_contrast=params.amplitude_contrast * ones, phase_shift_deg=0 * ones, bfactor_a2=0 * ones,
    )
    maps = [
        simulator.source.volume(state.hinge_range_deg[0], domain_present=state.domain_present)
        for state in scenario.states
    ]
    return SimulatedSet(images=images, ctf=ctf, pixel_size_a=pixel_size_a, state=truth.state,
                        rotations=truth.rotations(slice(None)), maps=maps)

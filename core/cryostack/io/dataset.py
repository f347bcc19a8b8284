"""Writes a simulated particle dataset, with its ground truth beside it, to the object store or a local folder.

Layout under the destination (``s3://bucket/prefix/`` or a directory; the same files either way):

- :data:`STACK_NAME` ``particles.mrcs``: every image, float32, in particle order;
- :data:`PARTICLES_STAR` ``particles.star``: the input set, RELION 3.1 (optics: voltage, Cs, amplitude contrast,
  pixel size, box size; particles: ``rlnImageName`` ``i@particles.mrcs`` relative to the STAR, defocus U/V/angle).
  It carries no pose, origin or class, so nothing downstream can read the answer from it;
- :data:`GROUND_TRUTH_STAR` ``ground_truth/particles.star``: the same table plus the true ``rlnAngleRot/Tilt/Psi``,
  ``rlnOriginXAngst/YAngst`` and ``rlnClassNumber`` (state + 1), readable by any RELION-style tool;
- :data:`GROUND_TRUTH_CSV` ``ground_truth/particles.csv``: one row per particle with :data:`GROUND_TRUTH_COLUMNS`;
- ``ground_truth/maps/<name>.mrc``: the true maps of
  :meth:`~cryostack.core.simulate.ParticleSimulator.ground_truth_maps` (per state, along the hinge, the mean);
- :data:`SIMULATION_JSON` ``simulation.json``: scenario, parameters, seed, SNR definition and noise level, the
  conventions of the image model, and the list of files. It is written last: its presence means the dataset is
  complete.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from cryostack.core.simulate import SNR_DEFINITION, GroundTruth, ParticleSimulator
from cryostack.errors import InvalidArgumentError
from cryostack.io.mrc import MRC_CONTENT_TYPE, encode_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import StackWriter
from cryostack.io.star import STAR_CONTENT_TYPE, ParticleTable, star_bytes
from cryostack.io.uri import SCHEME, S3Uri

STACK_NAME = "particles.mrcs"
PARTICLES_STAR = "particles.star"
GROUND_TRUTH_STAR = "ground_truth/particles.star"
GROUND_TRUTH_CSV = "ground_truth/particles.csv"
MAPS_FOLDER = "ground_truth/maps"
SIMULATION_JSON = "simulation.json"
FORMAT = "cryostack-simulation/1"

# Column of the ground-truth CSV -> what it holds.
GROUND_TRUTH_COLUMNS: dict[str, str] = {
    "index": "0-based particle index (row of particles.star, section of the stack)",
    "image_name": "rlnImageName of the particle",
    "rot_deg": "rlnAngleRot, RELION ZYZ, degrees",
    "tilt_deg": "rlnAngleTilt, degrees",
    "psi_deg": "rlnAnglePsi, degrees",
    "origin_x_a": "rlnOriginXAngst, Å (RELION sign: the particle centre is at -origin; a +origin shift recentres it)",
    "origin_y_a": "rlnOriginYAngst, Å",
    "defocus_u_a": "rlnDefocusU, Å",
    "defocus_v_a": "rlnDefocusV, Å",
    "defocus_angle_deg": "rlnDefocusAngle, degrees",
    "state": "0-based index of the scenario state",
    "state_label": "name of the state",
    "domain_present": "1 when the flexible domain is present, else 0",
    "hinge_angle_deg": "hinge angle the particle was rendered at, degrees (empty when the domain is absent)",
}

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SimulatedDataset:
    """Where a simulated dataset was written: its root (URI or folder) and the files under it (relative)."""

    location: str
    particles_star: str
    files: tuple[str, ...]
    n_particles: int
    noise_sigma: float


def default_batch_size(box_px: int) -> int:
    """Particles rendered per batch: about 16 MiB of float32 images (1024 at box 64), between 16 and 4096."""
    return int(min(4096, max(16, (4 * 1024**2) // (box_px * box_px))))


class _Destination(Protocol):
    """Where the files go: whole objects, or a streamed stack, named relative to the dataset's root."""

    location: str

    def put(self, relative: str, payload: bytes, content_type: str) -> None: ...

    def stack_writer(self, relative: str, box_px: int, pixel_size_a: float, count: int) -> StackWriter: ...

    def address(self, relative: str) -> str: ...


class _StoreDestination:
    def __init__(self, store: ObjectStore, prefix: S3Uri) -> None:
        self.store = store
        self.prefix = prefix
        self.location = str(prefix.join(""))
        store.ensure_bucket(prefix.bucket)

    def address(self, relative: str) -> str:
        return str(self.prefix.join(relative))

    def put(self, relative: str, payload: bytes, content_type: str) -> None:
        self.store.put_bytes(self.prefix.join(relative), payload, content_type)

    def stack_writer(self, relative: str, box_px: int, pixel_size_a: float, count: int) -> StackWriter:
        return StackWriter(self.store, self.prefix.join(relative), box_px=box_px, pixel_size_a=pixel_size_a,
                           expected_count=count)


class _FolderDestination:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.location = str(folder)
        folder.mkdir(parents=True, exist_ok=True)

    def address(self, relative: str) -> str:
        return str(self.folder / relative)

    def put(self, relative: str, payload: bytes, content_type: str) -> None:
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".partial")
        temporary.write_bytes(payload)
        os.replace(temporary, target)

    def stack_writer(self, relative: str, box_px: int, pixel_size_a: float, count: int) -> StackWriter:
        return StackWriter.to_file(self.folder / relative, box_px=box_px, pixel_size_a=pixel_size_a,
                                   expected_count=count)


def _destination(destination: S3Uri | str | os.PathLike[str], store: ObjectStore | None) -> _Destination:
    """An ``s3://`` URI (which needs a store) or a local folder."""
    if isinstance(destination, S3Uri) or (isinstance(destination, str) and destination.startswith(SCHEME)):
        if store is None:
            raise InvalidArgumentError("destination", f"{destination} is in the object store but no store was given")
        return _StoreDestination(store, S3Uri.coerce(destination, "destination"))
    return _FolderDestination(Path(destination))


def image_names(n_particles: int, stack_name: str = STACK_NAME) -> list[str]:
    """RELION image references ``000001@particles.mrcs`` (1-based sections, zero-padded) of every particle."""
    width = max(6, len(str(n_particles)))
    return [f"{index:0{width}d}@{stack_name}" for index in range(1, n_particles + 1)]


def particle_table(simulator: ParticleSimulator, stack_name: str = STACK_NAME) -> ParticleTable:
    """The input set as a RELION 3.1 table: optics and per-particle CTF, no poses, origins or classes."""
    params, truth = simulator.params, simulator.ground_truth
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [params.voltage_kv],
        "rlnSphericalAberration": [params.cs_mm],
        "rlnAmplitudeContrast": [params.amplitude_contrast],
        "rlnImagePixelSize": [params.pixel_size_a],
        "rlnImageSize": [params.box_px],
        "rlnImageDimensionality": [2],
    })
    particles = pd.DataFrame({
        "rlnImageName": image_names(len(truth), stack_name),
        "rlnOpticsGroup": np.ones(len(truth), dtype=np.int64),
        "rlnDefocusU": truth.defocus_u_a,
        "rlnDefocusV": truth.defocus_v_a,
        "rlnDefocusAngle": truth.defocus_angle_deg,
        "rlnPhaseShift": np.zeros(len(truth)),
        "rlnCtfBfactor": np.zeros(len(truth)),
    })
    return ParticleTable(optics, particles, PARTICLES_STAR)


def ground_truth_table(simulator: ParticleSimulator, stack_name: str = STACK_NAME) -> ParticleTable:
    """The input set plus the true poses, origins and class (state + 1): what a perfect refinement would return."""
    truth = simulator.ground_truth
    return particle_table(simulator, stack_name).with_columns({
        "rlnAngleRot": truth.rot_deg,
        "rlnAngleTilt": truth.tilt_deg,
        "rlnAnglePsi": truth.psi_deg,
        "rlnOriginXAngst": truth.origin_x_a,
        "rlnOriginYAngst": truth.origin_y_a,
        "rlnClassNumber": truth.state.astype(np.int64) + 1,
    })


def ground_truth_frame(simulator: ParticleSimulator, stack_name: str = STACK_NAME) -> pd.DataFrame:
    """The per-particle ground truth as a table with the columns of :data:`GROUND_TRUTH_COLUMNS`."""
    truth: GroundTruth = simulator.ground_truth
    labels = np.asarray([state.label for state in simulator.scenario.states], dtype=object)
    frame = pd.DataFrame({
        "index": np.arange(len(truth)),
        "image_name": image_names(len(truth), stack_name),
        **{name: values for name, values in truth.columns().items()
           if name not in ("state", "domain_present", "hinge_angle_deg")},
        "state": truth.state,
        "state_label": labels[truth.state],
        "domain_present": truth.domain_present.astype(np.int64),
        "hinge_angle_deg": truth.hinge_angle_deg,
    })
    return frame[list(GROUND_TRUTH_COLUMNS)]


def read_ground_truth_csv(payload: bytes | str) -> pd.DataFrame:
    """Parse a ground-truth CSV written by :func:`write_simulated_dataset`."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    return pd.read_csv(io.StringIO(text), dtype={"image_name": str, "state_label": str})


def _description(simulator: ParticleSimulator, files: dict[str, Any], source: str) -> dict[str, Any]:
    """The content of ``simulation.json``."""
    try:
        version = metadata.version("cryostack-core")
    except metadata.PackageNotFoundError:
        version = "unknown"
    params = simulator.params
    return {
        "format": FORMAT,
        "software_version": version,
        "scenario": asdict(simulator.scenario),
        "parameters": params.as_dict(),
        "seed": params.seed,
        "n_particles": len(simulator.ground_truth),
        "volume_source": source,
        "snr": params.snr,
        "snr_definition": SNR_DEFINITION,
        "noise_sigma": simulator.noise_sigma,
        "particle_radius_px": simulator.particle_radius_px,
        "rendered_conformations": len(simulator.conformations),
        "conventions": {
            "image": "ifft2_centered(CTF * phase_shift_2d(projection, -origin / pixel_size)).real + noise",
            "euler_angles": "RELION ZYZ (rlnAngleRot, rlnAngleTilt, rlnAnglePsi), degrees",
            "origin": "rlnOriginXAngst/YAngst: the particle centre is at -origin; shifting by +origin recentres it",
            "ctf": "CTFFIND/RELION, positive at low frequency; protein density positive, so protein is bright",
            "volume_axes": "MRC order (z, y, x), origin at voxel D // 2",
        },
        "ground_truth_columns": GROUND_TRUTH_COLUMNS,
        "files": files,
    }


def write_simulated_dataset(
    simulator: ParticleSimulator,
    destination: S3Uri | str | os.PathLike[str],
    store: ObjectStore | None = None,
    *,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    source_description: str = "built-in blob phantom",
) -> SimulatedDataset:
    """Render every particle in batches, stream them to the stack, then write the tables, maps and description."""
    target = _destination(destination, store)
    params = simulator.params
    n_particles = len(simulator.ground_truth)
    batch = batch_size or default_batch_size(params.box_px)
    with target.stack_writer(STACK_NAME, params.box_px, params.pixel_size_a, n_particles) as stack:
        for particles in simulator.batches(batch):
            stack.write(particles.images)
            if progress is not None:
                progress(particles.start + len(particles.images), n_particles)
    target.put(PARTICLES_STAR, star_bytes(particle_table(simulator)), STAR_CONTENT_TYPE)
    target.put(GROUND_TRUTH_STAR, star_bytes(ground_truth_table(simulator)), STAR_CONTENT_TYPE)
    csv_text = ground_truth_frame(simulator).to_csv(index=False, float_format="%.10g")
    target.put(GROUND_TRUTH_CSV, csv_text.encode(), "text/csv")
    maps: dict[str, str] = {}
    for name, volume in simulator.ground_truth_maps().items():
        maps[name] = f"{MAPS_FOLDER}/{name}.mrc"
        target.put(maps[name], encode_mrc(volume, params.pixel_size_a, name=name), MRC_CONTENT_TYPE)
    files = {
        "particles_star": PARTICLES_STAR,
        "stack": STACK_NAME,
        "ground_truth_star": GROUND_TRUTH_STAR,
        "ground_truth_csv": GROUND_TRUTH_CSV,
        "maps": maps,
    }
    description = _description(simulator, files, source_description)
    # Written last: a reader that finds simulation.json finds every other file complete.
    target.put(SIMULATION_JSON, json.dumps(description, indent=2, allow_nan=False).encode(), "application/json")
    all_files = (STACK_NAME, PARTICLES_STAR, GROUND_TRUTH_STAR, GROUND_TRUTH_CSV, *maps.values(), SIMULATION_JSON)
    return SimulatedDataset(
        location=target.location,
        particles_star=target.address(PARTICLES_STAR),
        files=all_files,
        n_particles=n_particles,
        noise_sigma=simulator.noise_sigma,
    )

"""RELION STAR particle metadata: read, validate, write (RELION 3.1 layout; RELION 3.0 files are converted).

A :class:`ParticleTable` holds the ``data_optics`` table (one row per optics group) and the ``data_particles`` table
(one row per particle, columns in input order) and exposes per-particle numpy arrays with units in their names:
``defocus_u_a``, ``defocus_v_a``, ``defocus_angle_deg``, ``phase_shift_deg``, ``bfactor_a2``, ``voltage_kv``,
``cs_mm``, ``amplitude_contrast``, ``pixel_size_a``, ``box_px``; image references (``index@stack.mrcs``) come as
0-based section indices plus stack paths (:attr:`ParticleTable.image_refs`).

RELION 3.0 files (one table, optics values per particle, pixel size from ``rlnDetectorPixelSize`` [µm] ×
1e4 / ``rlnMagnification``) are converted on reading: their optics columns move to a derived optics table (one group
per distinct combination) and the particles get ``rlnOpticsGroup``. Written files are always RELION 3.1.

Validation (on reading and before writing; :class:`~cryostack.errors.InvalidArgumentError` with field
``"<source>:<column>"`` and a reason naming the table and rows):

- required particle columns :data:`REQUIRED_PARTICLE_COLUMNS` and optics columns :data:`REQUIRED_OPTICS_COLUMNS`;
- no NaN/Inf in any numeric column; pixel size and voltage > 0; amplitude contrast in [0, 1); box size > 0;
- every particle's optics group exists; all optics groups share one box size (``rlnImageSize``);
- image names of the form ``<index>@<path>`` with index ≥ 1.

Image paths of a file in the store resolve against the STAR's own folder unless they are absolute ``s3://`` URIs.
:func:`resolve_image_names` (and :meth:`ParticleTable.with_resolved_image_names`) rewrites every path to the
absolute URI it stands for (keys validated, bucket allow-list applied), keeping ``index@`` as written: a table so
rewritten resolves to the same images wherever its STAR is written, which is what lets one stage's output
``particles.star`` be the next stage's input.

``rlnImageSize`` is optional in input files; :func:`read_star` fills it from the header of the first stack of each
optics group that lacks it, so ``box_px`` is always available after reading from the store.

Writing keeps every input column and adds or overwrites result columns (:meth:`ParticleTable.with_columns`).
Floats are written with 12 significant digits and always with a decimal point or exponent (so they read back as
floats); that reproduces float32 values and inputs of up to 12 digits exactly.

Subsets (SPEC §3) are a count + seed or an explicit list of 0-based indices: :func:`subset_indices`, and
:func:`read_index_list` for an index-list object (text, one integer per line, ``#`` comments allowed); or the
particles of given class numbers (``rlnClassNumber``) of the set itself: :func:`class_rows`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryostack.core.ctf import CtfParameters
from cryostack.errors import InvalidArgumentError, NotFoundError
from cryostack.io.mrc import HEADER_BYTES, parse_header
from cryostack.io.objectstore import ObjectInfo, ObjectStore, UriLike
from cryostack.io.uri import S3Uri, check_bucket_allowed, resolve_reference

OPTICS_GROUP = "rlnOpticsGroup"
IMAGE_NAME = "rlnImageName"
CLASS_NUMBER = "rlnClassNumber"
REQUIRED_PARTICLE_COLUMNS = (IMAGE_NAME, "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
REQUIRED_OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize")
# Optics columns that RELION 3.0 files carry per particle and RELION 3.1 keeps in the optics table.
_OPTICS_COLUMNS_30 = (
    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize",
    "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnBeamTiltX", "rlnBeamTiltY",
)
# Columns kept as text even when every value looks like a number (e.g. micrograph names "1", "2").
_STRING_COLUMNS = [
    IMAGE_NAME, "rlnMicrographName", "rlnImageOriginalName", "rlnOpticsGroupName", "rlnMtfFileName",
    "rlnReferenceImage", "rlnOddZernike", "rlnEvenZernike", "rlnMicrographMovieName", "rlnCtfImage",
]
STAR_CONTENT_TYPE = "text/plain"
_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


@dataclass(frozen=True)
class ImageRefs:
    """Where each particle's image is: `index` (N,) int64 0-based section, `path` (N,) str stack path as written."""

    index: np.ndarray
    path: np.ndarray


@dataclass(frozen=True, eq=False)
class ParticleTable:
    """A validated RELION 3.1 particle set: optics table + particles table (see the module docstring)."""

    optics: pd.DataFrame
    particles: pd.DataFrame
    source: str = "particles.star"
    _joined: pd.DataFrame = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        optics = self.optics.reset_index(drop=True)
        particles = self.particles.reset_index(drop=True)
        object.__setattr__(self, "optics", optics)
        object.__setattr__(self, "particles", particles)
        _validate(optics, particles, self.source)
        lookup = optics.set_index(OPTICS_GROUP)
        rows = lookup.index.get_indexer(particles[OPTICS_GROUP])
        joined = lookup.iloc[rows].reset_index(drop=True)  # optics values per particle
        object.__setattr__(self, "_joined", joined)

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return len(self.particles)

    def column(self, name: str, default: float | None = None) -> np.ndarray:
        """Per-particle values of a particle or optics column (N,); `default` fills a missing column."""
        if name in self.particles.columns:
            return self.particles[name].to_numpy()
        if name in self._joined.columns:
            return self._joined[name].to_numpy()
        if default is not None:
            return np.full(len(self), default, dtype=np.float64)
        raise InvalidArgumentError(f"{self.source}:{name}", "column is missing")

    def _float(self, name: str, default: float | None = None) -> np.ndarray:
        return self.column(name, default).astype(np.float64)

    def ctf_parameters(self) -> CtfParameters:
        """Per-particle CTF parameters (N,) of the set, in the science core's convention."""
        return CtfParameters(
            defocus_u_a=self.defocus_u_a,
            defocus_v_a=self.defocus_v_a,
            defocus_angle_deg=self.defocus_angle_deg,
            voltage_kv=self.voltage_kv,
            cs_mm=self.cs_mm,
            amplitude_contrast=self.amplitude_contrast,
            phase_shift_deg=self.phase_shift_deg,
            bfactor_a2=self.bfactor_a2,
        )

    @property
    def defocus_u_a(self) -> np.ndarray:
        """Defocus U in Å (N,) float64."""
        return self._float("rlnDefocusU")

    @property
    def defocus_v_a(self) -> np.ndarray:
        """Defocus V in Å (N,) float64."""
        return self._float("rlnDefocusV")

    @property
    def defocus_angle_deg(self) -> np.ndarray:
        """Astigmatism angle in degrees (N,) float64."""
        return self._float("rlnDefocusAngle")

    @property
    def phase_shift_deg(self) -> np.ndarray:
        """Phase-plate phase shift in degrees (N,) float64; 0 when the column is absent."""
        return self._float("rlnPhaseShift", 0.0)

    @property
    def bfactor_a2(self) -> np.ndarray:
        """CTF B-factor in Å² (N,) float64; 0 when the column is absent."""
        return self._float("rlnCtfBfactor", 0.0)

    @property
    def voltage_kv(self) -> np.ndarray:
        """Acceleration voltage in kV (N,) float64."""
        return self._float("rlnVoltage")

    @property
    def cs_mm(self) -> np.ndarray:
        """Spherical aberration in mm (N,) float64."""
        return self._float("rlnSphericalAberration")

    @property
    def amplitude_contrast(self) -> np.ndarray:
        """Amplitude contrast fraction (N,) float64."""
        return self._float("rlnAmplitudeContrast")

    @property
    def pixel_size_a(self) -> np.ndarray:
        """Image pixel size in Å (N,) float64."""
        return self._float("rlnImagePixelSize")

    @property
    def box_px(self) -> np.ndarray:
        """Box size in pixels (N,) int64; InvalidArgumentError when no optics group states it."""
        return self.column("rlnImageSize").astype(np.int64)

    @property
    def box_size_px(self) -> int:
        """The set's single box size in pixels."""
        return int(self.box_px[0]) if len(self) else int(self.optics["rlnImageSize"].iloc[0])

    @property
    def euler_angles_deg(self) -> np.ndarray | None:
        """RELION ZYZ Euler angles rot, tilt, psi in degrees (N, 3) float64, or None when absent."""
        names = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
        if not all(name in self.particles.columns for name in names):
            return None
        return self.particles[list(names)].to_numpy(np.float64)

    @property
    def origin_xy_a(self) -> np.ndarray | None:
        """Particle origin offsets rlnOriginXAngst, rlnOriginYAngst in Å (N, 2) float64, or None when absent."""
        names = ("rlnOriginXAngst", "rlnOriginYAngst")
        if not all(name in self.particles.columns for name in names):
            return None
        return self.particles[list(names)].to_numpy(np.float64)

    @cached_property
    def image_refs(self) -> ImageRefs:
        """Per-particle 0-based section index and stack path, parsed from ``rlnImageName``."""
        parts = self.particles[IMAGE_NAME].astype(str).str.extract(_IMAGE_NAME.pattern)
        index = parts[0].astype(np.int64).to_numpy() - 1
        return ImageRefs(index=index, path=parts[1].to_numpy(dtype=object))

    def with_columns(self, columns: Mapping[str, np.ndarray | list | float | int | str]) -> ParticleTable:
        """A new table with `columns` added to (or replacing those of) the particles table."""
        particles = self.particles.copy()
        for name, values in columns.items():
            array = np.asarray(values)
            if array.ndim > 1 or (array.ndim == 1 and len(array) != len(particles)):
                raise InvalidArgumentError(f"{self.source}:{name}",
                                           f"has shape {array.shape}, expected ({len(particles)},)")
            particles[name] = values
        return ParticleTable(self.optics, particles, self.source)

    def with_optics_columns(self, columns: Mapping[str, np.ndarray | list | float | int | str]) -> ParticleTable:
        """A new table with `columns` (one value per optics group, or a scalar) set in the optics table."""
        optics = self.optics.copy()
        for name, values in columns.items():
            optics[name] = values
        return ParticleTable(optics, self.particles, self.source)

    def with_resolved_image_names(self, folder: S3Uri, allowed_buckets: Iterable[str] = ()) -> ParticleTable:
        """A new table whose image paths are the absolute ``s3://`` URIs they resolve to from `folder`."""
        field_name = f"{self.source}:{IMAGE_NAME}"
        names = resolve_image_names(self.particles[IMAGE_NAME], folder, allowed_buckets, field_name)
        return self.with_columns({IMAGE_NAME: names})

    def take(self, indices: np.ndarray | list[int]) -> ParticleTable:
        """The particles at 0-based `indices` (in that order), with the full optics table."""
        selected = np.asarray(indices, dtype=np.int64)
        if selected.size and (selected.min() < 0 or selected.max() >= len(self)):
            raise InvalidArgumentError("indices", f"indices must lie in 0..{len(self) - 1}")
        return ParticleTable(self.optics, self.particles.iloc[selected], self.source)


def _invalid(source: str, column: str, reason: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{source}:{column}", reason)


def _validate(optics: pd.DataFrame, particles: pd.DataFrame, source: str) -> None:
    for name in (*REQUIRED_PARTICLE_COLUMNS, OPTICS_GROUP):
        if name not in particles.columns:
            raise _invalid(source, name, "required column is missing from data_particles")
    for name in (*REQUIRED_OPTICS_COLUMNS, OPTICS_GROUP):
        if name not in optics.columns:
            raise _invalid(source, name, "required column is missing from data_optics")
    for table_name, table in (("data_optics", optics), ("data_particles", particles)):
        for name in table.columns:
            values = table[name]
            if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
                bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
                if bad.any():
                    rows = np.flatnonzero(bad)[:5].tolist()
                    raise _invalid(source, name, f"NaN or Inf in {table_name} rows {rows}")
            elif name in REQUIRED_PARTICLE_COLUMNS or name in REQUIRED_OPTICS_COLUMNS or name == OPTICS_GROUP:
                if name != IMAGE_NAME:
                    raise _invalid(source, name, f"{table_name} column is not numeric")
    groups = optics[OPTICS_GROUP]
    if groups.duplicated().any():
        raise _invalid(source, OPTICS_GROUP, "optics group numbers repeat in data_optics")
    missing = ~particles[OPTICS_GROUP].isin(groups)
    if missing.any():
        raise _invalid(source, OPTICS_GROUP,
                       f"particles refer to optics groups {sorted(set(particles[OPTICS_GROUP][missing]))[:5]} "
                       "absent from data_optics")
    for name in ("rlnImagePixelSize", "rlnVoltage"):
        if (optics[name] <= 0).any():
            raise _invalid(source, name, f"non-positive value {optics[name].min()} in data_optics")
    contrast = optics["rlnAmplitudeContrast"]
    if ((contrast < 0) | (contrast >= 1)).any():
        raise _invalid(source, "rlnAmplitudeContrast", "values must lie in [0, 1)")
    if "rlnImageSize" in optics.columns:
        sizes = optics["rlnImageSize"]
        if (sizes <= 0).any() or (sizes != np.round(sizes)).any():
            raise _invalid(source, "rlnImageSize", "box sizes must be positive integers")
        if sizes.nunique() > 1:
            raise _invalid(source, "rlnImageSize",
                           f"inconsistent box sizes {sorted(sizes.unique().tolist())} across optics groups")
    names = particles[IMAGE_NAME].astype(str)
    parsed = names.str.extract(_IMAGE_NAME.pattern)
    bad_names = parsed[0].isna() | (parsed[0].fillna("0").astype(np.int64) < 1) | particles[IMAGE_NAME].isna()
    if bad_names.any():
        row = int(np.flatnonzero(bad_names.to_numpy())[0])
        raise _invalid(source, IMAGE_NAME, f"row {row}: {names.iloc[row][:120]!r} is not '<index ≥ 1>@<stack path>'")


def _from_relion30(particles: pd.DataFrame, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a RELION 3.0 table into a derived optics table and a particles table with rlnOpticsGroup."""
    particles = particles.copy()
    if "rlnImagePixelSize" not in particles.columns:
        for name in ("rlnDetectorPixelSize", "rlnMagnification"):
            if name not in particles.columns:
                raise _invalid(source, "rlnImagePixelSize",
                               f"RELION 3.0 table has neither rlnImagePixelSize nor {name} to derive it from")
        magnification = particles["rlnMagnification"].to_numpy(dtype=np.float64)
        detector_pixel_um = particles["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            # Detector pixel in µm, magnification dimensionless: pixel size in Å = µm * 1e4 / mag.
            particles["rlnImagePixelSize"] = detector_pixel_um * 1e4 / magnification
    optics_columns = [name for name in _OPTICS_COLUMNS_30 if name in particles.columns]
    for name in REQUIRED_OPTICS_COLUMNS:
        if name not in optics_columns:
            raise _invalid(source, name, "required column is missing from the RELION 3.0 table")
    keys = particles[optics_columns]
    optics = keys.drop_duplicates().reset_index(drop=True)
    optics.insert(0, OPTICS_GROUP, np.arange(1, len(optics) + 1))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in range(1, len(optics) + 1)])
    group_of = keys.merge(optics, on=optics_columns, how="left")[OPTICS_GROUP].to_numpy()
    particles = particles.drop(columns=optics_columns)
    particles[OPTICS_GROUP] = group_of
    return optics, particles


def resolve_image_names(
    names: Sequence[str] | pd.Series | np.ndarray,
    folder: S3Uri,
    allowed_buckets: Iterable[str] = (),
    field_name: str = IMAGE_NAME,
) -> np.ndarray:
    """Image names ``index@path`` (N,) with each path replaced by the ``s3://`` URI it resolves to from `folder`.

    `folder` is the folder relative paths are taken from (that of the STAR they were read from); absolute URIs stay
    as they are. Every stack URI is validated (no ``..``, safe key) and its bucket checked against
    `allowed_buckets` (empty: any); a failure is InvalidArgumentError naming `field_name`. The index text is kept as
    written. Each distinct path is resolved once, so a million particles in a few stacks cost a few resolutions.
    """
    allowed = list(allowed_buckets)
    resolved: dict[str, str] = {}  # stack path as written -> absolute URI
    rewritten = np.empty(len(names), dtype=object)
    for row, name in enumerate(map(str, names)):
        index, at, path = name.strip().partition("@")
        if not at or not (index.isascii() and index.isdigit()) or not path:
            raise InvalidArgumentError(field_name, f"row {row}: {name[:120]!r} is not '<index>@<stack path>'")
        absolute = resolved.get(path)
        if absolute is None:
            stack = check_bucket_allowed(resolve_reference(folder, path, field_name), allowed, field_name)
            absolute = resolved[path] = str(stack)
        rewritten[row] = f"{index}@{absolute}"
    return rewritten


def parse_star(text: bytes | str, source: str) -> ParticleTable:
    """Parse STAR text (RELION 3.1, or 3.0 without an optics table) into a validated ParticleTable."""
    payload = text.encode() if isinstance(text, str) else bytes(text)
    with tempfile.TemporaryDirectory(prefix="cryostack-star-") as folder:
        path = Path(folder) / "input.star"
        path.write_bytes(payload)
        try:
            blocks = starfile.read(path, always_dict=True, parse_as_string=_STRING_COLUMNS)
        except Exception as error:  # noqa: BLE001  (any parser failure means the object is not a readable STAR)
            raise InvalidArgumentError(source, f"not a readable STAR file ({type(error).__name__}: {error})") from None
    tables = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    if "particles" in tables:
        if "optics" not in tables:
            raise _invalid(source, "data_optics", "RELION 3.1 file has data_particles but no data_optics table")
        return ParticleTable(tables["optics"], tables["particles"], source)
    if len(tables) == 1:
        optics, particles = _from_relion30(next(iter(tables.values())), source)
        return ParticleTable(optics, particles, source)
    raise InvalidArgumentError(source, f"no data_particles table among blocks {sorted(blocks)[:5]}")


def _format_float(value: float) -> str:
    text = format(value, ".12g")
    return text if any(mark in text for mark in ".en") else text + ".0"


def star_bytes(table: ParticleTable) -> bytes:
    """The table as RELION 3.1 STAR text (optics, then particles)."""
    optics = table.optics.copy()
    particles = table.particles.copy()
    optics.name, particles.name = "optics", "particles"
    text = starfile.to_string({"optics": optics, "particles": particles}, float_format=_format_float)
    return ("# version 30001\n" + text).encode()


def read_star(store: ObjectStore, uri: UriLike, *, fill_box_size: bool = True) -> ParticleTable:
    """Read and validate a STAR object; fills ``rlnImageSize`` from stack headers where the file lacks it."""
    target = S3Uri.coerce(uri).require_object()
    table = parse_star(store.get_bytes(target), str(target))
    if fill_box_size:
        table = _fill_box_size(table, lambda path: _store_header(store, resolve_reference(target.parent, path)))
    return table


def write_star(store: ObjectStore, uri: UriLike, table: ParticleTable) -> ObjectInfo:
    """Write `table` as a RELION 3.1 STAR object (one PUT, so never partially visible)."""
    return store.put_bytes(uri, star_bytes(table), STAR_CONTENT_TYPE)


def read_star_file(path: str | os.PathLike[str], *, fill_box_size: bool = True) -> ParticleTable:
    """Read and validate a local STAR file; stack paths are taken relative to its folder."""
    source = Path(path)
    if not source.is_file():
        raise NotFoundError(str(source), "no such file")
    table = parse_star(source.read_bytes(), str(source))
    if fill_box_size:
        table = _fill_box_size(table, lambda stack: _file_header(source.parent / stack))
    return table


def write_star_file(path: str | os.PathLike[str], table: ParticleTable) -> None:
    """Write `table` to a local RELION 3.1 STAR file, atomically."""
    target = Path(path)
    temporary = target.with_name(target.name + ".partial")
    temporary.write_bytes(star_bytes(table))
    os.replace(temporary, target)


def _store_header(store: ObjectStore, uri: S3Uri) -> bytes:
    return store.get_range(uri, 0, HEADER_BYTES)


def _file_header(path: Path) -> bytes:
    if not path.is_file():
        raise NotFoundError(str(path), "no such file")
    with open(path, "rb") as handle:
        return handle.read(HEADER_BYTES)


def _fill_box_size(table: ParticleTable, header_of: Callable[[str], bytes]) -> ParticleTable:
    """Set rlnImageSize of optics groups that lack it from the header of one of their stacks."""
    optics = table.optics
    sizes = optics["rlnImageSize"].copy() if "rlnImageSize" in optics.columns else pd.Series([0] * len(optics))
    missing = (sizes <= 0) | sizes.isna()
    if not missing.any() or len(table) == 0:
        return table
    group_of = table.particles[OPTICS_GROUP].to_numpy()
    paths = table.image_refs.path
    for row in np.flatnonzero(missing.to_numpy()):
        members = np.flatnonzero(group_of == optics[OPTICS_GROUP].iloc[row])
        if members.size == 0:
            raise _invalid(table.source, "rlnImageSize", f"optics group {optics[OPTICS_GROUP].iloc[row]} has no "
                                                         "particles to take the box size from")
        path = str(paths[members[0]])
        header = parse_header(header_of(path), path)
        if header.nx != header.ny:
            raise InvalidArgumentError(path, f"images are {header.nx} x {header.ny}, not square")
        sizes.iloc[row] = header.nx
    return table.with_optics_columns({"rlnImageSize": sizes.astype(np.int64).to_numpy()})


def subset_indices(
    n_particles: int, *, count: int | None = None, seed: int | None = None, indices: np.ndarray | None = None
) -> np.ndarray:
    """Sorted 0-based indices of a subset: `count` drawn without replacement with `seed`, or explicit `indices`."""
    if (count is None) == (indices is None):
        raise InvalidArgumentError("subset", "give either a count (with a seed) or an explicit index list")
    if indices is not None:
        chosen = np.asarray(indices)
        if chosen.ndim != 1 or not np.issubdtype(chosen.dtype, np.integer):
            raise InvalidArgumentError("subset.indices", "must be a one-dimensional list of integers")
        if chosen.size > n_particles:
            raise InvalidArgumentError("subset.indices",
                                       f"{chosen.size} indices for a set of {n_particles} particles")
        if chosen.size and (chosen.min() < 0 or chosen.max() >= n_particles):
            raise InvalidArgumentError("subset.indices", f"indices must lie in 0..{n_particles - 1}")
        if np.unique(chosen).size != chosen.size:
            raise InvalidArgumentError("subset.indices", "indices repeat")
        return np.sort(chosen.astype(np.int64))
    if count is None or count < 1:
        raise InvalidArgumentError("subset.count", f"{count} is not a positive count")
    if count > n_particles:
        raise InvalidArgumentError("subset.count", f"subset of {count} is larger than the set of {n_particles}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_particles, size=count, replace=False)).astype(np.int64)


def class_rows(table: ParticleTable, class_numbers: Sequence[int]) -> np.ndarray:
    """Sorted 0-based rows of the particles whose ``rlnClassNumber`` is one of `class_numbers`.

    Errors (InvalidArgumentError naming ``subset.class_numbers``): no class numbers, a number given twice, a table
    without a numeric ``rlnClassNumber`` column, or a class number no particle of the table has.
    """
    field_name = "subset.class_numbers"
    wanted = np.asarray(class_numbers, dtype=np.int64)
    if wanted.size == 0:
        raise InvalidArgumentError(field_name, "lists no class number")
    if np.unique(wanted).size != wanted.size:
        raise InvalidArgumentError(field_name, "class numbers repeat")
    if CLASS_NUMBER not in table.particles.columns:
        raise InvalidArgumentError(field_name, f"{table.source} has no {CLASS_NUMBER} column to select classes by")
    column = table.particles[CLASS_NUMBER]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise InvalidArgumentError(field_name, f"{table.source}:{CLASS_NUMBER} is not numeric")
    classes = column.to_numpy(dtype=np.float64)
    absent = wanted[~np.isin(wanted, classes)]
    if absent.size:
        raise InvalidArgumentError(field_name, f"no particle of {table.source} has class number(s) "
                                               f"{absent[:10].tolist()}")
    return np.flatnonzero(np.isin(classes, wanted)).astype(np.int64)


def parse_index_list(text: bytes | str, source: str) -> np.ndarray:
    """0-based indices from text with one integer per line (blank lines and '#' comments ignored)."""
    content = text.decode() if isinstance(text, bytes) else text
    values = []
    for number, line in enumerate(content.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not re.fullmatch(r"[+-]?\d+", entry):
            raise InvalidArgumentError(source, f"line {number}: {entry[:40]!r} is not an integer index")
        values.append(int(entry))
    return np.asarray(values, dtype=np.int64)


def read_index_list(store: ObjectStore, uri: UriLike) -> np.ndarray:
    """0-based indices from an index-list object (see :func:`parse_index_list`)."""
    target = S3Uri.coerce(uri).require_object()
    return parse_index_list(store.get_bytes(target), str(target))

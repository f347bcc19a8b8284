"""MRC/MRCS codec (MRC2014): header parsing and writing, corruption checks, image decoding.

Reading accepts modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16), either byte order (from the
machine stamp; files with a blank stamp are probed), files with or without the ``MAP `` identifier (older RELION
and cryoDRGN stacks leave it blank), and an extended header of any length. Decoded pixels are always float32.

Writing produces mode-2 little-endian files that ``mrcfile`` opens with ``permissive=False`` without warnings:
``MAP `` identifier, machine stamp ``0x44 0x44``, ``nversion`` 20140, voxel size through ``cella``/``mx,my,mz``,
origin in Å, and exact ``dmin/dmax/dmean/rms`` statistics. Stacks follow the MRC2014 image-stack convention
(``ispg`` 0, ``mz`` 1); volumes use ``ispg`` 1 and ``mz`` = ``nz``.

Checks raise :class:`~cryostack.errors.InvalidArgumentError` naming the object: an unsupported mode, non-positive or
absurd dimensions, an unknown identifier, axis orders other than x,y,z, an object shorter (truncated) or longer
than its header says, and NaN/Inf pixels.

Store-aware helpers (:func:`read_mrc`, :func:`write_mrc`) and local-file variants (:func:`read_mrc_file`,
:func:`write_mrc_file`) handle whole maps; particle stacks are streamed by :mod:`cryostack.io.particles`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryostack.errors import InvalidArgumentError
from cryostack.io.objectstore import ObjectInfo, ObjectStore, UriLike
from cryostack.io.uri import S3Uri

HEADER_BYTES = 1024
MAX_DIMENSION = 1 << 16
MODE_DTYPES: dict[int, str] = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
FLOAT_MODES = frozenset({2, 12})
MRC_CONTENT_TYPE = "application/octet-stream"
STATS_BLOCK = 1 << 20
_MAP_ID = b"MAP "
_LABEL = "cryostack"

# The 1024-byte MRC2014 header as 56 words plus ten 80-character labels (byte order added per file).
_HEADER_FIELDS = [
    ("nx", "i4"), ("ny", "i4"), ("nz", "i4"), ("mode", "i4"),
    ("nxstart", "i4"), ("nystart", "i4"), ("nzstart", "i4"),
    ("mx", "i4"), ("my", "i4"), ("mz", "i4"),
    ("cella", "f4", 3), ("cellb", "f4", 3),
    ("mapc", "i4"), ("mapr", "i4"), ("maps", "i4"),
    ("dmin", "f4"), ("dmax", "f4"), ("dmean", "f4"),
    ("ispg", "i4"), ("nsymbt", "i4"),
    ("extra1", "V8"), ("exttyp", "S4"), ("nversion", "i4"), ("extra2", "V84"),
    ("origin", "f4", 3), ("map", "S4"), ("machst", "u1", 4), ("rms", "f4"),
    ("nlabl", "i4"), ("label", "S80", 10),
]


def _header_dtype(byte_order: str) -> np.dtype:
    return np.dtype([(name, byte_order + kind, *shape) if kind[0] in "ifu" else (name, kind, *shape)
                     for name, kind, *shape in _HEADER_FIELDS])


@dataclass(frozen=True)
class MrcHeader:
    """The parts of an MRC header cryostack uses, with sizes derived from them."""

    nx: int
    ny: int
    nz: int
    mode: int
    byte_order: str  # '<' little-endian or '>' big-endian
    extended_header_bytes: int
    voxel_size_a: tuple[float, float, float]
    origin_a: tuple[float, float, float]
    ispg: int

    @property
    def dtype(self) -> np.dtype:
        """On-disk pixel dtype, byte order included."""
        return np.dtype(self.byte_order + MODE_DTYPES[self.mode])

    @property
    def data_offset(self) -> int:
        """Byte offset of the first pixel."""
        return HEADER_BYTES + self.extended_header_bytes

    @property
    def image_bytes(self) -> int:
        """Bytes of one nx x ny section."""
        return self.nx * self.ny * self.dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """Size of a complete file with this header."""
        return self.data_offset + self.nz * self.image_bytes

    def image_offset(self, index: int) -> int:
        """Byte offset of section `index` (0-based)."""
        return self.data_offset + index * self.image_bytes


def parse_header(raw: bytes, name: str) -> MrcHeader:
    """Parse and sanity-check the first 1024 bytes of the MRC object `name`."""
    if len(raw) < HEADER_BYTES:
        raise InvalidArgumentError(name, f"object has {len(raw)} bytes, fewer than an MRC header's {HEADER_BYTES}")
    stamp = raw[212]
    if stamp in (0x44, 0x41):
        candidates = ["<"]
    elif stamp == 0x11:
        candidates = [">"]
    else:
        candidates = ["<", ">"]
    for byte_order in candidates:
        fields = np.frombuffer(raw[:HEADER_BYTES], dtype=_header_dtype(byte_order), count=1)[0]
        if int(fields["mode"]) in MODE_DTYPES and 0 < int(fields["nx"]) <= MAX_DIMENSION:
            break
    else:
        raise InvalidArgumentError(name, f"corrupt MRC header: mode {int(fields['mode'])} is not one of "
                                         f"{sorted(MODE_DTYPES)} or the dimensions are not positive")
    nx, ny, nz = int(fields["nx"]), int(fields["ny"]), int(fields["nz"])
    if not (0 < nx <= MAX_DIMENSION and 0 < ny <= MAX_DIMENSION and 0 < nz < 2**31):
        raise InvalidArgumentError(name, f"corrupt MRC header: dimensions {nx} x {ny} x {nz}")
    if bytes(fields["map"]) not in (_MAP_ID, b""):
        raise InvalidArgumentError(name, f"corrupt MRC header: identifier {bytes(fields['map'])!r} is not 'MAP '")
    axes = (int(fields["mapc"]), int(fields["mapr"]), int(fields["maps"]))
    if axes not in ((1, 2, 3), (0, 0, 0)):
        raise InvalidArgumentError(name, f"unsupported MRC axis order {axes}; only x,y,z (1,2,3) is read")
    extended = int(fields["nsymbt"])
    if not 0 <= extended < 2**30:
        raise InvalidArgumentError(name, f"corrupt MRC header: extended header size {extended}")
    sampling = (int(fields["mx"]), int(fields["my"]), int(fields["mz"]))
    cell = tuple(float(c) for c in fields["cella"])
    voxel = tuple(c / m if m > 0 else 0.0 for c, m in zip(cell, sampling, strict=True))
    origin = tuple(float(o) for o in fields["origin"])
    return MrcHeader(nx, ny, nz, int(fields["mode"]), byte_order, extended, voxel, origin, int(fields["ispg"]))


def check_size(header: MrcHeader, object_bytes: int, name: str) -> None:
    """Raise unless an object of `object_bytes` bytes holds exactly the data its header declares."""
    expected = header.file_bytes
    if object_bytes < expected:
        raise InvalidArgumentError(
            name, f"truncated MRC: header declares {header.nx} x {header.ny} x {header.nz} mode {header.mode} "
                  f"({expected} bytes) but the object has {object_bytes} bytes")
    if object_bytes > expected:
        raise InvalidArgumentError(
            name, f"corrupt MRC: object has {object_bytes} bytes, more than the {expected} its header declares")


def decode_images(
    buffer: bytes | memoryview, header: MrcHeader, count: int, name: str, first_index: int = 0,
    check_finite: bool = True,
) -> np.ndarray:
    """Decode `count` consecutive sections to float32, shape (count, ny, nx); NaN/Inf pixels are refused."""
    raw = np.frombuffer(buffer, dtype=header.dtype, count=count * header.nx * header.ny)
    images = raw.reshape(count, header.ny, header.nx).astype(np.float32)  # (count, ny, nx) float32
    if check_finite and header.mode in FLOAT_MODES:
        check_finite_images(images, name, first_index)
    return images


def check_finite_images(images: np.ndarray, name: str, first_index: int = 0) -> None:
    """Raise InvalidArgumentError naming the first image of `images` (B, ny, nx) with a NaN or Inf pixel.

    `first_index` is the 0-based position of images[0] in its stack; the message counts from 1 like RELION.
    """
    finite = np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)  # (B,) bool
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InvalidArgumentError(name, f"image {first_index + bad + 1} (1-based) contains NaN or Inf pixels")


class RunningStats:
    """Min, max, mean and RMS deviation of data seen in chunks, in float64 (Chan's parallel variance).

    Values are folded in blocks of :data:`STATS_BLOCK` elements so that the float64 temporaries stay small.
    """

    def __init__(self) -> None:
        self.count = 0
        self.minimum = np.inf
        self.maximum = -np.inf
        self.mean = 0.0
        self._m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        """Fold the values of `values` (any shape) into the statistics."""
        flat = np.ravel(values)
        if flat.size == 0:
            return
        self.minimum = min(self.minimum, float(flat.min()))
        self.maximum = max(self.maximum, float(flat.max()))
        for start in range(0, flat.size, STATS_BLOCK):
            block = flat[start : start + STATS_BLOCK].astype(np.float64)
            n = block.size
            block_mean = float(block.mean())
            block -= block_mean
            block_m2 = float(np.dot(block, block))
            total = self.count + n
            delta = block_mean - self.mean
            self.mean += delta * n / total
            self._m2 += block_m2 + delta * delta * self.count * n / total
            self.count = total

    @property
    def rms(self) -> float:
        """Root-mean-square deviation from the mean (MRC2014's ``rms``)."""
        return float(np.sqrt(self._m2 / self.count)) if self.count else 0.0


def encode_header(
    shape_zyx: tuple[int, int, int],
    voxel_size_a: float | tuple[float, float, float],
    stats: RunningStats,
    *,
    is_stack: bool,
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> bytes:
    """A 1024-byte little-endian mode-2 MRC2014 header for data of shape (nz, ny, nx)."""
    nz, ny, nx = shape_zyx
    voxel = (voxel_size_a,) * 3 if np.isscalar(voxel_size_a) else tuple(voxel_size_a)
    if len(voxel) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel):
        raise InvalidArgumentError("voxel_size_a", f"{voxel_size_a} is not a positive finite size")
    if not all(np.isfinite(o) for o in origin_a):
        raise InvalidArgumentError("origin_a", f"{origin_a} is not finite")
    header = np.zeros(1, dtype=_header_dtype("<"))[0]
    mz = 1 if is_stack else nz
    header["nx"], header["ny"], header["nz"], header["mode"] = nx, ny, nz, 2
    header["mx"], header["my"], header["mz"] = nx, ny, mz
    header["cella"] = (voxel[0] * nx, voxel[1] * ny, voxel[2] * mz)
    header["cellb"] = (90.0, 90.0, 90.0)
    header["mapc"], header["mapr"], header["maps"] = 1, 2, 3
    header["dmin"], header["dmax"], header["dmean"] = stats.minimum, stats.maximum, stats.mean
    header["rms"] = stats.rms
    header["ispg"] = 0 if is_stack else 1
    header["nversion"] = 20140
    header["origin"] = origin_a
    header["map"] = _MAP_ID
    header["machst"] = (0x44, 0x44, 0, 0)
    header["nlabl"] = 1
    header["label"][0] = _LABEL.encode()
    return header.tobytes()


def encode_mrc(
    data: np.ndarray, voxel_size_a: float | tuple[float, float, float], *, is_stack: bool = False,
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0), name: str = "data",
) -> bytes:
    """A complete mode-2 MRC file for `data` of shape (nz, ny, nx) or (ny, nx); NaN/Inf refused."""
    array = np.asarray(data)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or min(array.shape) < 1:
        raise InvalidArgumentError(name, f"shape {np.shape(data)} is not (nz, ny, nx) or (ny, nx)")
    values = np.ascontiguousarray(array, dtype="<f4")  # (nz, ny, nx) float32
    check_finite_images(values, name)
    stats = RunningStats()
    stats.update(values)
    return encode_header(values.shape, voxel_size_a, stats, is_stack=is_stack, origin_a=origin_a) + values.tobytes()


@dataclass(frozen=True)
class MrcData:
    """A decoded MRC: float32 data (nz, ny, nx) and its header."""

    data: np.ndarray
    header: MrcHeader


def decode_mrc(raw: bytes, name: str) -> MrcData:
    """Parse, size-check and decode a whole MRC held in memory."""
    header = parse_header(raw[:HEADER_BYTES], name)
    check_size(header, len(raw), name)
    data = decode_images(memoryview(raw)[header.data_offset :], header, header.nz, name)
    return MrcData(data, header)


def read_mrc(store: ObjectStore, uri: UriLike) -> MrcData:
    """Read a whole MRC object (a map or a small stack) from the store."""
    target = S3Uri.coerce(uri)
    return decode_mrc(store.get_bytes(target), str(target))


def write_mrc(
    store: ObjectStore, uri: UriLike, volume: np.ndarray, voxel_size_a: float | tuple[float, float, float],
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> ObjectInfo:
    """Write a map (D, D, D) float32 as an MRC object; validated before anything is stored."""
    return store.put_bytes(uri, encode_mrc(volume, voxel_size_a, origin_a=origin_a, name="volume"),
                           MRC_CONTENT_TYPE)


def read_mrc_file(path: str | os.PathLike[str]) -> MrcData:
    """Read a whole local MRC file."""
    return decode_mrc(Path(path).read_bytes(), str(path))


def write_mrc_file(
    path: str | os.PathLike[str], volume: np.ndarray, voxel_size_a: float | tuple[float, float, float],
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0), *, is_stack: bool = False,
) -> None:
    """Write a map (or, with ``is_stack``, a small image stack) to a local MRC file, atomically."""
    target = Path(path)
    payload = encode_mrc(volume, voxel_size_a, is_stack=is_stack, origin_a=origin_a, name="volume")
    temporary = target.with_name(target.name + ".partial")
    temporary.write_bytes(payload)
    os.replace(temporary, target)

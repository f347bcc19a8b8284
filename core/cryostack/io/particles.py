"""Particle stacks in the object store: batched ranged reads with prefetch, and streaming stack writes.

:class:`ParticleStackReader` reads any set of particles of a :class:`~cryostack.io.star.ParticleTable`. Image
references (``index@path``) are resolved against a base folder (:meth:`ParticleStackReader.from_star` uses the
STAR's own folder) or taken as absolute ``s3://`` URIs. For each batch it issues ranged GETs of just the needed
images, grouped per stack object, with neighbouring images coalesced into one streamed request
(``ObjectStore.coalesce_gap_bytes`` / ``max_span_bytes``), copies each image into the batch as its bytes arrive, and
returns ``(batch_indices (B,) int64, images (B, D, D) float32)`` in the order asked for. :meth:`iter_batches`
reads the next ``prefetch_batches`` batches concurrently in the background while the caller works on the current
one (overlapping batches keeps the store busy between them), so memory stays at about
``(prefetch_batches + 1) x batch_size x D² x 4`` bytes plus the in-flight GETs, whatever the size of the stack.

Every stack's header is read once (one stat + one 1 KiB ranged GET) and checked: mode, dimensions, object size
against header (truncation), square images of the set's box size, and section indices within the stack. Decoded
images with NaN/Inf pixels are refused. Failures raise :class:`~cryostack.errors.InvalidArgumentError` naming the
object, or :class:`~cryostack.errors.NotFoundError` for a missing stack.

:class:`StackWriter` streams images into an ``.mrcs`` object with a multipart upload, holding a few parts in
memory (the first, the one filling, and up to two in flight). The MRC header (image count and statistics) is only known at the end, and it lives in the first bytes of the
object; the writer therefore keeps the first part (header + first images) in memory, uploads parts 2, 3, ... as they
fill, and uploads part 1 with the final header last: S3 assembles parts by number, not by upload order. A stack that
fits in one part is written with a single PUT. Images are validated (shape, finite values) before they are buffered;
any error aborts the upload, so nothing is ever visible under the URI unless the whole stack was written.
:meth:`StackWriter.to_file` writes the same format to a local file (header rewritten in place at the end, then an
atomic rename).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import cast

import numpy as np

from cryostack.errors import InvalidArgumentError
from cryostack.io.mrc import (
    HEADER_BYTES,
    MRC_CONTENT_TYPE,
    MrcHeader,
    RunningStats,
    check_finite_images,
    check_size,
    encode_header,
    parse_header,
    write_mrc,
)
from cryostack.io.objectstore import MultipartUpload, ObjectInfo, ObjectStore, UriLike
from cryostack.io.star import ParticleTable, read_star
from cryostack.io.uri import S3Uri, resolve_reference

__all__ = ["ParticleStackReader", "StackWriter", "write_stack", "write_mrc"]

NATIVE_FLOAT32 = np.dtype(np.float32)


class ParticleStackReader:
    """Batched, prefetching reader of the particle images of a ParticleTable (see the module docstring)."""

    def __init__(
        self,
        store: ObjectStore,
        table: ParticleTable,
        base_uri: UriLike,
        *,
        batch_size: int = 256,
        prefetch_batches: int = 2,
        check_finite: bool = True,
    ) -> None:
        if batch_size < 1 or prefetch_batches < 0:
            raise InvalidArgumentError("batch_size", "batch size must be ≥ 1 and prefetch depth ≥ 0")
        self.store = store
        self.table = table
        self.batch_size = batch_size
        self.prefetch_batches = prefetch_batches
        self.check_finite = check_finite
        base = S3Uri.coerce(base_uri, "base_uri")
        # A STAR object's URI stands for its folder.
        self.base_uri = base if base.is_prefix else base.parent
        refs = table.image_refs
        paths, stack_of = np.unique(refs.path.astype(str), return_inverse=True)
        self.stack_uris = [resolve_reference(self.base_uri, str(path), f"{table.source}:rlnImageName")
                           for path in paths]
        self._stack_of = stack_of.astype(np.int64)  # (N,) stack number per particle
        self._section_of = refs.index  # (N,) 0-based section per particle
        self._last_section = np.full(len(paths), -1, dtype=np.int64)  # (S,) highest section used per stack
        np.maximum.at(self._last_section, self._stack_of, self._section_of)
        self.box_px = table.box_size_px
        self._headers: dict[int, MrcHeader] = {}
        self._headers_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.table)

    def stack_header(self, stack: int) -> MrcHeader:
        """The checked header of stack number `stack` (read once, then cached)."""
        with self._headers_lock:
            known = self._headers.get(stack)
        if known is not None:
            return known
        uri = self.stack_uris[stack]
        name = str(uri)
        size = self.store.stat(uri).size
        header = parse_header(self.store.get_range(uri, 0, min(HEADER_BYTES, size)), name)
        check_size(header, size, name)
        if header.nx != header.ny or header.nx != self.box_px:
            raise InvalidArgumentError(
                name, f"images are {header.nx} x {header.ny} but the set's box size (rlnImageSize) is {self.box_px}")
        if self._last_section[stack] >= header.nz:
            raise InvalidArgumentError(
                name, f"particle refers to image {int(self._last_section[stack]) + 1} but the stack holds {header.nz}")
        with self._headers_lock:
            self._headers[stack] = header
        return header

    def _check_indices(self, indices: np.ndarray | Iterable[int]) -> np.ndarray:
        selected = np.asarray(indices)
        if selected.ndim != 1 or (selected.size and not np.issubdtype(selected.dtype, np.integer)):
            raise InvalidArgumentError("indices", "must be a one-dimensional array of integers")
        selected = selected.astype(np.int64)
        if selected.size and (selected.min() < 0 or selected.max() >= len(self)):
            raise InvalidArgumentError(
                "indices", f"indices must lie in 0..{len(self) - 1}; got {int(selected.min())}..{int(selected.max())}")
        return selected

    @classmethod
    def from_star(cls, store: ObjectStore, star_uri: UriLike, **options: int | bool) -> ParticleStackReader:
        """Read the STAR object at `star_uri` and a reader whose image paths are relative to its folder."""
        target = S3Uri.coerce(star_uri, "star_uri")
        return cls(store, read_star(store, target), target.parent, **options)

    def _load_headers(self, stacks: np.ndarray) -> None:
        missing = [int(stack) for stack in stacks if int(stack) not in self._headers]
        if len(missing) == 1:
            self.stack_header(missing[0])
        elif missing:
            with ThreadPoolExecutor(min(len(missing), self.store.max_concurrency)) as pool:
                list(pool.map(self.stack_header, missing))

    def read(self, indices: np.ndarray | Iterable[int]) -> np.ndarray:
        """Images of the particles at 0-based `indices`, in that order: (B, D, D) float32."""
        selected = self._check_indices(indices)
        images = np.empty((selected.size, self.box_px, self.box_px), dtype=np.float32)  # (B, D, D) float32
        if selected.size == 0:
            return images
        stacks = self._stack_of[selected]  # (B,) stack number per requested particle
        sections = self._section_of[selected]  # (B,) 0-based section per requested particle
        self._load_headers(np.unique(stacks))
        headers = [self._headers[int(stack)] for stack in stacks]
        requests = [
            (self.stack_uris[int(stack)], header.image_offset(int(section)), header.image_bytes)
            for stack, section, header in zip(stacks, sections, headers, strict=True)
        ]
        pixels = self.box_px * self.box_px
        image_bytes = images.reshape(len(images), -1).view(np.uint8)  # (B, D*D*4) uint8 view of `images`

        def place(position: int, view: memoryview) -> None:
            dtype = headers[position].dtype
            if dtype == NATIVE_FLOAT32:
                image_bytes[position] = view  # the common case: a plain copy, no conversion
            else:
                images[position] = np.frombuffer(view, dtype=dtype, count=pixels).reshape(self.box_px, self.box_px)

        self.store.read_ranges(requests, place)
        if self.check_finite:
            # A NaN or Inf pixel makes its image's sum non-finite: one fast reduction finds the suspects, and an
            # exact per-pixel test of those alone rules out sums that merely overflowed float32.
            sums = np.add.reduce(images.reshape(len(images), -1), axis=1)  # (B,) float32
            for bad in np.flatnonzero(~np.isfinite(sums)):
                if not np.isfinite(images[bad]).all():
                    raise InvalidArgumentError(str(self.stack_uris[int(stacks[bad])]),
                                               f"image {int(sections[bad]) + 1} (1-based) contains NaN or Inf pixels")
        return images

    def iter_batches(
        self, indices: np.ndarray | Iterable[int] | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (batch_indices (B,) int64, images (B, D, D) float32) over `indices` (default: all particles).

        The next `prefetch_batches` batches are read concurrently in the background while the caller works on the
        current one (0: read each batch when asked). Closing the iterator early stops the prefetching.
        """
        selected = self._check_indices(np.arange(len(self)) if indices is None else indices)
        size = batch_size or self.batch_size
        batches = [selected[start : start + size] for start in range(0, selected.size, size)]
        if self.prefetch_batches == 0:
            for batch in batches:
                yield batch, self.read(batch)
            return
        yield from _prefetched(batches, self.read, self.prefetch_batches)


def _prefetched(
    batches: list[np.ndarray], read: Callable[[np.ndarray], np.ndarray], depth: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (batch, read(batch)) in order while up to `depth` later batches are read concurrently."""
    remaining = iter(batches)
    ahead: deque[tuple[np.ndarray, Future[np.ndarray]]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="cryostack-prefetch") as pool:
        try:
            for batch in itertools.islice(remaining, depth):
                ahead.append((batch, pool.submit(read, batch)))
            while ahead:
                batch, future = ahead.popleft()
                images = future.result()
                upcoming = next(remaining, None)
                if upcoming is not None:
                    ahead.append((upcoming, pool.submit(read, upcoming)))
                yield batch, images
        finally:
            # Closing early: drop what has not started; the pool's exit waits for reads already running.
            for _, future in ahead:
                future.cancel()


class _ObjectSink:
    """Bytes of a stack going to the store: first part kept back, later parts uploaded as they fill."""

    def __init__(self, store: ObjectStore, uri: S3Uri) -> None:
        self.store = store
        self.uri = uri
        self.part_size = store.part_size_bytes
        self.first = bytearray(HEADER_BYTES)  # header placeholder, then data up to one part
        self.pending = bytearray()
        self.upload: MultipartUpload | None = None
        self.next_part = 2

    def append(self, data: memoryview) -> None:
        room = self.part_size - len(self.first)
        if room > 0:
            self.first += data[:room]
            data = data[room:]
        self.pending += data
        while len(self.pending) >= self.part_size:
            with memoryview(self.pending) as view:
                part = bytes(view[: self.part_size])
            del self.pending[: self.part_size]
            self._send(part)

    def _send(self, part: bytes) -> None:
        if self.upload is None:
            self.upload = self.store.begin_multipart(self.uri, MRC_CONTENT_TYPE)
        self.upload.submit_part(self.next_part, part)
        self.next_part += 1

    def finish(self, header: bytes) -> ObjectInfo:
        self.first[:HEADER_BYTES] = header
        if self.upload is None and not self.pending:
            return self.store.put_bytes(self.uri, bytes(self.first), MRC_CONTENT_TYPE)
        if self.pending:
            self._send(bytes(self.pending))
            self.pending.clear()
        assert self.upload is not None
        self.upload.submit_part(1, bytes(self.first))
        return self.upload.complete()

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()
        self.first.clear()
        self.pending.clear()


class _FileSink:
    """Bytes of a stack going to a local file, written under a temporary name and renamed when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = path.with_name(path.name + ".partial")
        self.handle = open(self.temporary, "wb")  # noqa: SIM115  (closed in finish/abort)
        self.handle.write(bytes(HEADER_BYTES))

    def append(self, data: memoryview) -> None:
        self.handle.write(data)

    def finish(self, header: bytes) -> None:
        self.handle.seek(0)
        self.handle.write(header)
        self.handle.close()
        os.replace(self.temporary, self.path)

    def abort(self) -> None:
        self.handle.close()
        self.temporary.unlink(missing_ok=True)


class StackWriter:
    """Streams (B, D, D) images into an ``.mrcs`` stack (see the module docstring); use as a context manager."""

    def __init__(
        self,
        store: ObjectStore,
        uri: UriLike,
        *,
        box_px: int,
        pixel_size_a: float,
        expected_count: int | None = None,
    ) -> None:
        target = S3Uri.coerce(uri).require_object()
        self._setup(box_px, pixel_size_a, expected_count, str(target))
        self._sink: _ObjectSink | _FileSink = _ObjectSink(store, target)

    @classmethod
    def to_file(
        cls, path: str | os.PathLike[str], *, box_px: int, pixel_size_a: float, expected_count: int | None = None
    ) -> StackWriter:
        """A writer to a local ``.mrcs`` file instead of the store."""
        writer = cls.__new__(cls)
        writer._setup(box_px, pixel_size_a, expected_count, str(path))
        writer._sink = _FileSink(Path(path))
        return writer

    def _setup(self, box_px: int, pixel_size_a: float, expected_count: int | None, name: str) -> None:
        if not 0 < box_px <= 1 << 16:
            raise InvalidArgumentError("box_px", f"{box_px} is not a positive box size")
        if not (np.isfinite(pixel_size_a) and pixel_size_a > 0):
            raise InvalidArgumentError("pixel_size_a", f"{pixel_size_a} is not a positive pixel size")
        if expected_count is not None and expected_count < 1:
            raise InvalidArgumentError("expected_count", f"{expected_count} is not a positive count")
        self.box_px = box_px
        self.pixel_size_a = float(pixel_size_a)
        self.expected_count = expected_count
        self.name = name
        self.count = 0
        self._stats = RunningStats()
        self._closed = False

    def write(self, images: np.ndarray) -> None:
        """Append images (B, D, D) or one image (D, D); refused (nothing buffered) on a bad shape or NaN/Inf."""
        if self._closed:
            raise InvalidArgumentError(self.name, "stack writer is already closed")
        batch = np.asarray(images)
        if batch.ndim == 2:
            batch = batch[np.newaxis]
        if batch.ndim != 3 or batch.shape[1:] != (self.box_px, self.box_px):
            raise InvalidArgumentError(
                "images", f"shape {np.shape(images)} is not (B, {self.box_px}, {self.box_px}) for {self.name}")
        values = np.ascontiguousarray(batch, dtype="<f4")  # (B, D, D) float32 little-endian
        check_finite_images(values, "images", self.count)
        if self.expected_count is not None and self.count + len(values) > self.expected_count:
            raise InvalidArgumentError(
                "images", f"more than the {self.expected_count} images announced for {self.name}")
        self._stats.update(values)
        self._sink.append(memoryview(values).cast("B"))
        self.count += len(values)

    def close(self) -> ObjectInfo | None:
        """Write the header with the final count and statistics and make the stack visible.

        Returns the stored object's info (None for a local file).
        """
        if self._closed:
            raise InvalidArgumentError(self.name, "stack writer is already closed")
        if self.count == 0 or (self.expected_count is not None and self.count != self.expected_count):
            self.abort()
            wanted = self.expected_count or "at least one"
            raise InvalidArgumentError("images", f"{self.count} images written to {self.name}, {wanted} expected")
        header = encode_header((self.count, self.box_px, self.box_px), self.pixel_size_a, self._stats, is_stack=True)
        self._closed = True
        try:
            return self._sink.finish(header)
        except BaseException:
            self._sink.abort()
            raise

    def abort(self) -> None:
        """Discard everything written so far; nothing becomes visible."""
        if not self._closed:
            self._closed = True
            self._sink.abort()

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_stack(store: ObjectStore, uri: UriLike, images: np.ndarray, pixel_size_a: float) -> ObjectInfo:
    """Write images (N, D, D) as one ``.mrcs`` object (streamed in parts when large)."""
    stack = np.asarray(images)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise InvalidArgumentError("images", f"shape {stack.shape} is not (N, D, D)")
    with StackWriter(store, uri, box_px=stack.shape[1], pixel_size_a=pixel_size_a, expected_count=len(stack)) as out:
        # Validate everything first so that a bad image late in the stack never starts an upload.
        check_finite_images(stack, "images")
        chunk = max(1, store.part_size_bytes // (stack.shape[1] * stack.shape[2] * 4))
        for start in range(0, len(stack), chunk):
            out.write(stack[start : start + chunk])
        info = out.close()
    return cast(ObjectInfo, info)

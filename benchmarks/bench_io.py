"""Particle I/O from the object store against the raw S3 GET rate of the same bytes, measured in one run.

Starts an embedded SeaweedFS in a temporary folder, then:

1. in a child process (so that its memory is not counted against the reader): streams a float32 stack
   (default 16,384 images of 128², 1.07 GB) into the store with ``StackWriter`` and writes its STAR; then writes the
   same images again as RELION lays out extracted particles, one stack per micrograph (default 256 images each),
   with a second STAR;
2. in this process: raw GETs of the big stack object (one stream, and 16 MiB ranges on 8 threads) and
   ``ParticleStackReader`` reads of every particle in sequential batches, for both layouts, repeated and
   interleaved (medians reported, since the machine may be shared); then random-order batches (default 4,096
   images) and a sorted random 10 % subset, for both layouts — MB/s, images/s, the ratio to the best raw rate, and
   the peak RSS of each phase (sampled with psutil every 10 ms) next to the process's ``ru_maxrss``.

Writes ``benchmarks/results/io.json`` and deletes the data and the store afterwards.
Run: ``uv run python benchmarks/bench_io.py [--images 16384] [--box 128] [--batch 512]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from minio import Minio

from cryostack.config import ObjectStoreSettings
from cryostack.io.embedded import EmbeddedStore
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader, StackWriter
from cryostack.io.star import ParticleTable, write_star
from cryostack.io.uri import S3Uri

RESULTS = Path(__file__).resolve().parent / "results" / "io.json"
BUCKET = "bench-io"
STACK_KEY = "set/stack.mrcs"
STAR_KEY = "set/particles.star"
SPLIT_STAR_KEY = "set/particles_per_micrograph.star"
MB = 1e6
RANGE_BYTES = 16 * 1024 * 1024
RAW_THREADS = 8


class PeakRss:
    """Samples this process's resident set size on a thread; `peak_mb` is the largest seen."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_mb = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / MB)
            time.sleep(self._interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / MB)


def table_for(n_images: int, box_px: int, per_stack: int | None = None) -> ParticleTable:
    """A minimal particle table over the big stack, or over stacks of `per_stack` images."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [1.0],
        "rlnImageSize": [box_px],
    })
    names = [f"{i + 1:06d}@stack.mrcs" if per_stack is None
             else f"{i % per_stack + 1:06d}@micrographs/{i // per_stack:05d}.mrcs" for i in range(n_images)]
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnDefocusU": np.full(n_images, 15000.0), "rlnDefocusV": np.full(n_images, 14000.0),
        "rlnDefocusAngle": np.zeros(n_images), "rlnOpticsGroup": np.ones(n_images, dtype=np.int64),
    })
    return ParticleTable(optics, particles, "bench.star")


def batch_images(base: np.ndarray, first: int, count: int, n_images: int) -> np.ndarray:
    """Images first..first+count of the benchmark set (B, D, D) float32."""
    # Distinct images without paying for 1 GB of random numbers: shift a random block per batch.
    return base[:count] + np.float32(first / n_images)


def write_dataset(settings: ObjectStoreSettings, n_images: int, box_px: int, batch: int, per_stack: int,
                  out: dict) -> None:
    """Child process: stream the stack and write the STARs; reports time and this process's peak RSS."""
    store = ObjectStore(settings)
    store.ensure_bucket(BUCKET)
    base = np.random.default_rng(0).standard_normal((batch, box_px, box_px), dtype=np.float32)  # (B, D, D)
    start = time.perf_counter()
    with StackWriter(store, S3Uri(BUCKET, STACK_KEY), box_px=box_px, pixel_size_a=1.0,
                     expected_count=n_images) as writer:
        for first in range(0, n_images, batch):
            writer.write(batch_images(base, first, min(batch, n_images - first), n_images))
        info = writer.close()
    elapsed = time.perf_counter() - start
    write_star(store, S3Uri(BUCKET, STAR_KEY), table_for(n_images, box_px))
    for first in range(0, n_images, per_stack):
        count = min(per_stack, n_images - first)
        with StackWriter(store, S3Uri(BUCKET, f"set/micrographs/{first // per_stack:05d}.mrcs"), box_px=box_px,
                         pixel_size_a=1.0) as writer:
            for start_image in range(first, first + count, batch):
                writer.write(batch_images(base, start_image, min(batch, first + count - start_image), n_images))
    write_star(store, S3Uri(BUCKET, SPLIT_STAR_KEY), table_for(n_images, box_px, per_stack))
    out.update({
        "stack_bytes": info.size, "seconds": elapsed, "mb_per_s": info.size / MB / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def raw_single_stream(client: Minio, size: int) -> float:
    """Seconds to GET the whole object as one stream (1 MiB reads, discarded)."""
    start = time.perf_counter()
    response = client.get_object(BUCKET, STACK_KEY)
    received = 0
    try:
        for chunk in response.stream(1 << 20):
            received += len(chunk)
    finally:
        response.close()
        response.release_conn()
    if received != size:
        raise RuntimeError(f"raw GET returned {received} of {size} bytes")
    return time.perf_counter() - start


def raw_ranged_parallel(client: Minio, size: int) -> float:
    """Seconds to GET the whole object as 16 MiB ranges on 8 threads (each range read, then discarded)."""

    def fetch(offset: int) -> int:
        response = client.get_object(BUCKET, STACK_KEY, offset=offset, length=min(RANGE_BYTES, size - offset))
        try:
            return len(response.read())
        finally:
            response.close()
            response.release_conn()

    start = time.perf_counter()
    with ThreadPoolExecutor(RAW_THREADS) as pool:
        received = sum(pool.map(fetch, range(0, size, RANGE_BYTES)))
    if received != size:
        raise RuntimeError(f"ranged GETs returned {received} of {size} bytes")
    return time.perf_counter() - start


def timed_read(reader: ParticleStackReader, indices: np.ndarray, batch: int) -> tuple[float, float]:
    """Seconds to read `indices` in batches through the reader, and a checksum that forces use of the data."""
    start = time.perf_counter()
    checksum = 0.0
    for _, images in reader.iter_batches(indices, batch):
        checksum += float(images[:, 0, 0].sum())
    return time.perf_counter() - start, checksum


def measure(name: str, run: Callable[[], float], payload_bytes: int, n_images: int | None) -> dict:
    """Run one phase under the RSS sampler and report its rates."""
    with PeakRss() as rss:
        seconds = run()
    result = {"phase": name, "seconds": seconds, "mb_per_s": payload_bytes / MB / seconds,
              "peak_rss_mb": rss.peak_mb}
    if n_images is not None:
        result["images_per_s"] = n_images / seconds
    print(json.dumps(result))
    return result


def main() -> None:
    """Run the benchmark and write benchmarks/results/io.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16_384)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--per-stack", type=int, default=256, help="images per micrograph stack (second layout)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the streaming phases")
    parser.add_argument("--random-images", type=int, default=4096, help="images read in random order")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cryostack-bench-io-"))
    embedded = EmbeddedStore.on_free_ports(workdir / "store")
    try:
        settings = embedded.start()
        with multiprocessing.Manager() as manager:
            written = manager.dict()
            writer = multiprocessing.get_context("spawn").Process(
                target=write_dataset, args=(settings, args.images, args.box, args.batch, args.per_stack, written))
            writer.start()
            writer.join()
            if writer.exitcode != 0:
                raise RuntimeError(f"writer process failed with exit code {writer.exitcode}")
            write = dict(written)
        print(json.dumps({"phase": "write", **write}))

        size = int(write["stack_bytes"])
        image_bytes = args.box * args.box * 4
        client = Minio(settings.endpoint, access_key=settings.access_key.get_secret_value(),
                       secret_key=settings.secret_key.get_secret_value(), secure=False)
        store = ObjectStore(settings)
        reader = ParticleStackReader.from_star(store, S3Uri(BUCKET, STAR_KEY), batch_size=args.batch)
        split = ParticleStackReader.from_star(store, S3Uri(BUCKET, SPLIT_STAR_KEY), batch_size=args.batch)
        reader.read([0])  # headers cached, connections open: every phase below starts warm
        split.read(np.arange(0, args.images, args.per_stack))
        rng = np.random.default_rng(args.seed)
        everything = np.arange(args.images)
        shuffled = rng.permutation(args.images)[: args.random_images]
        subset = np.sort(rng.choice(args.images, size=args.images // 10, replace=False))

        # The machine may be shared: streaming phases are repeated, interleaved, and summarised by their median.
        streaming = []
        for repeat in range(args.repeats):
            for phase in (
                measure("raw_get_single_stream", lambda: raw_single_stream(client, size), size, None),
                measure("raw_get_ranged_parallel", lambda: raw_ranged_parallel(client, size), size, None),
                measure("particles_sequential", lambda: timed_read(reader, everything, args.batch)[0],
                        args.images * image_bytes, args.images),
                measure("per_micrograph_stacks_sequential", lambda: timed_read(split, everything, args.batch)[0],
                        args.images * image_bytes, args.images),
            ):
                streaming.append({**phase, "repeat": repeat})
        random_access = [
            measure("particles_random_order", lambda: timed_read(reader, shuffled, args.batch)[0],
                    shuffled.size * image_bytes, int(shuffled.size)),
            measure("particles_random_subset_10pct", lambda: timed_read(reader, subset, args.batch)[0],
                    subset.size * image_bytes, int(subset.size)),
            measure("per_micrograph_stacks_random_order", lambda: timed_read(split, shuffled, args.batch)[0],
                    shuffled.size * image_bytes, int(shuffled.size)),
            measure("per_micrograph_stacks_random_subset_10pct", lambda: timed_read(split, subset, args.batch)[0],
                    subset.size * image_bytes, int(subset.size)),
        ]

        def median(name: str, key: str = "mb_per_s") -> float:
            return float(np.median([p[key] for p in streaming if p["phase"] == name]))

        raw_best = max(median("raw_get_single_stream"), median("raw_get_ranged_parallel"))
        summary = {
            name: {"median_mb_per_s": median(name), "peak_rss_mb": max(p["peak_rss_mb"] for p in streaming
                                                                        if p["phase"] == name)}
            for name in dict.fromkeys(p["phase"] for p in streaming)
        }
        for name, entry in summary.items():
            if not name.startswith("raw_"):
                entry["median_images_per_s"] = median(name, "images_per_s")
                entry["ratio_to_raw"] = entry["median_mb_per_s"] / raw_best
        for phase in random_access:
            phase["ratio_to_raw"] = phase["mb_per_s"] / raw_best
        report = {
            "benchmark": "io",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]},
            "parameters": {"images": args.images, "box_px": args.box, "batch": args.batch,
                           "images_per_micrograph_stack": args.per_stack, "repeats": args.repeats,
                           "random_order_images": int(shuffled.size), "random_subset_images": int(subset.size),
                           "stack_bytes": size, "object_store": "SeaweedFS weed mini (embedded, 127.0.0.1)",
                           "coalesce_gap_bytes": store.coalesce_gap_bytes, "max_span_bytes": store.max_span_bytes,
                           "max_concurrency": store.max_concurrency, "prefetch_batches": reader.prefetch_batches},
            "write": write,
            "raw_best_median_mb_per_s": raw_best,
            "summary": summary,
            "random_access": random_access,
            "streaming_runs": streaming,
            "reader_process_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "targets": {"ratio_to_raw": 0.7, "peak_rss_mb": 500},
        }
        store.delete_prefix(S3Uri(BUCKET))
        store.remove_bucket(BUCKET)
        store.close()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=1))
        print(f"wrote {RESULTS}")
    finally:
        embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

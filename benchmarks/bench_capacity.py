"""The 2D final pass's capped hard assignment at a million particles: time and peak memory.

A final pass keeps each particle's ``PASS_KEPT_CLASSES`` best classes (scores in a row-compressed table) and
solves the exact capped assignment over all K classes, scoring again the particles a relaxation sends beyond their
list (:func:`cryostack.core.capacity.capped_assignment_with_rescoring`), then the probability of
each assigned class (:func:`~cryostack.core.capacity.class_responsibilities`). This measures that
step alone, at sizes a whole classification cannot reach on a small machine, for K in ``--classes`` and caps of
``--cap-multiples`` × N/K: wall time, peak traced memory (numpy allocations, ``tracemalloc``) of the kept table
and the solve, bytes per particle, particles scored again, and the rounds that took.

Scores are synthetic, with what makes the assignment hard: every particle has a home class drawn from a skewed
popularity (the largest class is wanted by about 3 × N/K particles, so the cap binds) and a neighbouring class
close behind, ``score[i, k] = SEPARATION · [k = home] + NEIGHBOUR · [k = home + 1] + NOISE · z``, generated in
chunks from seeded streams so that any row can be generated again for the rescoring. With ``--check-particles``
(default 100,000) the same generator at that size is also solved on the dense (N, K) table and the two total scores
compared (they must be equal: the assignment is exact).

    uv run python benchmarks/bench_capacity.py [--particles 1000000] [--classes 50 200] [--cap-multiples 1.0 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from cryostack.core.capacity import (
    ClassScores,
    capped_assignment,
    capped_assignment_with_rescoring,
    class_responsibilities,
    top_class_columns,
)
from cryostack.services.classify2d.algorithm import PASS_KEPT_CLASSES

RESULTS = Path(__file__).resolve().parent / "results" / "capacity.json"
CHUNK = 20_000
SEPARATION = 30.0
NEIGHBOUR = 24.0
NOISE = 4.0
SEED = 0


class SyntheticScores:
    """Particle × class scores (see the module docstring), any rows on demand."""

    def __init__(self, n_particles: int, n_classes: int) -> None:
        self.n_particles, self.n_classes = n_particles, n_classes
        popularity = np.random.default_rng(SEED).pareto(1.5, n_classes) + 0.2
        self.popularity = popularity / popularity.sum()  # (K,)

    def chunk(self, index: int) -> np.ndarray:
        """Rows ``index · CHUNK`` … of the table: (B, K) float64."""
        rows = min(CHUNK, self.n_particles - index * CHUNK)
        rng = np.random.default_rng(np.random.SeedSequence(SEED, spawn_key=(index,)))
        home = rng.choice(self.n_classes, size=rows, p=self.popularity)
        scores = NOISE * rng.standard_normal((rows, self.n_classes))
        scores[np.arange(rows), home] += SEPARATION
        scores[np.arange(rows), (home + 1) % self.n_classes] += NEIGHBOUR
        return scores

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (V,) of the table: (V, K)."""
        out = np.empty((rows.size, self.n_classes))
        for index in np.unique(rows // CHUNK):
            inside = np.flatnonzero(rows // CHUNK == index)
            out[inside] = self.chunk(int(index))[rows[inside] - index * CHUNK]
        return out

    def n_chunks(self) -> int:
        return -(-self.n_particles // CHUNK)


def kept_classes(source: SyntheticScores) -> ClassScores:
    """Each particle's best classes, gathered chunk by chunk as the final pass does."""
    n, kept = source.n_particles, min(PASS_KEPT_CLASSES, source.n_classes)
    classes = np.empty((n, kept), dtype=np.int32)
    scores = np.empty((n, kept))
    bound = np.empty(n)
    log_mass = np.empty(n)
    for index in range(source.n_chunks()):
        table = source.chunk(index)
        rows = slice(index * CHUNK, index * CHUNK + table.shape[0])
        top, bound[rows], log_mass[rows] = top_class_columns(table, kept)
        classes[rows] = top
        scores[rows] = np.take_along_axis(table, top, axis=1)
    return ClassScores.from_columns(classes, scores, bound, log_mass, source.n_classes)


def measure(n_particles: int, n_classes: int, cap_multiple: float) -> dict[str, Any]:
    """Gather, solve and annotate once, traced."""
    source = SyntheticScores(n_particles, n_classes)
    capacity = np.full(n_classes, int(np.ceil(cap_multiple * n_particles / n_classes)))
    rescored: list[int] = []

    def score_rows(rows: np.ndarray) -> np.ndarray:
        rescored.append(int(rows.size))
        return source.rows(rows)

    tracemalloc.start()
    start = time.perf_counter()
    table = kept_classes(source)
    gathered = time.perf_counter()
    best = table.classes[table.row_start[:-1]]  # (N,) each row lists its best class first
    table_mb = tracemalloc.get_traced_memory()[0] / 2**20
    entries, final, prices = capped_assignment_with_rescoring(table, capacity, score_rows)
    solved = time.perf_counter()
    probability = class_responsibilities(final, capacity, start_log_scale=-prices)[entries]
    done = time.perf_counter()
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    labels = final.classes[entries]
    counts = np.bincount(labels, minlength=n_classes)
    wanted = np.bincount(np.argmax(source.rows(np.arange(min(n_particles, 100_000))), axis=1), minlength=n_classes)
    return {
        "particles": n_particles, "classes": n_classes, "kept_classes": PASS_KEPT_CLASSES,
        "cap": int(capacity[0]), "cap_multiple": cap_multiple,
        "largest_class_wanted_x_mean": float(wanted.max() / wanted.mean()),
        "gather_s": gathered - start, "assignment_s": solved - gathered, "probability_s": done - solved,
        "kept_table_mb": table_mb, "peak_traced_mb": peak_mb,
        "peak_bytes_per_particle": peak_mb * 2**20 / n_particles,
        "dense_table_mb_for_comparison": n_particles * n_classes * 8 / 2**20,
        "particles_scored_again": sum(rescored), "rescoring_rounds": len(rescored),
        "every_class_within_cap": bool(counts.max() <= capacity[0]),
        "moved_from_best_class": float(np.mean(labels != best)),
        "median_probability": float(np.median(probability)),
        "total_score": float(final.scores[entries].sum()),
    }


def check_exact(n_particles: int, n_classes: int, cap_multiple: float) -> dict[str, Any]:
    """The kept-classes assignment against the dense (N, K) one on the same scores."""
    source = SyntheticScores(n_particles, n_classes)
    capacity = np.full(n_classes, int(np.ceil(cap_multiple * n_particles / n_classes)))
    dense = source.rows(np.arange(n_particles))
    dense_labels = capped_assignment(dense, capacity)
    entries, final, _ = capped_assignment_with_rescoring(kept_classes(source), capacity, source.rows)
    dense_total = float(dense[np.arange(n_particles), dense_labels].sum())
    kept_total = float(final.scores[entries].sum())
    return {"particles": n_particles, "classes": n_classes, "cap_multiple": cap_multiple,
            "dense_total_score": dense_total, "kept_total_score": kept_total,
            "equal": bool(abs(dense_total - kept_total) <= 1e-9 * abs(dense_total))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--cap-multiples", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--check-particles", type=int, default=100_000, help="0: skip the dense check")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "benchmark": "capacity",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "scores": {"separation": SEPARATION, "neighbour": NEIGHBOUR, "noise": NOISE, "seed": SEED},
        "runs": [], "exactness": [],
    }
    for n_classes in args.classes:
        for multiple in args.cap_multiples:
            record = measure(args.particles, n_classes, multiple)
            print(json.dumps(record), flush=True)
            report["runs"].append(record)
            if args.check_particles:
                check = check_exact(args.check_particles, n_classes, multiple)
                print(json.dumps(check), flush=True)
                report["exactness"].append(check)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

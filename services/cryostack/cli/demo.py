"""`cryostack demo`: the per-class particle cap end to end on the embedded stack.

Starts the embedded object store unless ``CRYOSTACK_S3_ENDPOINT`` names one, simulates the user's case (the
``floppy`` scenario: rigid core, hinged domain missing from 30% of the particles, preferred orientation), runs
2D classification through the ``classify2d`` service twice — plain, then with ``max_particles_per_class`` — and
writes a report: the two montages and a table of class occupancy and per-class purity (domain present vs absent)
against the ground truth. Every step is idempotent, so a second run reuses the dataset and the finished jobs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryostack.config import ObjectStoreSettings
    from cryostack.io.objectstore import ObjectStore
    from cryostack.io.uri import S3Uri

DEMO_BUCKET = "cryostack-demo"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `demo` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="simulate a floppy protein and classify it in 2D with and without the per-class cap",
        description="Run the headline feature end to end on the embedded stack and write a report.",
    )
    parser.add_argument("--particles", type=int, default=4000, metavar="N", help="simulated particles (4000)")
    parser.add_argument("--box", type=int, default=64, metavar="D", help="box size in pixels (64)")
    parser.add_argument("--classes", type=int, default=20, metavar="K", help="2D classes (20)")
    parser.add_argument("--cap-multiple", type=float, default=1.5, metavar="X",
                        help="cap per class as a multiple of N/K (1.5)")
    parser.add_argument("--online-iterations", type=int, default=12, metavar="N", help="online-EM iterations (12)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of data and jobs (0)")
    parser.add_argument("--report-dir", type=Path, default=Path(".cryostack/demo"), metavar="DIR",
                        help="where the report and montages are written (.cryostack/demo)")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class ClassificationSummary:
    """What the report says of one classification run."""

    label: str
    cap: int | None
    counts: list[int]  # (K,) particles per class, sorted descending
    n_empty: int
    n_tiny: int
    purity_median: float
    purity_min: float
    fraction_pure: float  # of non-empty classes with purity >= 0.9
    outputs_uri: str
    montage_path: Path


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when both classifications succeeded."""
    started_store = not os.environ.get("CRYOSTACK_S3_ENDPOINT")
    settings = _object_store_settings()
    from cryostack.io.objectstore import ObjectStore  # noqa: PLC0415

    with ObjectStore(settings) as store:
        store.ensure_bucket(DEMO_BUCKET)
        os.environ.setdefault("CRYOSTACK_JOBS_URI", f"s3://{DEMO_BUCKET}/jobs")
        dataset = _dataset(store, args)
        summaries = _classify_twice(store, dataset, args)
        if summaries is None:
            return 1
        report = _write_report(args, dataset, summaries)
    for summary in summaries:
        cap = f"with cap {summary.cap}" if summary.cap else "without cap"
        print(f"classify2d {cap:>14}: {args.classes} classes, {summary.n_empty} empty, largest {summary.counts[0]}, "
              f"median purity {summary.purity_median:.2f}   {summary.outputs_uri}")
    print(f"report: {report}")
    if started_store:
        print("the embedded object store keeps running; `cryostack objectstore stop` stops it")
    return 0


def _object_store_settings() -> ObjectStoreSettings:
    """The configured store, or the embedded one (started if needed) exported into this process's environment."""
    from cryostack.config import EmbeddedStoreSettings, ObjectStoreSettings  # noqa: PLC0415
    from cryostack.io.embedded import EmbeddedStore  # noqa: PLC0415

    if os.environ.get("CRYOSTACK_S3_ENDPOINT"):
        return ObjectStoreSettings()
    embedded = EmbeddedStore.from_settings(EmbeddedStoreSettings(), ObjectStoreSettings())
    print(f"starting the embedded object store in {embedded.state_dir}", file=sys.stderr)
    settings = embedded.start()
    os.environ["CRYOSTACK_S3_ENDPOINT"] = settings.endpoint
    os.environ["CRYOSTACK_S3_ACCESS_KEY"] = settings.access_key.get_secret_value()
    os.environ["CRYOSTACK_S3_SECRET_KEY"] = settings.secret_key.get_secret_value()
    os.environ["CRYOSTACK_S3_SECURE"] = "false"
    return settings


def _dataset(store: ObjectStore, args: argparse.Namespace) -> S3Uri:
    """The simulated floppy dataset's prefix; simulated unless a complete one is already there."""
    from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario  # noqa: PLC0415
    from cryostack.io.dataset import SIMULATION_JSON, write_simulated_dataset  # noqa: PLC0415
    from cryostack.io.uri import S3Uri  # noqa: PLC0415

    prefix = S3Uri(DEMO_BUCKET, f"floppy-{args.particles}-box{args.box}-seed{args.seed}/")
    if store.exists(prefix.join(SIMULATION_JSON)):
        print(f"reusing the simulated dataset at {prefix}", file=sys.stderr)
        return prefix
    params = SimulationParameters(n_particles=args.particles, box_px=args.box, seed=args.seed)
    simulator = ParticleSimulator(scenario("floppy"), params)

    def progress(done: int, total: int) -> None:
        print(f"\rsimulating the floppy protein: {done}/{total} particles", end="", file=sys.stderr, flush=True)

    write_simulated_dataset(simulator, prefix, store, progress=progress)
    print(f"\nsimulated dataset: {prefix}", file=sys.stderr)
    return prefix


def _classify_twice(store: ObjectStore, dataset: S3Uri, args: argparse.Namespace) -> list[ClassificationSummary] | None:
    """Classify the dataset without and with the cap; None if a job failed."""
    from cryostack.classify2d.v1 import classify2d_pb2  # noqa: PLC0415
    from cryostack.cli.common import stage_client, submit_and_follow  # noqa: PLC0415
    from cryostack.io.dataset import PARTICLES_STAR  # noqa: PLC0415
    from cryostack.runtime.client import submit_method  # noqa: PLC0415

    method = submit_method(classify2d_pb2, "Classify2DService", "SubmitClassify2D")
    cap = math.ceil(args.cap_multiple * args.particles / args.classes)
    summaries = []
    with stage_client("classify2d") as client:
        for label, label_cap in (("plain", None), ("capped", cap)):
            print(f"2D classification {label}" + (f" (at most {cap} particles per class)" if label_cap else ""),
                  file=sys.stderr)
            request = classify2d_pb2.SubmitClassify2DRequest(
                idempotency_key=f"demo-{dataset.key.rstrip('/')}-{label}-k{args.classes}-i{args.online_iterations}",
                particles_uri=str(dataset.join(PARTICLES_STAR)),
                output_uri=str(dataset.join(f"classify2d-{label}/")),
                random_seed=args.seed,
            )
            request.parameters.class_count = args.classes
            request.parameters.online_em_iterations = args.online_iterations
            if label_cap is not None:
                request.parameters.max_particles_per_class_count = label_cap
            outcome = submit_and_follow("demo", client, method, request)
            if outcome.job is None or outcome.exit_status != 0:
                return None
            result = classify2d_pb2.Classify2DResult()
            outcome.job.result.Unpack(result)
            summaries.append(_summarise(store, dataset, label, label_cap, outcome.job.outputs_uri, result, args))
    return summaries


def _summarise(
    store: ObjectStore,
    dataset: S3Uri,
    label: str,
    cap: int | None,
    outputs_uri: str,
    result: object,
    args: argparse.Namespace,
) -> ClassificationSummary:
    """Occupancy and domain purity of one run against the ground truth; its montage copied into the report dir."""
    import numpy as np  # noqa: PLC0415

    from cryostack.core.metrics import class_occupancy, class_purity  # noqa: PLC0415
    from cryostack.io.dataset import GROUND_TRUTH_CSV, read_ground_truth_csv  # noqa: PLC0415
    from cryostack.io.star import read_star, resolve_image_names  # noqa: PLC0415

    truth = read_ground_truth_csv(store.get_bytes(dataset.join(GROUND_TRUTH_CSV)))
    classified = read_star(store, result.particles_uri).particles  # type: ignore[attr-defined]
    # Output STARs name their images by absolute URI (so that they chain); the truth names them from its folder.
    truth_names = resolve_image_names(truth["image_name"], dataset)
    domain_by_image = dict(zip(truth_names, truth["domain_present"], strict=True))
    domain_present = np.array([domain_by_image[name] for name in classified["rlnImageName"]], dtype=np.int64)
    labels = classified["rlnClassNumber"].to_numpy(dtype=np.int64) - 1
    occupancy = class_occupancy(labels, args.classes)
    purity = class_purity(labels, domain_present, args.classes)
    filled = purity[~np.isnan(purity)]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    montage_path = args.report_dir / f"montage_{label}.png"
    montage_path.write_bytes(store.get_bytes(result.montage_png_uri))  # type: ignore[attr-defined]
    return ClassificationSummary(
        label=label,
        cap=cap,
        counts=sorted((int(c) for c in occupancy.counts), reverse=True),
        n_empty=occupancy.n_empty,
        n_tiny=occupancy.n_tiny,
        purity_median=float(np.median(filled)),
        purity_min=float(filled.min()),
        fraction_pure=float(np.mean(filled >= 0.9)),
        outputs_uri=outputs_uri,
        montage_path=montage_path,
    )


def _write_report(args: argparse.Namespace, dataset: S3Uri, summaries: list[ClassificationSummary]) -> Path:
    """A Markdown report comparing the runs side by side."""
    lines = [
        "# cryostack demo: 2D classification of a floppy protein, without and with the per-class cap",
        "",
        f"Dataset: `{dataset}` — {args.particles} simulated particles (floppy scenario: hinged domain, 30% domain "
        f"missing, preferred orientation), box {args.box}; {args.classes} classes, "
        f"{args.online_iterations} online-EM iterations.",
        "",
        "| run | cap | largest class | empty classes | tiny classes (< 10% of N/K) | median purity | min purity "
        "| classes with purity ≥ 0.9 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.label} | {s.cap or '—'} | {s.counts[0]} | {s.n_empty} | {s.n_tiny} | {s.purity_median:.3f} "
            f"| {s.purity_min:.3f} | {100 * s.fraction_pure:.0f}% |"
        )
    lines.append("")
    for s in summaries:
        lines += [f"## {s.label}", "", f"Outputs: `{s.outputs_uri}`", "",
                  f"Class sizes: {', '.join(map(str, s.counts))}", "", f"![{s.label}]({s.montage_path.name})", ""]
    report = args.report_dir / "report.md"
    report.write_text("\n".join(lines))
    return report

"""`cryostack refine hetero|homo`: submit a heterogeneous or homogeneous refinement, show its progress and print
where its outputs are.

The job goes to the refine service at ``CRYOSTACK_REFINE_ADDRESS`` (host:port) or, when none is configured, to a
service this command starts in-process for the job's duration (see :mod:`cryostack.cli.common`).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any


def _add_common(parser: argparse.ArgumentParser) -> None:
    """The arguments both refinements take: the particle set, its subset, the output prefix, seed and key."""
    parser.add_argument("--particles", required=True, metavar="URI", help="s3://bucket/.../particles.star")
    parser.add_argument("--out", required=True, metavar="URI", help="s3://bucket/prefix for the job's outputs")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--subset", type=int, metavar="N",
                        help="use N random particles (at most the set's size; default: every particle)")
    subset.add_argument("--subset-classes", type=int, nargs="+", metavar="C",
                        help="use the particles of these classes (rlnClassNumber) of the set")
    parser.add_argument("--subset-seed", type=int, default=0, metavar="S", help="seed of the subset draw (default 0)")
    parser.add_argument("--max-resolution", type=float, metavar="A",
                        help="finest resolution the search may reach, in Å (default: Nyquist)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default: derived from the job)")
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="resubmitting with the same key resumes or returns the same job (default: random)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `refine` subcommand with its `hetero` and `homo` commands."""
    parser = subparsers.add_parser(
        "refine",
        help="heterogeneous or homogeneous 3D refinement",
        description="Refine particles against 3D volumes and write the outputs under OUT/jobs/<job-id>/.",
    )
    kinds = parser.add_subparsers(dest="refinement", required=True, metavar="KIND")

    hetero = kinds.add_parser(
        "hetero",
        help="classify particles among K volumes while refining poses and volumes",
        description="Multi-class EM with pose search against K starting volumes (class n is the n-th volume): "
        "writes per-class volumes and half-maps, particles.star with classes, poses and half-sets, classes.csv, "
        "fsc.csv and hetero.png.",
    )
    _add_common(hetero)
    hetero.add_argument("--volumes", required=True, nargs="+", metavar="URI",
                        help="the K starting volumes (MRC), one per class, in class-number order")
    hetero.add_argument("--batch-size-per-class", type=int, metavar="N",
                        help="online-EM minibatch size per class (default 1000)")
    hetero.add_argument("--initial-resolution", type=float, metavar="A",
                        help="resolution the volumes are low-passed to at the start, in Å (default 20)")
    hetero.add_argument("--random-assignment-iterations", type=int, metavar="N",
                        help="initial iterations with random class assignments (default 5)")
    hetero.add_argument("--final-full-iterations", type=int, metavar="N",
                        help="full-dataset iterations after online EM (default 2)")
    hetero.add_argument("--convergence", type=float, metavar="F",
                        help="online EM ends when fewer than this fraction of particles change class (default 0.05)")
    hetero.add_argument("--max-online-iterations", type=int, metavar="N",
                        help="bound on the online-EM iterations (default 50)")
    hetero.set_defaults(func=run_hetero)

    homo = kinds.add_parser(
        "homo",
        help="gold-standard refinement of one structure",
        description="Refine one volume from two independently refined half-sets with an automatic mask: writes "
        "map.mrc, half-maps, mask.mrc, particles.star with poses and half-sets, fsc.csv and homo.png.",
    )
    _add_common(homo)
    homo.add_argument("--volume", required=True, metavar="URI", help="the starting volume (MRC)")
    homo.add_argument("--initial-lowpass", type=float, metavar="A",
                      help="resolution the starting volume is low-passed to, in Å (default 30)")
    homo.add_argument("--mask-threshold", type=float, metavar="F",
                      help="automatic mask threshold as a fraction of the map's maximum (default 0.2)")
    homo.add_argument("--mask-dilation", type=float, metavar="A", help="mask dilation in Å (default 3)")
    homo.add_argument("--mask-soft-edge", type=float, metavar="A", help="mask soft-edge width in Å (default 3)")
    homo.add_argument("--max-iterations", type=int, metavar="N",
                      help="bound on the iterations (default: until the resolution stops improving)")
    homo.add_argument("--global-iterations", type=int, metavar="N",
                      help="iterations of global pose search before the local ones (default 2)")
    homo.set_defaults(func=run_homo)


def _fill(request: Any, args: argparse.Namespace, fields: dict[str, object]) -> Any:
    """Set the request fields both refinements share, and the parameters given."""
    request.idempotency_key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
    request.particles_uri = args.particles
    request.output_uri = args.out
    if args.seed is not None:
        request.random_seed = args.seed
    if args.subset is not None:
        request.subset.random.particle_count = args.subset
        request.subset.random.seed = args.subset_seed
    if args.subset_classes is not None:
        request.subset.class_numbers.class_numbers.extend(args.subset_classes)
    fields = {"max_resolution_a": args.max_resolution, **fields}
    for name, value in fields.items():
        if value is not None:
            setattr(request.parameters, name, value)
    return request


def build_hetero_request(args: argparse.Namespace):  # noqa: ANN201  (generated message type)
    """The SubmitHeterogeneousRefinement request of the command's arguments."""
    from cryostack.refine.v1 import refine_pb2  # noqa: PLC0415  (heavy imports only when the command runs)

    request = refine_pb2.SubmitHeterogeneousRefinementRequest(volume_uris=args.volumes)
    return _fill(request, args, {
        "batch_size_per_class": args.batch_size_per_class,
        "initial_resolution_a": args.initial_resolution,
        "random_assignment_iterations": args.random_assignment_iterations,
        "final_full_iterations": args.final_full_iterations,
        "convergence_class_change_fraction": args.convergence,
        "max_online_iterations": args.max_online_iterations,
    })


def build_homo_request(args: argparse.Namespace):  # noqa: ANN201  (generated message type)
    """The SubmitHomogeneousRefinement request of the command's arguments."""
    from cryostack.refine.v1 import refine_pb2  # noqa: PLC0415

    request = refine_pb2.SubmitHomogeneousRefinementRequest(volume_uri=args.volume)
    return _fill(request, args, {
        "initial_lowpass_resolution_a": args.initial_lowpass,
        "mask_threshold_fraction": args.mask_threshold,
        "mask_dilation_a": args.mask_dilation,
        "mask_soft_edge_width_a": args.mask_soft_edge,
        "max_iterations": args.max_iterations,
        "global_iterations": args.global_iterations,
    })


def _submit(method_name: str, request: Any, result: Any) -> tuple[int, str]:
    """Submit through the refine service, follow the job, unpack its result; (exit status, outputs URI)."""
    from cryostack.cli.common import stage_client, submit_and_follow  # noqa: PLC0415
    from cryostack.refine.v1 import refine_pb2  # noqa: PLC0415
    from cryostack.runtime.client import submit_method  # noqa: PLC0415

    method = submit_method(refine_pb2, "RefineService", method_name)
    with stage_client("refine") as client:
        outcome = submit_and_follow("refine", client, method, request)
    if outcome.exit_status != 0 or outcome.job is None:
        return outcome.exit_status, ""
    outcome.job.result.Unpack(result)
    return 0, outcome.job.outputs_uri


def _resolution(value: float | None) -> str:
    return f"{value:.1f} Å" if value is not None else "unresolved"


def run_hetero(args: argparse.Namespace) -> int:
    """Submit, follow the job to its end and print the output locations; 0 on success, 2 on a bad request, else 1."""
    from cryostack.refine.v1 import refine_pb2  # noqa: PLC0415

    result = refine_pb2.HeterogeneousRefinementResult()
    status, outputs_uri = _submit("SubmitHeterogeneousRefinement", build_hetero_request(args), result)
    if status != 0:
        return status
    print(f"outputs: {outputs_uri}")
    for refined in result.classes:
        resolution = refined.gsfsc_resolution_a if refined.HasField("gsfsc_resolution_a") else None
        print(f"class {refined.class_number}: {refined.particle_count} particles, {_resolution(resolution)}, "
              f"volume {refined.volume_uri}")
    print(f"particles: {result.particles_uri}")
    print(f"fsc: {result.fsc_csv_uri}")
    print(f"report: {result.report_png_uri}")
    return 0


def run_homo(args: argparse.Namespace) -> int:
    """Submit, follow the job to its end and print the output locations; 0 on success, 2 on a bad request, else 1."""
    from cryostack.refine.v1 import refine_pb2  # noqa: PLC0415

    result = refine_pb2.HomogeneousRefinementResult()
    status, outputs_uri = _submit("SubmitHomogeneousRefinement", build_homo_request(args), result)
    if status != 0:
        return status
    print(f"outputs: {outputs_uri}")
    print(f"resolution: {_resolution(result.gsfsc_resolution_a)} after {result.iteration_count} iterations")
    print(f"map: {result.map_uri}")
    print(f"half maps: {result.half_map_a_uri} {result.half_map_b_uri}")
    print(f"mask: {result.mask_uri}")
    print(f"particles: {result.particles_uri}")
    print(f"fsc: {result.fsc_csv_uri}")
    print(f"report: {result.report_png_uri}")
    return 0

"""`cryostack abinitio`: submit an ab-initio reconstruction job, show its progress and print where its outputs are.

The job goes to the abinitio service at ``CRYOSTACK_ABINITIO_ADDRESS`` (host:port) or, when none is configured,
to a service this command starts in-process for the job's duration (see :mod:`cryostack.cli.common`).
"""

from __future__ import annotations

import argparse
import uuid


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `abinitio` subcommand."""
    parser = subparsers.add_parser(
        "abinitio",
        help="ab-initio 3D reconstruction of one or several classes",
        description="Reconstruct K volumes from particles alone (SGD-like online EM with frequency marching) and "
        "write the volumes, particles.star with classes and poses, class sizes and a report under "
        "OUT/jobs/<job-id>/.",
    )
    parser.add_argument("--particles", required=True, metavar="URI", help="s3://bucket/.../particles.star")
    parser.add_argument("--out", required=True, metavar="URI", help="s3://bucket/prefix for the job's outputs")
    parser.add_argument("--classes", type=int, required=True, metavar="K", help="number of classes")
    parser.add_argument("--subset", type=int, metavar="N",
                        help="use N random particles (at most the set's size; default: every particle)")
    parser.add_argument("--subset-seed", type=int, default=0, metavar="S", help="seed of the subset draw (default 0)")
    parser.add_argument("--initial-resolution", type=float, metavar="A", help="initial resolution in Å (default 35)")
    parser.add_argument("--max-resolution", type=float, metavar="A", help="maximum resolution in Å (default 12)")
    parser.add_argument("--initial-iterations", type=int, metavar="N",
                        help="iterations marching from the initial to the maximum resolution (default 200)")
    parser.add_argument("--final-iterations", type=int, metavar="N",
                        help="iterations at the maximum resolution (default 300)")
    parser.add_argument("--minibatch-initial", type=int, metavar="N", help="initial minibatch size (default 90)")
    parser.add_argument("--minibatch-final", type=int, metavar="N", help="final minibatch size (default 300)")
    parser.add_argument("--learning-rate", type=float, metavar="R", help="initial learning rate (default 0.4)")
    parser.add_argument("--class-similarity", type=float, metavar="S",
                        help="initial class similarity, annealed to 0 (default 0.1)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default: derived from the job)")
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="resubmitting with the same key resumes or returns the same job (default: random)")
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace):  # noqa: ANN201  (generated message type)
    """The SubmitAbinitio request of the command's arguments."""
    from cryostack.abinitio.v1 import abinitio_pb2  # noqa: PLC0415  (heavy imports only when the command runs)

    request = abinitio_pb2.SubmitAbinitioRequest(
        idempotency_key=args.idempotency_key or f"cli-{uuid.uuid4().hex}",
        particles_uri=args.particles,
        output_uri=args.out,
    )
    if args.seed is not None:
        request.random_seed = args.seed
    if args.subset is not None:
        request.subset.random.particle_count = args.subset
        request.subset.random.seed = args.subset_seed
    fields = {
        "class_count": args.classes,
        "initial_resolution_a": args.initial_resolution,
        "max_resolution_a": args.max_resolution,
        "initial_iterations": args.initial_iterations,
        "final_iterations": args.final_iterations,
        "minibatch_size_initial": args.minibatch_initial,
        "minibatch_size_final": args.minibatch_final,
        "learning_rate_initial": args.learning_rate,
        "class_similarity_initial": args.class_similarity,
    }
    for name, value in fields.items():
        if value is not None:
            setattr(request.parameters, name, value)
    return request


def run(args: argparse.Namespace) -> int:
    """Submit, follow the job to its end and print the output locations; 0 on success, 2 on a bad request, else 1."""
    from cryostack.abinitio.v1 import abinitio_pb2  # noqa: PLC0415
    from cryostack.cli.common import stage_client, submit_and_follow  # noqa: PLC0415
    from cryostack.runtime.client import submit_method  # noqa: PLC0415

    method = submit_method(abinitio_pb2, "AbinitioService", "SubmitAbinitio")
    with stage_client("abinitio") as client:
        outcome = submit_and_follow("abinitio", client, method, build_request(args))
    if outcome.exit_status != 0 or outcome.job is None:
        return outcome.exit_status
    result = abinitio_pb2.AbinitioResult()
    outcome.job.result.Unpack(result)
    print(f"outputs: {outcome.job.outputs_uri}")
    for summary in result.classes:
        print(f"class {summary.class_number}: {summary.particle_count} particles, volume {summary.volume_uri}")
    print(f"particles: {result.particles_uri}")
    print(f"report: {result.report_png_uri}")
    return 0

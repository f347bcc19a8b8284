"""`cryostack classify2d`: submit a 2D classification job, show its progress and print where its outputs are.

The job goes to the classify2d service at ``CRYOSTACK_CLASSIFY2D_ADDRESS`` (host:port) or, when none is
configured, to a service this command starts in-process for the job's duration (see :mod:`cryostack.cli.common`).
"""

from __future__ import annotations

import argparse
import uuid


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `classify2d` subcommand."""
    parser = subparsers.add_parser(
        "classify2d",
        help="2D classification with an optional per-class particle cap",
        description="Classify particles in 2D (EM over classes, in-plane rotations and shifts, CTF-aware) and write "
        "class averages, particles.star, class sizes and resolutions and a montage under OUT/jobs/<job-id>/.",
    )
    parser.add_argument("--particles", required=True, metavar="URI", help="s3://bucket/.../particles.star")
    parser.add_argument("--out", required=True, metavar="URI", help="s3://bucket/prefix for the job's outputs")
    parser.add_argument("--classes", type=int, required=True, metavar="K", help="number of classes")
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--max-particles-per-class", type=int, metavar="N", help="cap on each class's occupancy")
    cap.add_argument("--max-particles-per-class-multiple", type=float, metavar="X",
                     help="cap as a multiple of the mean occupancy N/K")
    parser.add_argument("--min-particles-per-class", type=float, metavar="N",
                        help="re-seed classes whose expected occupancy falls below N (default: off)")
    parser.add_argument("--max-resolution", type=float, metavar="A", help="maximum resolution in Å (default 6)")
    parser.add_argument("--uncertainty-factor", type=float, metavar="T",
                        help="initial classification uncertainty factor (default 2)")
    parser.add_argument("--online-iterations", type=int, metavar="N", help="online-EM iterations (default 20)")
    parser.add_argument("--batch-size-per-class", type=int, metavar="N", help="minibatch per class (default 100)")
    parser.add_argument("--full-iterations", type=int, metavar="N", help="final full iterations (default 1)")
    parser.add_argument("--marginalise", action="store_true", help="marginalise over poses instead of force max")
    parser.add_argument("--no-recenter", action="store_true", help="do not re-centre class averages")
    parser.add_argument("--mask-inner-diameter", type=float, metavar="A", help="circular mask inner diameter, Å")
    parser.add_argument("--mask-outer-diameter", type=float, metavar="A", help="circular mask outer diameter, Å")
    parser.add_argument("--zero-pad", type=int, metavar="F", help="zero-padding factor (default 2)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default: derived from the job)")
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="resubmitting with the same key resumes or returns the same job (default: random)")
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace):  # noqa: ANN201  (generated message type)
    """The SubmitClassify2D request of the command's arguments."""
    from cryostack.classify2d.v1 import classify2d_pb2  # noqa: PLC0415  (heavy imports only when the command runs)

    request = classify2d_pb2.SubmitClassify2DRequest(
        idempotency_key=args.idempotency_key or f"cli-{uuid.uuid4().hex}",
        particles_uri=args.particles,
        output_uri=args.out,
    )
    if args.seed is not None:
        request.random_seed = args.seed
    fields = {
        "class_count": args.classes,
        "max_particles_per_class_count": args.max_particles_per_class,
        "max_particles_per_class_mean_multiple": args.max_particles_per_class_multiple,
        "min_particles_per_class": args.min_particles_per_class,
        "max_resolution_a": args.max_resolution,
        "initial_uncertainty_factor": args.uncertainty_factor,
        "online_em_iterations": args.online_iterations,
        "batch_size_per_class": args.batch_size_per_class,
        "final_full_iterations": args.full_iterations,
        "circular_mask_inner_diameter_a": args.mask_inner_diameter,
        "circular_mask_outer_diameter_a": args.mask_outer_diameter,
        "zero_pad_factor": args.zero_pad,
        "force_max_over_poses_shifts": False if args.marginalise else None,
        "recenter_classes": False if args.no_recenter else None,
    }
    for name, value in fields.items():
        if value is not None:
            setattr(request.parameters, name, value)
    return request


def run(args: argparse.Namespace) -> int:
    """Submit, follow the job to its end and print the output location; 0 on success, 2 on a bad request, else 1."""
    from cryostack.classify2d.v1 import classify2d_pb2  # noqa: PLC0415
    from cryostack.cli.common import stage_client, submit_and_follow  # noqa: PLC0415
    from cryostack.runtime.client import submit_method  # noqa: PLC0415

    method = submit_method(classify2d_pb2, "Classify2DService", "SubmitClassify2D")
    with stage_client("classify2d") as client:
        outcome = submit_and_follow("classify2d", client, method, build_request(args))
    if outcome.exit_status != 0 or outcome.job is None:
        return outcome.exit_status
    result = classify2d_pb2.Classify2DResult()
    outcome.job.result.Unpack(result)
    print(f"outputs: {outcome.job.outputs_uri}")
    print(f"class averages: {result.class_averages_uri}")
    print(f"particles: {result.particles_uri}")
    print(f"montage: {result.montage_png_uri}")
    return 0

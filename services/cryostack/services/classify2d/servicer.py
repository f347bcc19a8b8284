"""The classify2d gRPC service: a thin adapter registering the 2D classification job kind with the runtime.

Validation reads the input STAR (so a missing set is NOT_FOUND and a parameter that cannot work for the set,
e.g. a cap too small to hold it or a resolution finer than Nyquist, is INVALID_ARGUMENT) before any job state is
written. The job streams particles from the store, checkpoints after every iteration and resumes from the last
checkpoint when resubmitted; its outputs are those of :mod:`cryostack.services.classify2d.outputs`.
"""

from __future__ import annotations

from collections.abc import Iterable
import grpc
import numpy as np

from cryostack.classify2d.v1 import classify2d_pb2, classify2d_pb2_grpc
from cryostack.config import ServiceSettings
from cryostack.core.backend import default_xp
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader
from cryostack.io.uri import S3Uri
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime import JobContext, JobKind, JobRunner
from cryostack.runtime.store import MANIFEST_FILE
from cryostack.services.classify2d import outputs
from cryostack.services.inputs import ParticleSet, check_class_count, load_particle_set
from cryostack.services.classify2d.algorithm import PASS_BATCH, Classifier2D
from cryostack.services.classify2d.parameters import Classify2DParameters, validate_parameters
from cryostack.services.classify2d.state import ClassificationState, IterationReport

SERVICE_NAME = classify2d_pb2.DESCRIPTOR.services_by_name["Classify2DService"].full_name
KIND_NAME = "classify2d"
CHECKPOINT = "state.npz"

# Optional proto fields copied as they are into the algorithm's parameters.
_OPTIONAL_FIELDS = (
    "class_count", "max_resolution_a", "initial_uncertainty_factor", "online_em_iterations", "batch_size_per_class",
    "final_full_iterations", "sigma_annealing_start_iteration", "sigma_annealing_iterations",
    "force_max_over_poses_shifts", "circular_mask_inner_diameter_a", "circular_mask_outer_diameter_a",
    "recenter_classes", "zero_pad_factor", "min_particles_per_class",
)


def parameters_from_proto(message: classify2d_pb2.Classify2DParameters) -> Classify2DParameters:
    """Algorithm parameters from the request message; unset fields keep their defaults."""
    values = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    cap = message.WhichOneof("max_particles_per_class")
    if cap is not None:
        values[cap] = getattr(message, cap)
    return Classify2DParameters(**values)


class Classify2DJobs:
    """Validation and execution of 2D classification jobs against one object store."""

    def __init__(self, objects: ObjectStore, settings: ServiceSettings) -> None:
        self.objects = objects
        self.settings = settings

    def load_input(self, request: classify2d_pb2.SubmitClassify2DRequest) -> ParticleSet:
        """The particle set the request selects, checked against the service's limits."""
        subset = request.subset if request.HasField("subset") else None
        return load_particle_set(self.objects, self.settings, request.particles_uri, request.output_uri, subset)

    def validate(self, request: classify2d_pb2.SubmitClassify2DRequest) -> None:
        """Everything that can be checked before the job starts; raises before any state is written."""
        params = parameters_from_proto(request.parameters)
        check_class_count(params.class_count, self.settings)
        selected = self.load_input(request)
        validate_parameters(params, len(selected.table), selected.box_px, selected.pixel_size_a)

    def run(
        self, context: JobContext, request: classify2d_pb2.SubmitClassify2DRequest
    ) -> classify2d_pb2.Classify2DResult:
        """Classify, checkpointing every iteration, then write the outputs."""
        params = parameters_from_proto(request.parameters)
        selected = self.load_input(request)
        reader = ParticleStackReader(self.objects, selected.table, request.particles_uri, batch_size=PASS_BATCH)
        classifier = Classifier2D(params, reader, selected.pixel_size_a, selected.table.ctf_parameters(), context.seed,
                                  default_xp())
        saved = context.load_checkpoint(CHECKPOINT)
        state = ClassificationState.from_bytes(saved) if saved is not None else None
        n_particles = len(selected.table)

        def on_iteration(new_state: ClassificationState, report: IterationReport) -> None:
            context.save_checkpoint(CHECKPOINT, new_state.to_bytes())
            context.report_progress(
                stage="classify2d",
                iteration=report.iteration,
                total_iterations=report.total_iterations,
                fraction=report.iteration / report.total_iterations,
                current_resolution_a=report.resolution_a,
                message=f"iteration {report.iteration} of {report.total_iterations}: "
                        f"{report.particles_seen} particles seen, {report.resolution_a:.1f} Å",
                summary={"particles_seen": float(report.particles_seen), **report.summary(n_particles)},
            )

        context.report_progress(stage="classify2d", total_iterations=params.total_iterations,
                                message="resuming" if state is not None else "starting")
        result = classifier.run(state, on_iteration=on_iteration, check_cancelled=context.check_cancelled)
        context.check_cancelled()
        uris = outputs.write_outputs(context.write_output, selected.table, result, selected.pixel_size_a,
                                     selected.box_px)
        classes = outputs.sort_classes(result)
        message = classify2d_pb2.Classify2DResult(
            particles_uri=uris[outputs.PARTICLES_STAR],
            class_averages_uri=uris[outputs.CLASS_AVERAGES],
            montage_png_uri=uris[outputs.MONTAGE_PNG],
            manifest_uri=str(S3Uri.parse(context.outputs_uri).join(MANIFEST_FILE)),
            particle_count=n_particles,
            empty_class_count=int(np.sum(classes.counts == 0)),
            reseeded_class_count=result.reseeded,
        )
        if result.capacity is not None:
            message.max_particles_per_class_count = result.capacity
        for index, count in enumerate(classes.counts):
            summary = message.classes.add(class_number=index + 1, particle_count=int(count))
            if np.isfinite(classes.frc_resolution_a[index]):
                summary.frc_resolution_a = float(classes.frc_resolution_a[index])
        return message


class Classify2DServicer(classify2d_pb2_grpc.Classify2DServiceServicer):
    """Submits 2D classification jobs to the runner."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def SubmitClassify2D(  # noqa: N802  (gRPC method name)
        self, request: classify2d_pb2.SubmitClassify2DRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        """Validate and queue a job; returns its handle at once."""
        return self.runner.submit(KIND_NAME, request)


def register(server: grpc.Server, runner: JobRunner) -> Iterable[str]:
    """Add the classify2d service to a server and its job kind to the runner."""
    jobs = Classify2DJobs(runner.store.objects, runner.settings)
    runner.register(JobKind(
        name=KIND_NAME,
        service="classify2d",
        request_type=classify2d_pb2.SubmitClassify2DRequest,
        run=jobs.run,
        validate=jobs.validate,
    ))
    classify2d_pb2_grpc.add_Classify2DServiceServicer_to_server(Classify2DServicer(runner), server)
    return [SERVICE_NAME]

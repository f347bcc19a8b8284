"""The refine gRPC service: a thin adapter registering the heterogeneous and homogeneous refinement job kinds.

Validation reads the input STAR and every input volume before any job state is written: a missing set or volume is
NOT_FOUND; an out-of-range parameter (``parameters.<name>``), no volume, more volumes than the service's class
limit, a volume that is not a valid MRC, not a cube of the particles' box, of another voxel size (beyond
:data:`PIXEL_SIZE_RTOL`) or holding NaN/Inf is INVALID_ARGUMENT naming the field (``volume_uris[i]``,
``volume_uri``). The job streams particles from the store through the algorithm, checkpoints after every iteration
and resumes from the last checkpoint when resubmitted; its outputs are those of
:mod:`cryostack.services.refine.outputs`. Running jobs share the process's BLAS threads (see ``BlasShare``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import numpy as np

from cryostack.config import ServiceSettings
from cryostack.core.backend import default_xp
from cryostack.errors import InvalidArgumentError, NotFoundError
from cryostack.io.mrc import HEADER_BYTES, check_size, decode_images, parse_header
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader
from cryostack.io.uri import S3Uri, check_bucket_allowed
from cryostack.jobs.v1 import jobs_pb2
from cryostack.particles.v1 import particles_pb2
from cryostack.refine.v1 import refine_pb2, refine_pb2_grpc
from cryostack.runtime import JobContext, JobKind, JobRunner
from cryostack.runtime.store import MANIFEST_FILE
from cryostack.services.abinitio.servicer import BlasShare
from cryostack.services.inputs import ParticleSet, load_particle_set
from cryostack.services.refine import outputs
from cryostack.services.refine.hetero import HeterogeneousRefinement
from cryostack.services.refine.homo import HomogeneousRefinement
from cryostack.services.refine.parameters import HeteroParameters, HomoParameters
from cryostack.services.refine.results import RefineIterationReport

SERVICE_NAME = refine_pb2.DESCRIPTOR.services_by_name["RefineService"].full_name
HETERO_KIND = "refine-hetero"
HOMO_KIND = "refine-homo"
CHECKPOINT = "state.npz"
# Images per ranged-GET batch of the particle reader the algorithms stream from.
READ_BATCH = 512
# A volume's voxel size may differ from the particles' pixel size by this relative amount (header rounding).
PIXEL_SIZE_RTOL = 1e-3
# Online-EM iterations after the random-assignment ones that a run is expected to need before the class changes
# fall below the criterion; only the progress fraction uses it.
EXPECTED_CONVERGED_ONLINE_ITERATIONS = 10
# Homogeneous iterations a run is expected to need before its resolution stops improving (progress only).
EXPECTED_HOMO_ITERATIONS = 8

# Optional proto fields copied as they are into the algorithms' parameters.
_HETERO_FIELDS = (
    "batch_size_per_class", "initial_resolution_a", "random_assignment_iterations", "final_full_iterations",
    "convergence_class_change_fraction", "max_online_iterations", "max_resolution_a",
)
_HOMO_FIELDS = (
    "initial_lowpass_resolution_a", "mask_threshold_fraction", "mask_dilation_a", "mask_soft_edge_width_a",
    "max_iterations", "global_iterations", "max_resolution_a",
)


def hetero_parameters_from_proto(message: refine_pb2.HeterogeneousRefinementParameters) -> HeteroParameters:
    """Heterogeneous-refinement parameters from the request message; unset fields keep their defaults."""
    return HeteroParameters(**{name: getattr(message, name) for name in _HETERO_FIELDS if message.HasField(name)})


def homo_parameters_from_proto(message: refine_pb2.HomogeneousRefinementParameters) -> HomoParameters:
    """Homogeneous-refinement parameters from the request message; unset fields keep their defaults."""
    return HomoParameters(**{name: getattr(message, name) for name in _HOMO_FIELDS if message.HasField(name)})


def check_parameters(check: Callable[..., None], fields: Iterable[str], *args: Any, **kwargs: Any) -> None:
    """Run a parameters' ``check``; errors on a parameter (one of ``fields``) are named ``parameters.<name>``."""
    try:
        check(*args, **kwargs)
    except InvalidArgumentError as error:
        if error.field in fields:
            raise InvalidArgumentError(f"parameters.{error.field}", error.reason) from None
        raise


def read_volume(objects: ObjectStore, uri: str, field: str, box_px: int, pixel_size_a: float) -> np.ndarray:
    """The MRC volume at ``uri`` checked against the particles' box and pixel size: (D, D, D) float32.

    The header is read and checked first, so an object of the wrong shape is refused without reading its data.
    """
    if not uri:
        raise InvalidArgumentError(field, "is required")
    target = check_bucket_allowed(S3Uri.parse(uri, field).require_object(field), objects.settings.allowed_buckets,
                                  field)
    try:
        size_bytes = objects.stat(target).size
    except NotFoundError:
        raise NotFoundError(field, f"{target} does not exist") from None
    if size_bytes < HEADER_BYTES:
        raise InvalidArgumentError(field, f"{target} is not an MRC: {size_bytes} bytes, fewer than a header's "
                                          f"{HEADER_BYTES}")
    try:
        header = parse_header(objects.get_range(target, 0, HEADER_BYTES), str(target))
        shape = (header.nz, header.ny, header.nx)
        if shape != (box_px,) * 3:
            raise InvalidArgumentError(str(target), f"volume is {header.nx} x {header.ny} x {header.nz} voxels; the "
                                                    f"particles' box is {box_px} x {box_px} x {box_px}")
        if not np.allclose(header.voxel_size_a, pixel_size_a, rtol=PIXEL_SIZE_RTOL, atol=0.0):
            voxel = " x ".join(f"{size:g}" for size in header.voxel_size_a)
            raise InvalidArgumentError(str(target), f"voxel size {voxel} Å differs from the particles' pixel size "
                                                    f"{pixel_size_a:g} Å")
        check_size(header, size_bytes, str(target))
        raw = objects.get_bytes(target)
        check_size(header, len(raw), str(target))  # the object may have changed since its size was read
        volume = decode_images(memoryview(raw)[header.data_offset :], header, header.nz, str(target),
                               check_finite=False)  # (D, D, D) float32
    except InvalidArgumentError as error:
        raise InvalidArgumentError(field, f"{target}: {error.reason}") from None
    bad = int(np.count_nonzero(~np.isfinite(volume)))
    if bad:
        raise InvalidArgumentError(field, f"{target}: {bad} voxels are NaN or Inf")
    return volume


def check_volume_count(count: int, settings: ServiceSettings) -> None:
    """Refuse no volume, or more volumes (classes) than this service allows."""
    if count < 1:
        raise InvalidArgumentError("volume_uris", "at least one volume is required")
    if count > settings.max_classes:
        raise InvalidArgumentError("volume_uris", f"{count} volumes exceed this service's limit of "
                                                  f"{settings.max_classes} classes")


class RefineJobs:
    """Validation and execution of refinement jobs against one object store."""

    def __init__(self, objects: ObjectStore, settings: ServiceSettings, threads: BlasShare | None = None) -> None:
        self.objects = objects
        self.settings = settings
        self.threads = threads or BlasShare()

    def load_input(self, request: refine_pb2.SubmitHeterogeneousRefinementRequest
                   | refine_pb2.SubmitHomogeneousRefinementRequest) -> ParticleSet:
        """The particle set the request selects, checked against the service's limits."""
        subset: particles_pb2.ParticleSubset | None = request.subset if request.HasField("subset") else None
        return load_particle_set(self.objects, self.settings, request.particles_uri, request.output_uri, subset)

    def hetero_volumes(self, request: refine_pb2.SubmitHeterogeneousRefinementRequest,
                       selected: ParticleSet) -> np.ndarray:
        """The request's class volumes, checked: (K, D, D, D) float32."""
        return np.stack([
            read_volume(self.objects, uri, f"volume_uris[{index}]", selected.box_px, selected.pixel_size_a)
            for index, uri in enumerate(request.volume_uris)
        ])

    def validate_hetero(self, request: refine_pb2.SubmitHeterogeneousRefinementRequest) -> None:
        """Everything that can be checked before a heterogeneous job starts; raises before any state is written."""
        params = hetero_parameters_from_proto(request.parameters)
        check_parameters(params.check, _HETERO_FIELDS)  # the request alone first: no read for a bad parameter
        check_volume_count(len(request.volume_uris), self.settings)
        for index, uri in enumerate(request.volume_uris):
            S3Uri.parse(uri, f"volume_uris[{index}]").require_object(f"volume_uris[{index}]")
        selected = self.load_input(request)
        check_parameters(params.check, _HETERO_FIELDS, len(selected.table), selected.pixel_size_a,
                         len(request.volume_uris))
        for index, uri in enumerate(request.volume_uris):  # one at a time: only one volume is held at once
            read_volume(self.objects, uri, f"volume_uris[{index}]", selected.box_px, selected.pixel_size_a)

    def validate_homo(self, request: refine_pb2.SubmitHomogeneousRefinementRequest) -> None:
        """Everything that can be checked before a homogeneous job starts; raises before any state is written."""
        params = homo_parameters_from_proto(request.parameters)
        check_parameters(params.check, _HOMO_FIELDS)
        if not request.volume_uri:
            raise InvalidArgumentError("volume_uri", "is required")
        S3Uri.parse(request.volume_uri, "volume_uri").require_object("volume_uri")
        selected = self.load_input(request)
        check_parameters(params.check, _HOMO_FIELDS, len(selected.table), selected.pixel_size_a)
        read_volume(self.objects, request.volume_uri, "volume_uri", selected.box_px, selected.pixel_size_a)

    def run_hetero(self, context: JobContext, request: refine_pb2.SubmitHeterogeneousRefinementRequest
                   ) -> refine_pb2.HeterogeneousRefinementResult:
        """Refine K classes with checkpoints after every iteration, then write the outputs."""
        params = hetero_parameters_from_proto(request.parameters)
        selected = self.load_input(request)
        n_particles = len(selected.table)
        with self.threads.job():
            context.report_progress(stage="read", message=f"reading {len(request.volume_uris)} volumes")
            volumes = self.hetero_volumes(request, selected)
            reader = ParticleStackReader(self.objects, selected.table, request.particles_uri, batch_size=READ_BATCH)
            saved = context.load_checkpoint(CHECKPOINT)
            refinement = HeterogeneousRefinement(reader, selected.table.ctf_parameters(), volumes,
                                                 selected.pixel_size_a, params, context.seed, saved, default_xp(),
                                                 half_set=given_half_sets(selected))
            context.report_progress(stage="hetero", message="resuming" if saved is not None else
                                    f"refining {volumes.shape[0]} classes over {n_particles} particles")
            work = HeteroWork(params, n_particles, volumes.shape[0])
            while not refinement.done:
                context.check_cancelled()
                report = refinement.step()
                context.save_checkpoint(CHECKPOINT, refinement.state_bytes())
                work.record(report)
                _report(context, "hetero", report, work.total_iterations(), work.fraction(refinement.done))
            context.check_cancelled()
            result = refinement.finish()
        context.check_cancelled()
        uris = outputs.write_hetero_outputs(context.write_output, selected.table, result)
        message = refine_pb2.HeterogeneousRefinementResult(
            particles_uri=uris[outputs.PARTICLES_STAR],
            fsc_csv_uri=uris[outputs.FSC_CSV],
            report_png_uri=uris[outputs.HETERO_PNG],
            manifest_uri=str(S3Uri.parse(context.outputs_uri).join(MANIFEST_FILE)),
            particle_count=n_particles,
            iteration_count=result.iteration_count,
        )
        if math.isfinite(result.final_class_change_fraction):
            message.final_class_change_fraction = result.final_class_change_fraction
        sizes = result.class_sizes
        for index in range(volumes.shape[0]):
            number = index + 1
            refined = message.classes.add(
                class_number=number,
                volume_uri=uris[outputs.volume_name(number)],
                half_map_a_uri=uris[outputs.half_map_name(number, "a")],
                half_map_b_uri=uris[outputs.half_map_name(number, "b")],
                particle_count=int(sizes[index]),
            )
            if np.isfinite(result.resolution_a[index]):
                refined.gsfsc_resolution_a = float(result.resolution_a[index])
        return message

    def run_homo(self, context: JobContext, request: refine_pb2.SubmitHomogeneousRefinementRequest
                 ) -> refine_pb2.HomogeneousRefinementResult:
        """Refine one structure from two half-sets with checkpoints after every iteration, then write the outputs."""
        params = homo_parameters_from_proto(request.parameters)
        selected = self.load_input(request)
        n_particles = len(selected.table)
        with self.threads.job():
            context.report_progress(stage="read", message="reading the volume")
            volume = read_volume(self.objects, request.volume_uri, "volume_uri", selected.box_px,
                                 selected.pixel_size_a)
            reader = ParticleStackReader(self.objects, selected.table, request.particles_uri, batch_size=READ_BATCH)
            saved = context.load_checkpoint(CHECKPOINT)
            refinement = HomogeneousRefinement(reader, selected.table.ctf_parameters(), volume,
                                               selected.pixel_size_a, params, context.seed, saved, default_xp(),
                                               half_set=given_half_sets(selected))
            context.report_progress(stage="homo", message="resuming" if saved is not None else
                                    f"refining one structure over {n_particles} particles")
            planned = params.max_iterations or 0
            while not refinement.done:
                context.check_cancelled()
                report = refinement.step()
                context.save_checkpoint(CHECKPOINT, refinement.state_bytes())
                _report(context, "homo", report, planned, homo_fraction(report.iteration, params, refinement.done))
            context.check_cancelled()
            result = refinement.finish()
        context.check_cancelled()
        uris = outputs.write_homo_outputs(context.write_output, selected.table, result)
        return refine_pb2.HomogeneousRefinementResult(
            particles_uri=uris[outputs.PARTICLES_STAR],
            map_uri=uris[outputs.MAP_MRC],
            half_map_a_uri=uris[outputs.HALF_MAP_A_MRC],
            half_map_b_uri=uris[outputs.HALF_MAP_B_MRC],
            mask_uri=uris[outputs.MASK_MRC],
            fsc_csv_uri=uris[outputs.FSC_CSV],
            report_png_uri=uris[outputs.HOMO_PNG],
            manifest_uri=str(S3Uri.parse(context.outputs_uri).join(MANIFEST_FILE)),
            particle_count=n_particles,
            gsfsc_resolution_a=result.resolution_a,
            iteration_count=result.iteration_count,
        )


class HeteroWork:
    """Fraction of a heterogeneous run done, in particle visits: online minibatches, then full passes.

    How many online iterations a run needs is known only once it moves to its full iterations; until then the
    estimate is the random-assignment iterations plus :data:`EXPECTED_CONVERGED_ONLINE_ITERATIONS` (within the
    bound), and at least one more than those run. Counts follow the reports' iteration numbers, so a resumed run
    continues where it was (taking the iterations before its first full one in this attempt as online ones).
    """

    def __init__(self, params: HeteroParameters, n_particles: int, class_count: int) -> None:
        self.params = params
        self.n_particles = n_particles
        self.online_visits = min(n_particles, params.batch_size_per_class * class_count)
        self.online_done = 0
        self.full_done = 0
        self.online_total: int | None = None  # known once the first full iteration has run

    def record(self, report: RefineIterationReport) -> None:
        """Count one finished iteration."""
        if report.phase == "full":
            if self.online_total is None:
                self.online_total = report.iteration - 1
            self.online_done = self.online_total
            self.full_done = report.iteration - self.online_total
        else:
            self.online_done = report.iteration

    def total_iterations(self) -> int:
        """Planned iterations: known once the online iterations have ended, else 0 (unknown)."""
        if self.online_total is None:
            return 0
        return self.online_total + self.params.final_full_iterations

    def fraction(self, done: bool) -> float:
        """Estimated fraction of the run done, in [0, 1]; 1 once the run is done."""
        if done:
            return 1.0
        online_total = self.online_total
        if online_total is None:
            expected = self.params.random_assignment_iterations + EXPECTED_CONVERGED_ONLINE_ITERATIONS
            online_total = max(self.online_done + 1, min(expected, self.params.max_online_iterations))
        visits_done = self.online_done * self.online_visits + self.full_done * self.n_particles
        visits_total = online_total * self.online_visits + self.params.final_full_iterations * self.n_particles
        return float(min(1.0, visits_done / max(visits_total, 1)))


def homo_fraction(iterations_done: int, params: HomoParameters, done: bool) -> float:
    """Estimated fraction of a homogeneous run done: iterations over their bound or the expected count."""
    if done:
        return 1.0
    expected = min(EXPECTED_HOMO_ITERATIONS, params.max_iterations or EXPECTED_HOMO_ITERATIONS)
    return iterations_done / max(iterations_done + 1, expected)


def _report(context: JobContext, stage: str, report: RefineIterationReport, total_iterations: int,
            fraction: float) -> None:
    """Publish one iteration's progress: stage ``<stage>-<phase>``, resolution reached, class sizes."""
    resolutions = np.asarray(report.half_map_resolution_a, dtype=np.float64)
    finite = resolutions[np.isfinite(resolutions)]
    context.report_progress(
        stage=f"{stage}-{report.phase}",
        iteration=report.iteration,
        total_iterations=total_iterations,
        fraction=fraction,
        current_resolution_a=float(finite.min()) if finite.size else report.resolution_a,
        message=_message(report),
        summary=_summary(report),
    )


def _angstroms(value: float) -> str:
    return f"{value:.1f}" if np.isfinite(value) else "-"


def _message(report: RefineIterationReport) -> str:
    text = f"iteration {report.iteration} ({report.phase}, search to {report.resolution_a:.1f} Å): "
    resolutions = ", ".join(_angstroms(value) for value in report.half_map_resolution_a)
    if len(report.class_fractions) == 1:
        return text + f"GSFSC {resolutions} Å"
    sizes = ", ".join(f"{fraction:.0%}" for fraction in report.class_fractions)
    text += f"class sizes {sizes}; half maps at {resolutions} Å"
    if np.isfinite(report.class_change_fraction):
        text += f"; {report.class_change_fraction:.1%} changed class"
    return text


def _summary(report: RefineIterationReport) -> dict[str, float]:
    summary = {"particles_scored": float(report.particles_scored), "search_resolution_a": report.resolution_a}
    if np.isfinite(report.class_change_fraction):
        summary["class_change_fraction"] = float(report.class_change_fraction)
    for number, (fraction, resolution) in enumerate(
        zip(report.class_fractions, report.half_map_resolution_a, strict=True), start=1
    ):
        summary[f"class_{number}_fraction"] = float(fraction)
        if np.isfinite(resolution):
            summary[f"class_{number}_half_map_resolution_a"] = float(resolution)
    return summary


def given_half_sets(selected: ParticleSet) -> np.ndarray | None:
    """The split (N,) 0 or 1 the input carries in ``rlnRandomSubset`` (1 or 2, both present), or None.

    A gold-standard split made upstream (e.g. by a refinement whose particles are refined again) is kept, so the
    halves stay independent across jobs; a set without one, or with other values, gets a fresh seeded split.
    """
    if "rlnRandomSubset" not in selected.table.particles.columns:
        return None
    labels = np.asarray(selected.table.particles["rlnRandomSubset"], dtype=np.float64)
    if not np.all(np.isin(labels, (1.0, 2.0))) or np.unique(labels).size != 2:
        return None
    return labels.astype(np.int64) - 1


class RefineServicer(refine_pb2_grpc.RefineServiceServicer):
    """Submits refinement jobs to the runner."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def SubmitHeterogeneousRefinement(  # noqa: N802  (gRPC method name)
        self, request: refine_pb2.SubmitHeterogeneousRefinementRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        """Validate and queue a heterogeneous refinement; returns its handle at once."""
        return self.runner.submit(HETERO_KIND, request)

    def SubmitHomogeneousRefinement(  # noqa: N802  (gRPC method name)
        self, request: refine_pb2.SubmitHomogeneousRefinementRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        """Validate and queue a homogeneous refinement; returns its handle at once."""
        return self.runner.submit(HOMO_KIND, request)


def register(server: grpc.Server, runner: JobRunner) -> Iterable[str]:
    """Add the refine service to a server and its two job kinds to the runner."""
    jobs = RefineJobs(runner.store.objects, runner.settings)
    runner.register(JobKind(
        name=HETERO_KIND,
        service="refine",
        request_type=refine_pb2.SubmitHeterogeneousRefinementRequest,
        run=jobs.run_hetero,
        validate=jobs.validate_hetero,
    ))
    runner.register(JobKind(
        name=HOMO_KIND,
        service="refine",
        request_type=refine_pb2.SubmitHomogeneousRefinementRequest,
        run=jobs.run_homo,
        validate=jobs.validate_homo,
    ))
    refine_pb2_grpc.add_RefineServiceServicer_to_server(RefineServicer(runner), server)
    return [SERVICE_NAME]

"""The abinitio gRPC service: a thin adapter registering the ab-initio job kind with the runtime.

Validation reads the input STAR (a missing set is NOT_FOUND; K < 1, a subset larger than the set, an initial
resolution finer than the maximum, a resolution finer than Nyquist, ... are INVALID_ARGUMENT naming the field)
before any job state is written. The job reads the selected particles once into memory (only the Fourier
coefficients inside the maximum resolution), iterates with a checkpoint every few iterations, and resumes from the
last checkpoint when resubmitted; its outputs are those of :mod:`cryostack.services.abinitio.outputs`.

Concurrency. Jobs with K = 1, 3 and 6 submitted together run at once in the runner's worker pool (its
``max_workers`` must be at least 3 for that). BLAS thread pools are process-wide, so while jobs run the service
gives each an equal share of the cores: the BLAS thread count is ``cores // running jobs`` (at least 1), updated
whenever an ab-initio job starts or ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
from threadpoolctl import ThreadpoolController

from cryostack.abinitio.v1 import abinitio_pb2, abinitio_pb2_grpc
from cryostack.config import ServiceSettings
from cryostack.core.backend import default_xp
from cryostack.core.spectra import SpectralLayout, collect_spectra
from cryostack.errors import InvalidArgumentError
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader
from cryostack.io.uri import S3Uri
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime import JobContext, JobKind, JobRunner
from cryostack.runtime.store import MANIFEST_FILE
from cryostack.services.inputs import ParticleSet, check_class_count, load_particle_set
from cryostack.services.abinitio import outputs
from cryostack.services.abinitio.algorithm import AbinitioRun
from cryostack.services.abinitio.parameters import AbinitioParameters
from cryostack.services.abinitio.state import AbinitioState, IterationReport

SERVICE_NAME = abinitio_pb2.DESCRIPTOR.services_by_name["AbinitioService"].full_name
KIND_NAME = "abinitio"
CHECKPOINT = "state.npz"
# Images read per ranged-GET batch while the particles are loaded.
READ_BATCH = 512
# Checkpoints per run (at most): the state holds K padded Fourier volumes, tens of MB for K = 6.
CHECKPOINTS_PER_RUN = 20
# The particles' kept coefficients live in memory; a selection needing more than this is refused.
MAX_SPECTRA_BYTES = 4 * 1024**3
# Weight of the final pass (which scores every particle on a finer grid) in particle visits per particle.
_FINAL_PASS_VISITS = 2.0

# Optional proto fields copied as they are into the algorithm's parameters.
_OPTIONAL_FIELDS = (
    "class_count", "minibatch_size_initial", "minibatch_size_final", "initial_resolution_a", "max_resolution_a",
    "learning_rate_initial", "class_similarity_initial", "class_similarity_final", "initial_iterations",
    "final_iterations",
)


def parameters_from_proto(message: abinitio_pb2.AbinitioParameters) -> AbinitioParameters:
    """Algorithm parameters from the request message; unset fields keep their defaults."""
    return AbinitioParameters(**{name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)})


def check_parameters(params: AbinitioParameters, n_particles: int | None = None,
                     pixel_size_a: float | None = None) -> None:
    """The algorithm's checks (those needing the set only when given), fields named ``parameters.<name>``."""
    try:
        params.check(n_particles, pixel_size_a)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"parameters.{error.field}", error.reason) from None


class BlasShare:
    """Splits the process's BLAS threads evenly between the ab-initio jobs running at the moment."""

    def __init__(self, cores: int | None = None) -> None:
        """Share ``cores`` (default: the cores this process may run on) between the jobs."""
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores or available
        self._running = 0
        self._lock = threading.Lock()
        self._controller = ThreadpoolController()

    def _apply(self) -> None:
        """Set the process's BLAS thread count to this share (threadpoolctl applies it at once)."""
        self._controller.limit(limits=max(1, self.cores // max(self._running, 1)), user_api="blas")

    @contextmanager
    def job(self) -> Iterator[None]:
        """Count a running job for the duration of the block."""
        with self._lock:
            self._running += 1
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._apply()


class AbinitioJobs:
    """Validation and execution of ab-initio jobs against one object store."""

    def __init__(self, objects: ObjectStore, settings: ServiceSettings, threads: BlasShare | None = None) -> None:
        self.objects = objects
        self.settings = settings
        self.threads = threads or BlasShare()

    def load_input(self, request: abinitio_pb2.SubmitAbinitioRequest) -> ParticleSet:
        """The particle set the request selects, checked against the service's limits."""
        subset = request.subset if request.HasField("subset") else None
        return load_particle_set(self.objects, self.settings, request.particles_uri, request.output_uri, subset)

    def validate(self, request: abinitio_pb2.SubmitAbinitioRequest) -> None:
        """Everything that can be checked before the job starts; raises before any state is written."""
        params = parameters_from_proto(request.parameters)
        check_class_count(params.class_count, self.settings)
        check_parameters(params)  # the request alone first: a bad parameter needs no read of the set
        selected = self.load_input(request)
        check_parameters(params, len(selected.table), selected.pixel_size_a)
        layout = SpectralLayout.for_resolution(selected.box_px, selected.pixel_size_a, params.max_resolution_a)
        needed = len(selected.table) * layout.n_coefficients * np.dtype(np.complex64).itemsize
        if needed > MAX_SPECTRA_BYTES:
            raise InvalidArgumentError(
                "subset", f"{len(selected.table)} particles need {needed / 2**30:.1f} GiB of Fourier coefficients at "
                          f"{params.max_resolution_a:g} Å; choose a subset (at most {MAX_SPECTRA_BYTES / 2**30:g} GiB)")

    def run(self, context: JobContext, request: abinitio_pb2.SubmitAbinitioRequest) -> abinitio_pb2.AbinitioResult:
        """Load the particles, iterate with checkpoints, run the final pass, then write the outputs."""
        params = parameters_from_proto(request.parameters)
        selected = self.load_input(request)
        n_particles = len(selected.table)
        layout = SpectralLayout.for_resolution(selected.box_px, selected.pixel_size_a, params.max_resolution_a)
        with self.threads.job():
            context.report_progress(stage="read", total_iterations=params.total_iterations,
                                    message=f"reading {n_particles} particles")
            reader = ParticleStackReader(self.objects, selected.table, request.particles_uri, batch_size=READ_BATCH)
            # The coefficients go to this process's backend (the GPU when there is one); the run follows them.
            spectra = collect_spectra(_checked(reader.iter_batches(), context), n_particles,
                                      selected.table.ctf_parameters(), layout, default_xp())
            saved = context.load_checkpoint(CHECKPOINT)
            run = AbinitioRun(spectra, params, context.seed, AbinitioState.from_bytes(saved) if saved else None)
            work = _Work(run)
            every = max(1, params.total_iterations // CHECKPOINTS_PER_RUN)
            while not run.done:
                context.check_cancelled()
                report = run.step()
                if report.iteration % every == 0 or run.done:
                    context.save_checkpoint(CHECKPOINT, run.state.to_bytes())
                context.report_progress(
                    stage="sgd",
                    iteration=report.iteration,
                    fraction=work.fraction(report.iteration, 0.0),
                    current_resolution_a=report.resolution_a,
                    message=_message(report),
                    summary=_summary(report),
                )
            context.check_cancelled()

            def on_final(done: float) -> None:
                context.check_cancelled()
                context.report_progress(stage="final-pass", fraction=work.fraction(params.total_iterations, done),
                                        message=f"final pass at {params.max_resolution_a:g} Å: {done:.0%} of "
                                                f"{n_particles} particles")

            result = run.finish(progress=on_final)
        context.check_cancelled()
        uris, classes = outputs.write_outputs(context.write_output, selected.table, result,
                                              layout.working_pixel_size_a)
        message = abinitio_pb2.AbinitioResult(
            particles_uri=uris[outputs.PARTICLES_STAR],
            report_png_uri=uris[outputs.REPORT_PNG],
            manifest_uri=str(S3Uri.parse(context.outputs_uri).join(MANIFEST_FILE)),
            particle_count=n_particles,
            final_resolution_a=result.final_resolution_a,
        )
        for number in range(1, classes.counts.size + 1):
            message.classes.add(
                class_number=number,
                volume_uri=uris[outputs.volume_name(number)],
                particle_count=int(classes.counts[number - 1]),
                occupancy_fraction=float(classes.occupancy[number - 1]),
            )
        return message


class _Work:
    """Fraction of a run's work done, counted in particle visits (minibatches, then the final pass)."""

    def __init__(self, run: AbinitioRun) -> None:
        self.visits = np.cumsum([run.minibatch_size_at(i) for i in range(run.params.total_iterations)])
        self.final = _FINAL_PASS_VISITS * run.spectra.n_particles

    def fraction(self, iterations_done: int, final_done: float) -> float:
        done = (self.visits[iterations_done - 1] if iterations_done else 0) + final_done * self.final
        return float(min(1.0, done / (self.visits[-1] + self.final)))


def _checked(batches: Iterable[tuple[np.ndarray, np.ndarray]], context: JobContext
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pass batches through, checking for cancellation before each."""
    for batch in batches:
        context.check_cancelled()
        yield batch


def _message(report: IterationReport) -> str:
    sizes = ", ".join(f"{fraction:.0%}" for fraction in report.class_fractions)
    return (f"iteration {report.iteration} of {report.total_iterations}: {report.resolution_a:.1f} Å, "
            f"class sizes {sizes}, objective {report.objective:.4f}")


def _summary(report: IterationReport) -> dict[str, float]:
    summary = {
        "objective": report.objective,
        "minibatch_size": float(report.minibatch_size),
        "learning_rate": report.learning_rate,
        "class_similarity": report.class_similarity,
    }
    for number, (fraction, resolution) in enumerate(
        zip(report.class_fractions, report.half_map_resolution_a, strict=True), start=1
    ):
        summary[f"class_{number}_fraction"] = float(fraction)
        summary[f"class_{number}_half_map_resolution_a"] = float(resolution)
    return summary


class AbinitioServicer(abinitio_pb2_grpc.AbinitioServiceServicer):
    """Submits ab-initio jobs to the runner."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def SubmitAbinitio(  # noqa: N802  (gRPC method name)
        self, request: abinitio_pb2.SubmitAbinitioRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        """Validate and queue a job; returns its handle at once."""
        return self.runner.submit(KIND_NAME, request)


def register(server: grpc.Server, runner: JobRunner) -> Iterable[str]:
    """Add the abinitio service to a server and its job kind to the runner."""
    jobs = AbinitioJobs(runner.store.objects, runner.settings)
    runner.register(JobKind(
        name=KIND_NAME,
        service="abinitio",
        request_type=abinitio_pb2.SubmitAbinitioRequest,
        run=jobs.run,
        validate=jobs.validate,
    ))
    abinitio_pb2_grpc.add_AbinitioServiceServicer_to_server(AbinitioServicer(runner), server)
    return [SERVICE_NAME]

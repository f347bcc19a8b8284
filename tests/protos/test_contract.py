"""Contract of the stage services' protos: every parameter with its unit and default, references not arrays,
presence of unset fields and results packed into jobs (the tables: contract_tables.py; comments and generated
code: test_proto_sources.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from cryostack.abinitio.v1 import abinitio_pb2, abinitio_pb2_grpc
from cryostack.classify2d.v1 import classify2d_pb2, classify2d_pb2_grpc
from cryostack.jobs.v1 import jobs_pb2
from cryostack.particles.v1 import particles_pb2
from cryostack.refine.v1 import refine_pb2, refine_pb2_grpc
from cryostack.variability.v1 import variability_pb2, variability_pb2_grpc

from contract_tables import (
    EXPECTED_PARAMETERS,
    EXPECTED_RESULT_FIELDS,
    EXPECTED_RPCS,
    LENGTH_SUFFIXES,
    LENGTH_WORDS,
    NUMERIC_TYPES,
    REPEATED_SCALAR_ALLOWED,
    STAGE_MODULES,
    T,
)


def contract_messages() -> Iterator[Descriptor]:
    """Every message (nested ones included) defined in the stage protos and the shared particles proto."""
    pending = [
        message
        for module in (*STAGE_MODULES, particles_pb2)
        for message in module.DESCRIPTOR.message_types_by_name.values()
    ]
    while pending:
        message = pending.pop()
        pending.extend(message.nested_types)
        yield message


def test_parameter_tables_match_the_protos_exactly() -> None:
    for message, expected in EXPECTED_PARAMETERS.items():
        actual = {field.name: field.type for field in message.fields}
        assert actual == {name: field_type for name, (field_type, _) in expected.items()}, message.full_name


def test_every_parameter_scalar_tracks_presence() -> None:
    for message in EXPECTED_PARAMETERS:
        for field in message.fields:
            # Enums use their *_UNSPECIFIED zero as "unset"; messages and repeated fields are unset when absent.
            if field.type in (T.TYPE_MESSAGE, T.TYPE_ENUM) or field.is_repeated:
                continue
            assert field.has_presence, f"{message.full_name}.{field.name} cannot tell unset from zero"


def test_classify2d_cap_is_a_oneof_of_count_and_multiple_of_mean() -> None:
    message = classify2d_pb2.Classify2DParameters.DESCRIPTOR
    cap = message.oneofs_by_name["max_particles_per_class"]
    assert {field.name for field in cap.fields} == {
        "max_particles_per_class_count",
        "max_particles_per_class_mean_multiple",
    }
    parameters = classify2d_pb2.Classify2DParameters(max_particles_per_class_count=400)
    parameters.max_particles_per_class_mean_multiple = 1.5
    assert parameters.WhichOneof("max_particles_per_class") == "max_particles_per_class_mean_multiple"
    assert not parameters.HasField("max_particles_per_class_count")
    assert classify2d_pb2.Classify2DParameters().WhichOneof("max_particles_per_class") is None


def test_subset_is_a_oneof_of_random_draw_index_list_and_class_numbers() -> None:
    selection = particles_pb2.ParticleSubset.DESCRIPTOR.oneofs_by_name["selection"]
    assert {field.name: field.number for field in selection.fields} == {
        "random": 1, "index_list_uri": 2, "class_numbers": 3,
    }
    class_field = particles_pb2.ParticleSubset.DESCRIPTOR.fields_by_name["class_numbers"]
    assert class_field.message_type is particles_pb2.ClassSelection.DESCRIPTOR
    numbers = particles_pb2.ClassSelection.DESCRIPTOR.fields_by_name["class_numbers"]
    assert numbers.is_repeated and numbers.type == T.TYPE_UINT32
    subset = particles_pb2.ParticleSubset(index_list_uri="s3://cryostack/demo/subset.txt")
    subset.class_numbers.class_numbers.extend([1, 4])
    decoded = particles_pb2.ParticleSubset.FromString(subset.SerializeToString())
    assert decoded.WhichOneof("selection") == "class_numbers"
    assert list(decoded.class_numbers.class_numbers) == [1, 4]
    assert not decoded.HasField("index_list_uri")


def test_display_modes_are_a_oneof_with_top_hat_and_overlapping_windows() -> None:
    mode = variability_pb2.VariabilityDisplayParameters.DESCRIPTOR.oneofs_by_name["mode"]
    assert {field.name for field in mode.fields} == {"simple", "cluster", "intermediates"}
    windows = set(variability_pb2.IntermediatesWindow.keys())
    assert windows == {
        "INTERMEDIATES_WINDOW_UNSPECIFIED",
        "INTERMEDIATES_WINDOW_TOP_HAT",
        "INTERMEDIATES_WINDOW_OVERLAPPING",
    }


@pytest.mark.parametrize("method_key", list(EXPECTED_RPCS), ids=lambda key: key[1])
def test_submit_rpc_returns_a_job_at_once(method_key: tuple[str, str]) -> None:
    service_name, method_name = method_key
    request, parameters, references, _ = EXPECTED_RPCS[method_key]
    module = next(m for m in STAGE_MODULES if service_name.startswith(m.DESCRIPTOR.package + "."))
    method = module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]].methods_by_name[method_name]
    assert method.input_type is request
    assert method.output_type is jobs_pb2.Job.DESCRIPTOR
    assert not method.client_streaming and not method.server_streaming
    fields = request.fields_by_name
    for name in ("idempotency_key", "particles_uri", "output_uri", *references):
        assert fields[name].type == T.TYPE_STRING, name
    assert fields["subset"].message_type is particles_pb2.ParticleSubset.DESCRIPTOR
    assert fields["parameters"].message_type is parameters
    assert fields["random_seed"].type == T.TYPE_UINT64 and fields["random_seed"].has_presence


def test_grpc_stubs_and_servicers_are_generated() -> None:
    for grpc_module, service in (
        (classify2d_pb2_grpc, "Classify2DService"),
        (abinitio_pb2_grpc, "AbinitioService"),
        (refine_pb2_grpc, "RefineService"),
        (variability_pb2_grpc, "VariabilityService"),
    ):
        assert callable(getattr(grpc_module, f"{service}Stub"))
        assert callable(getattr(grpc_module, f"add_{service}Servicer_to_server"))


def test_results_carry_output_references_and_summaries() -> None:
    for message, expected in EXPECTED_RESULT_FIELDS.items():
        missing = expected - set(message.fields_by_name)
        assert not missing, f"{message.full_name} lacks {sorted(missing)}"


def test_messages_carry_references_not_arrays() -> None:
    for message in contract_messages():
        for field in message.fields:
            where = f"{message.full_name}.{field.name}"
            assert field.type != T.TYPE_BYTES, f"{where}: bytes would carry data, not a reference"
            if field.is_repeated and field.type not in (T.TYPE_MESSAGE, T.TYPE_STRING):
                assert field.name in REPEATED_SCALAR_ALLOWED, f"{where}: repeated numbers are an array"
            if field.name.endswith(("_uri", "_uris")):
                assert field.type == T.TYPE_STRING, where


def test_lengths_carry_their_unit_in_the_name() -> None:
    for message in contract_messages():
        for field in message.fields:
            if field.type in NUMERIC_TYPES and any(word in field.name for word in LENGTH_WORDS):
                assert field.name.endswith(LENGTH_SUFFIXES), f"{message.full_name}.{field.name} has no unit"


@pytest.mark.parametrize("message", list(EXPECTED_PARAMETERS), ids=lambda m: m.name)
def test_unset_parameters_differ_from_zero_after_a_round_trip(message: Descriptor) -> None:
    message_class = _message_class(message)
    for field in message.fields:
        if not field.has_presence or field.type == T.TYPE_MESSAGE:
            continue
        zero = message_class(**{field.name: field.default_value})
        decoded_zero = message_class.FromString(zero.SerializeToString())
        decoded_unset = message_class.FromString(message_class().SerializeToString())
        assert decoded_zero.HasField(field.name), field.name
        assert getattr(decoded_zero, field.name) == field.default_value
        assert not decoded_unset.HasField(field.name), field.name
        assert getattr(decoded_unset, field.name) == field.default_value


def _classify2d_case() -> tuple[Message, Message]:
    """A full 2D classification request with a capped class size, and a matching result."""
    request = classify2d_pb2.SubmitClassify2DRequest(
        idempotency_key="demo-classify2d",
        particles_uri="s3://cryostack/demo/particles.star",
        subset=particles_pb2.ParticleSubset(random=particles_pb2.RandomSubset(particle_count=20_000, seed=7)),
        output_uri="s3://cryostack/runs/demo/",
        parameters=classify2d_pb2.Classify2DParameters(
            class_count=50,
            max_resolution_a=6.0,
            force_max_over_poses_shifts=False,
            max_particles_per_class_mean_multiple=2.0,
            min_particles_per_class=0,
        ),
        random_seed=0,
    )
    result = classify2d_pb2.Classify2DResult(
        particles_uri="s3://cryostack/runs/demo/jobs/abc/particles.star",
        class_averages_uri="s3://cryostack/runs/demo/jobs/abc/class_averages.mrcs",
        montage_png_uri="s3://cryostack/runs/demo/jobs/abc/classes.png",
        manifest_uri="s3://cryostack/runs/demo/jobs/abc/manifest.json",
        classes=[
            classify2d_pb2.Class2DSummary(class_number=1, particle_count=800, frc_resolution_a=9.5),
            classify2d_pb2.Class2DSummary(class_number=2, particle_count=0),
        ],
        particle_count=20_000,
        max_particles_per_class_count=800,
        empty_class_count=1,
    )
    return request, result


def _abinitio_case() -> tuple[Message, Message]:
    """An ab-initio request on an index-list subset, and a three-class result."""
    request = abinitio_pb2.SubmitAbinitioRequest(
        idempotency_key="demo-abinitio-k3",
        particles_uri="s3://cryostack/demo/particles.star",
        subset=particles_pb2.ParticleSubset(index_list_uri="s3://cryostack/demo/subset.txt"),
        output_uri="s3://cryostack/runs/demo/",
        parameters=abinitio_pb2.AbinitioParameters(class_count=3, class_similarity_final=0.0),
        random_seed=3,
    )
    result = abinitio_pb2.AbinitioResult(
        particles_uri="s3://cryostack/runs/demo/jobs/k3/particles.star",
        classes=[
            abinitio_pb2.AbinitioClass(
                class_number=k, volume_uri=f"s3://cryostack/runs/demo/jobs/k3/class_{k}.mrc", particle_count=100
            )
            for k in (1, 2, 3)
        ],
        report_png_uri="s3://cryostack/runs/demo/jobs/k3/report.png",
        manifest_uri="s3://cryostack/runs/demo/jobs/k3/manifest.json",
        particle_count=300,
        final_resolution_a=12.0,
    )
    return request, result


def _heterogeneous_case() -> tuple[Message, Message]:
    """A heterogeneous refinement request against two volumes, and its result."""
    request = refine_pb2.SubmitHeterogeneousRefinementRequest(
        idempotency_key="demo-hetero",
        particles_uri="s3://cryostack/demo/particles.star",
        volume_uris=["s3://cryostack/runs/demo/jobs/k3/class_1.mrc", "s3://cryostack/runs/demo/jobs/k3/class_2.mrc"],
        output_uri="s3://cryostack/runs/demo/",
        parameters=refine_pb2.HeterogeneousRefinementParameters(random_assignment_iterations=0),
    )
    result = refine_pb2.HeterogeneousRefinementResult(
        particles_uri="s3://cryostack/runs/demo/jobs/het/particles.star",
        classes=[
            refine_pb2.RefinedClass(
                class_number=1,
                volume_uri="s3://cryostack/runs/demo/jobs/het/class_1.mrc",
                half_map_a_uri="s3://cryostack/runs/demo/jobs/het/class_1_half_a.mrc",
                half_map_b_uri="s3://cryostack/runs/demo/jobs/het/class_1_half_b.mrc",
                particle_count=5_000,
                gsfsc_resolution_a=8.2,
            )
        ],
        fsc_csv_uri="s3://cryostack/runs/demo/jobs/het/fsc.csv",
        manifest_uri="s3://cryostack/runs/demo/jobs/het/manifest.json",
    )
    return request, result


def _homogeneous_case() -> tuple[Message, Message]:
    """A homogeneous refinement request with a capped iteration count, and its result."""
    request = refine_pb2.SubmitHomogeneousRefinementRequest(
        idempotency_key="demo-homo",
        particles_uri="s3://cryostack/runs/demo/jobs/het/class_1.star",
        volume_uri="s3://cryostack/runs/demo/jobs/het/class_1.mrc",
        output_uri="s3://cryostack/runs/demo/",
        parameters=refine_pb2.HomogeneousRefinementParameters(max_iterations=8, mask_dilation_a=0.0),
    )
    result = refine_pb2.HomogeneousRefinementResult(
        particles_uri="s3://cryostack/runs/demo/jobs/homo/particles.star",
        map_uri="s3://cryostack/runs/demo/jobs/homo/map.mrc",
        half_map_a_uri="s3://cryostack/runs/demo/jobs/homo/half_a.mrc",
        half_map_b_uri="s3://cryostack/runs/demo/jobs/homo/half_b.mrc",
        mask_uri="s3://cryostack/runs/demo/jobs/homo/mask.mrc",
        fsc_csv_uri="s3://cryostack/runs/demo/jobs/homo/fsc.csv",
        manifest_uri="s3://cryostack/runs/demo/jobs/homo/manifest.json",
        gsfsc_resolution_a=7.1,
    )
    return request, result


def _variability_case() -> tuple[Message, Message]:
    """A 3D variability request (filter resolution set, as required), and its result."""
    request = variability_pb2.SubmitVariabilityAnalysisRequest(
        idempotency_key="demo-3dva",
        particles_uri="s3://cryostack/runs/demo/jobs/homo/particles.star",
        mask_uri="s3://cryostack/runs/demo/jobs/homo/mask.mrc",
        output_uri="s3://cryostack/runs/demo/",
        parameters=variability_pb2.VariabilityAnalysisParameters(filter_resolution_a=10.0, per_particle_scale=False),
    )
    result = variability_pb2.VariabilityAnalysisResult(
        particles_uri="s3://cryostack/runs/demo/jobs/3dva/particles.star",
        mean_volume_uri="s3://cryostack/runs/demo/jobs/3dva/mean.mrc",
        components=[
            variability_pb2.VariabilityComponent(
                component_number=1,
                volume_uri="s3://cryostack/runs/demo/jobs/3dva/component_1.mrc",
                variance_explained_fraction=0.4,
            )
        ],
        manifest_uri="s3://cryostack/runs/demo/jobs/3dva/manifest.json",
    )
    return request, result


def _display_case() -> tuple[Message, Message]:
    """An intermediates display request with overlapping windows, and a cluster result."""
    request = variability_pb2.SubmitVariabilityDisplayRequest(
        idempotency_key="demo-display",
        particles_uri="s3://cryostack/runs/demo/jobs/3dva/particles.star",
        mean_volume_uri="s3://cryostack/runs/demo/jobs/3dva/mean.mrc",
        component_volume_uris=["s3://cryostack/runs/demo/jobs/3dva/component_1.mrc"],
        output_uri="s3://cryostack/runs/demo/",
        parameters=variability_pb2.VariabilityDisplayParameters(
            intermediates=variability_pb2.IntermediatesDisplay(
                component_numbers=[1],
                frame_count=5,
                window=variability_pb2.INTERMEDIATES_WINDOW_OVERLAPPING,
                window_width_frames=2,
            )
        ),
    )
    result = variability_pb2.VariabilityDisplayResult(
        cluster=variability_pb2.ClusterDisplayResult(
            clusters=[
                variability_pb2.DisplayCluster(
                    cluster_number=1,
                    particles_uri="s3://cryostack/runs/demo/jobs/display/cluster_1.star",
                    volume_uri="s3://cryostack/runs/demo/jobs/display/cluster_1.mrc",
                    particle_count=4_200,
                )
            ]
        ),
        manifest_uri="s3://cryostack/runs/demo/jobs/display/manifest.json",
    )
    return request, result


ROUND_TRIP_CASES: dict[str, Callable[[], tuple[Message, Message]]] = {
    "SubmitClassify2D": _classify2d_case,
    "SubmitAbinitio": _abinitio_case,
    "SubmitHeterogeneousRefinement": _heterogeneous_case,
    "SubmitHomogeneousRefinement": _homogeneous_case,
    "SubmitVariabilityAnalysis": _variability_case,
    "SubmitVariabilityDisplay": _display_case,
}


@pytest.mark.parametrize("method_key", list(EXPECTED_RPCS), ids=lambda key: key[1])
def test_request_and_result_round_trip_through_a_job(method_key: tuple[str, str]) -> None:
    request_descriptor, _, _, result_descriptor = EXPECTED_RPCS[method_key]
    request, result = ROUND_TRIP_CASES[method_key[1]]()
    assert request.DESCRIPTOR is request_descriptor and result.DESCRIPTOR is result_descriptor

    decoded_request = type(request).FromString(request.SerializeToString())
    assert decoded_request == request
    explicit_zeros = [f.name for f, value in request.parameters.ListFields() if f.has_presence and not value]
    for name in explicit_zeros:
        assert decoded_request.parameters.HasField(name), name

    job = jobs_pb2.Job(name="jobs/abc", state=jobs_pb2.JOB_STATE_SUCCEEDED, done=True)
    job.result.Pack(result)
    decoded_job = jobs_pb2.Job.FromString(job.SerializeToString())
    assert decoded_job.result.Is(result_descriptor)
    assert decoded_job.result.type_url == f"type.googleapis.com/{result_descriptor.full_name}"
    unpacked = type(result)()
    assert decoded_job.result.Unpack(unpacked)
    assert unpacked == result
    assert not decoded_job.result.Is(request_descriptor)


def test_round_trip_cases_set_explicit_zeros() -> None:
    """Guard: the round-trip cases exercise presence, so a lost explicit zero would fail the test above."""
    zero_counts = [
        sum(1 for f, value in build()[0].parameters.ListFields() if f.has_presence and not value)
        for build in (_classify2d_case, _abinitio_case, _heterogeneous_case, _homogeneous_case)
    ]
    assert all(count >= 1 for count in zero_counts)


def test_a_large_result_stays_small() -> None:
    """200 classes' summaries stay far below gRPC's default 4 MiB message limit."""
    _, result = _classify2d_case()
    del result.classes[:]
    result.classes.extend(
        classify2d_pb2.Class2DSummary(class_number=k, particle_count=10**6, frc_resolution_a=6.0)
        for k in range(1, 201)
    )
    assert result.ByteSize() < 16 * 1024


def _message_class(message: Descriptor) -> type[Message]:
    """The generated Python class of a message descriptor."""
    module = next(m for m in STAGE_MODULES if m.DESCRIPTOR is message.file)
    return getattr(module, message.name)

"""Contract of the stage services' protos: every parameter with its unit and default, references not arrays,
presence of unset fields, results packed into jobs, comments, and current generated code."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from cryostack.abinitio.v1 import abinitio_pb2, abinitio_pb2_grpc
from cryostack.classify2d.v1 import classify2d_pb2, classify2d_pb2_grpc
from cryostack.jobs.v1 import jobs_pb2
from cryostack.particles.v1 import particles_pb2
from cryostack.refine.v1 import refine_pb2, refine_pb2_grpc
from cryostack.variability.v1 import variability_pb2, variability_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "protos" / "generate.py"
STAGE_MODULES = (classify2d_pb2, abinitio_pb2, refine_pb2, variability_pb2)
CONTRACT_FILES = {module.DESCRIPTOR.name for module in (*STAGE_MODULES, particles_pb2)}

T = FieldDescriptor
# Every stage parameter, per parameters message: field name -> (type, default the comment must state as
# "Default <value>", or None where unset means "no value" and the comment must say what "Unset" does).
EXPECTED_PARAMETERS: dict[Descriptor, dict[str, tuple[int, str | None]]] = {
    classify2d_pb2.Classify2DParameters.DESCRIPTOR: {
        "class_count": (T.TYPE_UINT32, "50"),
        "max_resolution_a": (T.TYPE_DOUBLE, "6 Å"),
        "initial_uncertainty_factor": (T.TYPE_DOUBLE, "2"),
        "online_em_iterations": (T.TYPE_UINT32, "20"),
        "batch_size_per_class": (T.TYPE_UINT32, "100"),
        "final_full_iterations": (T.TYPE_UINT32, "1"),
        "sigma_annealing_start_iteration": (T.TYPE_UINT32, "2"),
        "sigma_annealing_iterations": (T.TYPE_UINT32, "15"),
        "force_max_over_poses_shifts": (T.TYPE_BOOL, "true"),
        "circular_mask_inner_diameter_a": (T.TYPE_DOUBLE, None),
        "circular_mask_outer_diameter_a": (T.TYPE_DOUBLE, None),
        "recenter_classes": (T.TYPE_BOOL, "true"),
        "zero_pad_factor": (T.TYPE_UINT32, "2"),
        "max_particles_per_class_count": (T.TYPE_UINT64, None),
        "max_particles_per_class_mean_multiple": (T.TYPE_DOUBLE, None),
        "min_particles_per_class": (T.TYPE_UINT64, None),
    },
    abinitio_pb2.AbinitioParameters.DESCRIPTOR: {
        "class_count": (T.TYPE_UINT32, "1"),
        "minibatch_size_initial": (T.TYPE_UINT32, "90"),
        "minibatch_size_final": (T.TYPE_UINT32, "300"),
        "initial_resolution_a": (T.TYPE_DOUBLE, "35 Å"),
        "max_resolution_a": (T.TYPE_DOUBLE, "12 Å"),
        "learning_rate_initial": (T.TYPE_DOUBLE, "0.4"),
        "class_similarity_initial": (T.TYPE_DOUBLE, "0.1"),
        "class_similarity_final": (T.TYPE_DOUBLE, "0"),
        "initial_iterations": (T.TYPE_UINT32, "200"),
        "final_iterations": (T.TYPE_UINT32, "300"),
    },
    refine_pb2.HeterogeneousRefinementParameters.DESCRIPTOR: {
        "batch_size_per_class": (T.TYPE_UINT32, "1000"),
        "initial_resolution_a": (T.TYPE_DOUBLE, "20 Å"),
        "random_assignment_iterations": (T.TYPE_UINT32, "5"),
        "final_full_iterations": (T.TYPE_UINT32, "2"),
        "convergence_class_change_fraction": (T.TYPE_DOUBLE, "0.05"),
        "max_online_iterations": (T.TYPE_UINT32, "50"),
        "max_resolution_a": (T.TYPE_DOUBLE, None),
    },
    refine_pb2.HomogeneousRefinementParameters.DESCRIPTOR: {
        "initial_lowpass_resolution_a": (T.TYPE_DOUBLE, "30 Å"),
        "mask_threshold_fraction": (T.TYPE_DOUBLE, "0.2"),
        "mask_dilation_a": (T.TYPE_DOUBLE, "3 Å"),
        "mask_soft_edge_width_a": (T.TYPE_DOUBLE, "3 Å"),
        "max_iterations": (T.TYPE_UINT32, None),
        "global_iterations": (T.TYPE_UINT32, "2"),
        "max_resolution_a": (T.TYPE_DOUBLE, None),
    },
    variability_pb2.VariabilityAnalysisParameters.DESCRIPTOR: {
        "component_count": (T.TYPE_UINT32, "3"),
        "iterations": (T.TYPE_UINT32, "20"),
        "filter_resolution_a": (T.TYPE_DOUBLE, None),
        "filter_order": (T.TYPE_DOUBLE, "1.5"),
        "highpass_resolution_a": (T.TYPE_DOUBLE, None),
        "highpass_order": (T.TYPE_DOUBLE, "8"),
        "per_particle_scale": (T.TYPE_BOOL, "true"),
        "regularization_lambda": (T.TYPE_DOUBLE, "0.01"),
    },
    variability_pb2.VariabilityDisplayParameters.DESCRIPTOR: {
        "simple": (T.TYPE_MESSAGE, None),
        "cluster": (T.TYPE_MESSAGE, None),
        "intermediates": (T.TYPE_MESSAGE, None),
        "filter_resolution_a": (T.TYPE_DOUBLE, None),
    },
    variability_pb2.SimpleDisplay.DESCRIPTOR: {
        "component_numbers": (T.TYPE_UINT32, None),
        "frame_count": (T.TYPE_UINT32, "20"),
    },
    variability_pb2.ClusterDisplay.DESCRIPTOR: {
        "component_numbers": (T.TYPE_UINT32, None),
        "cluster_count": (T.TYPE_UINT32, "20"),
    },
    variability_pb2.IntermediatesDisplay.DESCRIPTOR: {
        "component_numbers": (T.TYPE_UINT32, None),
        "frame_count": (T.TYPE_UINT32, "20"),
        "window": (T.TYPE_ENUM, None),
        "window_width_frames": (T.TYPE_UINT32, "2"),
    },
}

# Every Submit RPC: (service, method) -> (request message, parameters message, input references beyond the
# particle set, result message packed into Job.result).
EXPECTED_RPCS: dict[tuple[str, str], tuple[Descriptor, Descriptor, tuple[str, ...], Descriptor]] = {
    ("cryostack.classify2d.v1.Classify2DService", "SubmitClassify2D"): (
        classify2d_pb2.SubmitClassify2DRequest.DESCRIPTOR,
        classify2d_pb2.Classify2DParameters.DESCRIPTOR,
        (),
        classify2d_pb2.Classify2DResult.DESCRIPTOR,
    ),
    ("cryostack.abinitio.v1.AbinitioService", "SubmitAbinitio"): (
        abinitio_pb2.SubmitAbinitioRequest.DESCRIPTOR,
        abinitio_pb2.AbinitioParameters.DESCRIPTOR,
        (),
        abinitio_pb2.AbinitioResult.DESCRIPTOR,
    ),
    ("cryostack.refine.v1.RefineService", "SubmitHeterogeneousRefinement"): (
        refine_pb2.SubmitHeterogeneousRefinementRequest.DESCRIPTOR,
        refine_pb2.HeterogeneousRefinementParameters.DESCRIPTOR,
        ("volume_uris",),
        refine_pb2.HeterogeneousRefinementResult.DESCRIPTOR,
    ),
    ("cryostack.refine.v1.RefineService", "SubmitHomogeneousRefinement"): (
        refine_pb2.SubmitHomogeneousRefinementRequest.DESCRIPTOR,
        refine_pb2.HomogeneousRefinementParameters.DESCRIPTOR,
        ("volume_uri",),
        refine_pb2.HomogeneousRefinementResult.DESCRIPTOR,
    ),
    ("cryostack.variability.v1.VariabilityService", "SubmitVariabilityAnalysis"): (
        variability_pb2.SubmitVariabilityAnalysisRequest.DESCRIPTOR,
        variability_pb2.VariabilityAnalysisParameters.DESCRIPTOR,
        ("mask_uri",),
        variability_pb2.VariabilityAnalysisResult.DESCRIPTOR,
    ),
    ("cryostack.variability.v1.VariabilityService", "SubmitVariabilityDisplay"): (
        variability_pb2.SubmitVariabilityDisplayRequest.DESCRIPTOR,
        variability_pb2.VariabilityDisplayParameters.DESCRIPTOR,
        ("mean_volume_uri", "component_volume_uris"),
        variability_pb2.VariabilityDisplayResult.DESCRIPTOR,
    ),
}

# Output references and small summaries each result must carry; results may carry more.
EXPECTED_RESULT_FIELDS: dict[Descriptor, set[str]] = {
    classify2d_pb2.Classify2DResult.DESCRIPTOR: {
        "particles_uri", "class_averages_uri", "montage_png_uri", "manifest_uri", "classes", "particle_count",
        "max_particles_per_class_count", "empty_class_count",
    },
    classify2d_pb2.Class2DSummary.DESCRIPTOR: {"class_number", "particle_count", "frc_resolution_a"},
    abinitio_pb2.AbinitioResult.DESCRIPTOR: {"particles_uri", "classes", "report_png_uri", "manifest_uri"},
    abinitio_pb2.AbinitioClass.DESCRIPTOR: {"class_number", "volume_uri", "particle_count", "occupancy_fraction"},
    refine_pb2.HeterogeneousRefinementResult.DESCRIPTOR: {
        "particles_uri", "classes", "fsc_csv_uri", "report_png_uri", "manifest_uri",
    },
    refine_pb2.RefinedClass.DESCRIPTOR: {
        "class_number", "volume_uri", "half_map_a_uri", "half_map_b_uri", "particle_count", "gsfsc_resolution_a",
    },
    refine_pb2.HomogeneousRefinementResult.DESCRIPTOR: {
        "particles_uri", "map_uri", "half_map_a_uri", "half_map_b_uri", "mask_uri", "fsc_csv_uri",
        "report_png_uri", "manifest_uri", "gsfsc_resolution_a",
    },
    variability_pb2.VariabilityAnalysisResult.DESCRIPTOR: {
        "particles_uri", "mean_volume_uri", "components", "report_png_uri", "manifest_uri",
    },
    variability_pb2.VariabilityComponent.DESCRIPTOR: {
        "component_number", "volume_uri", "variance_explained_fraction",
    },
    variability_pb2.VariabilityDisplayResult.DESCRIPTOR: {
        "simple", "cluster", "intermediates", "report_png_uri", "manifest_uri",
    },
    variability_pb2.DisplayCluster.DESCRIPTOR: {"cluster_number", "particles_uri", "volume_uri", "particle_count"},
    variability_pb2.IntermediateFrame.DESCRIPTOR: {
        "component_number", "frame_number", "particles_uri", "volume_uri", "particle_count",
    },
    variability_pb2.SeriesFrame.DESCRIPTOR: {"component_number", "frame_number", "volume_uri"},
}

# Words naming a physical length: a field containing one must say its unit (Å) or count frames.
LENGTH_WORDS = ("resolution", "diameter", "radius", "dilation", "width", "defocus", "shift", "pixel_size")
NUMERIC_TYPES = (T.TYPE_DOUBLE, T.TYPE_FLOAT, T.TYPE_UINT32, T.TYPE_UINT64, T.TYPE_INT32, T.TYPE_INT64)
LENGTH_SUFFIXES = ("_a", "_frames")
# The only repeated scalar fields allowed: short selections of components or classes, never data.
REPEATED_SCALAR_ALLOWED = {"component_numbers", "class_numbers"}


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


@pytest.fixture(scope="module")
def source_comments(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[tuple[int, ...], str]]:
    """Leading comments of every declaration in the contract files, by file name and source-info path."""
    descriptor_set_path = tmp_path_factory.mktemp("descriptors") / "image.binpb"
    _run_generate("--descriptor-set", str(descriptor_set_path))
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path.read_bytes())
    return {
        file.name: {
            tuple(location.path): location.leading_comments.strip() for location in file.source_code_info.location
        }
        for file in descriptor_set.file
        if file.name in CONTRACT_FILES
    }


def test_every_declaration_has_a_comment(source_comments: dict[str, dict[tuple[int, ...], str]]) -> None:
    assert set(source_comments) == CONTRACT_FILES
    for module in (*STAGE_MODULES, particles_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file_proto)
        comments = source_comments[file_proto.name]
        for path, name in _declarations(file_proto):
            assert comments.get(path), f"{file_proto.name}: {name} has no comment"


def test_parameter_comments_state_the_default(source_comments: dict[str, dict[tuple[int, ...], str]]) -> None:
    for message, expected in EXPECTED_PARAMETERS.items():
        comments = source_comments[message.file.name]
        for field in message.fields:
            comment = comments[_field_path(message, field)]
            default = expected[field.name][1]
            where = f"{message.full_name}.{field.name}"
            if default is not None:
                assert re.search(rf"Default {re.escape(default)}(?!\w|\.\d)", comment), f"{where}: {comment!r}"
            elif field.has_presence and field.type != T.TYPE_MESSAGE and field.containing_oneof is None:
                assert "Unset" in comment or "unset" in comment, f"{where} does not say what unset means"


def test_generated_code_is_current() -> None:
    result = _run_generate("--check")
    assert "generated code is current" in result.stdout


def _run_generate(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the project's codegen command (protos/generate.py) with this interpreter and fail on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(GENERATE), *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _declarations(file_proto: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    """Source-info paths and names of every message, field, oneof, enum, enum value, service and RPC of a file."""
    for index, service in enumerate(file_proto.service):
        yield (6, index), service.name
        for method_index, method in enumerate(service.method):
            yield (6, index, 2, method_index), f"{service.name}.{method.name}"
    for index, enum in enumerate(file_proto.enum_type):
        yield from _enum_declarations((5, index), enum)
    for index, message in enumerate(file_proto.message_type):
        yield from _message_declarations((4, index), message)


def _message_declarations(
    path: tuple[int, ...], message: descriptor_pb2.DescriptorProto
) -> Iterator[tuple[tuple[int, ...], str]]:
    """Paths and names of a message and everything declared inside it."""
    yield path, message.name
    for index, field in enumerate(message.field):
        yield (*path, 2, index), f"{message.name}.{field.name}"
    for index, oneof in enumerate(message.oneof_decl):
        if not oneof.name.startswith("_"):  # proto3 `optional` fields get synthetic oneofs named "_<field>"
            yield (*path, 8, index), f"{message.name}.{oneof.name}"
    for index, nested in enumerate(message.nested_type):
        yield from _message_declarations((*path, 3, index), nested)
    for index, enum in enumerate(message.enum_type):
        yield from _enum_declarations((*path, 4, index), enum)


def _enum_declarations(
    path: tuple[int, ...], enum: descriptor_pb2.EnumDescriptorProto
) -> Iterator[tuple[tuple[int, ...], str]]:
    """Paths and names of an enum and its values."""
    yield path, enum.name
    for index, value in enumerate(enum.value):
        yield (*path, 2, index), f"{enum.name}.{value.name}"


def _field_path(message: Descriptor, field: FieldDescriptor) -> tuple[int, ...]:
    """Source-info path of a field of a top-level message."""
    assert message.containing_type is None, "parameter messages are top-level"
    file_proto = descriptor_pb2.FileDescriptorProto()
    message.file.CopyToProto(file_proto)
    message_index = [declared.name for declared in file_proto.message_type].index(message.name)
    return (4, message_index, 2, field.index)


def _message_class(message: Descriptor) -> type[Message]:
    """The generated Python class of a message descriptor."""
    module = next(m for m in STAGE_MODULES if m.DESCRIPTOR is message.file)
    return getattr(module, message.name)

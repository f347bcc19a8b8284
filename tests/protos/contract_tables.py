"""The stage protos' contract as tables: every parameter with its type and default, every Submit RPC with its
messages, the output references each result must carry, and the naming rules; read by the contract tests."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from cryostack.abinitio.v1 import abinitio_pb2
from cryostack.classify2d.v1 import classify2d_pb2
from cryostack.particles.v1 import particles_pb2
from cryostack.refine.v1 import refine_pb2
from cryostack.variability.v1 import variability_pb2

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

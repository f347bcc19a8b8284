"""Simulated datasets written to a real SeaweedFS and to a folder, read back by the platform's own readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from cryostack.cli.main import main
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.errors import InvalidArgumentError
from cryostack.io.dataset import (
    GROUND_TRUTH_COLUMNS,
    GROUND_TRUTH_CSV,
    GROUND_TRUTH_STAR,
    PARTICLES_STAR,
    SIMULATION_JSON,
    STACK_NAME,
    read_ground_truth_csv,
    write_simulated_dataset,
)
from cryostack.io.mrc import decode_mrc, read_mrc, read_mrc_file
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader
from cryostack.io.star import ParticleTable, parse_star, read_star, read_star_file

N_PARTICLES = 40
BOX_PX = 24
PIXEL_SIZE_A = 4.5
ANSWER_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber")


@pytest.fixture(scope="module")
def simulator() -> ParticleSimulator:
    params = SimulationParameters(n_particles=N_PARTICLES, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, seed=21,
                                  hinge_step_deg=10.0)
    return ParticleSimulator(scenario("floppy"), params)


@pytest.fixture(scope="module")
def expected_images(simulator: ParticleSimulator) -> np.ndarray:
    return simulator.images(0, N_PARTICLES)


@pytest.fixture
def prefix(bucket: str) -> str:
    return f"s3://{bucket}/simulated/run-{uuid.uuid4().hex[:10]}"


def check_tables(simulator: ParticleSimulator, table: ParticleTable, truth_table: ParticleTable) -> None:
    """The input STAR carries the simulated CTF and optics exactly and nothing of the answer."""
    truth = simulator.ground_truth
    assert len(table) == N_PARTICLES
    np.testing.assert_allclose(table.defocus_u_a, truth.defocus_u_a, rtol=1e-11)
    np.testing.assert_allclose(table.defocus_v_a, truth.defocus_v_a, rtol=1e-11)
    np.testing.assert_allclose(table.defocus_angle_deg, truth.defocus_angle_deg, rtol=1e-11, atol=1e-9)
    np.testing.assert_array_equal(table.voltage_kv, 300.0)
    np.testing.assert_array_equal(table.cs_mm, 2.7)
    np.testing.assert_array_equal(table.amplitude_contrast, 0.1)
    np.testing.assert_array_equal(table.pixel_size_a, PIXEL_SIZE_A)
    assert table.box_size_px == BOX_PX
    np.testing.assert_array_equal(table.image_refs.index, np.arange(N_PARTICLES))
    assert set(table.image_refs.path) == {STACK_NAME}
    assert not set(ANSWER_COLUMNS) & set(table.particles.columns)
    assert table.euler_angles_deg is None and table.origin_xy_a is None
    euler = np.stack([truth.rot_deg, truth.tilt_deg, truth.psi_deg], axis=1)
    np.testing.assert_allclose(truth_table.euler_angles_deg, euler, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(truth_table.origin_xy_a, np.stack([truth.origin_x_a, truth.origin_y_a], 1),
                               rtol=1e-11, atol=1e-9)
    np.testing.assert_array_equal(truth_table.column("rlnClassNumber"), truth.state + 1)
    np.testing.assert_allclose(truth_table.defocus_u_a, table.defocus_u_a)


def check_ground_truth(simulator: ParticleSimulator, csv_payload: bytes, description_payload: bytes,
                       maps: dict[str, np.ndarray]) -> None:
    """The ground-truth CSV, the description and the true maps match the simulator."""
    truth = simulator.ground_truth
    frame = read_ground_truth_csv(csv_payload)
    assert list(frame.columns) == list(GROUND_TRUTH_COLUMNS)
    np.testing.assert_array_equal(frame["index"], np.arange(N_PARTICLES))
    for column in ("rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a", "defocus_u_a"):
        np.testing.assert_allclose(frame[column], getattr(truth, column), rtol=1e-9, atol=1e-7)
    np.testing.assert_array_equal(frame["state"], truth.state)
    np.testing.assert_array_equal(frame["domain_present"].astype(bool), truth.domain_present)
    np.testing.assert_array_equal(np.isnan(frame["hinge_angle_deg"]), ~truth.domain_present)
    present = truth.domain_present
    np.testing.assert_allclose(frame["hinge_angle_deg"][present], truth.hinge_angle_deg[present])
    assert set(frame["state_label"]) <= {"domain_present", "domain_absent"}
    description = json.loads(description_payload)
    assert description["scenario"]["name"] == "floppy"
    assert description["seed"] == 21 and description["snr"] == pytest.approx(0.1)
    assert description["noise_sigma"] == pytest.approx(simulator.noise_sigma)
    assert "SNR" in description["snr_definition"]
    expected_maps = simulator.ground_truth_maps()
    assert set(maps) == set(expected_maps)
    for name, volume in maps.items():
        np.testing.assert_array_equal(volume, expected_maps[name])


def test_dataset_round_trips_through_the_object_store(
    object_store: ObjectStore, prefix: str, simulator: ParticleSimulator, expected_images: np.ndarray
) -> None:
    seen: list[tuple[int, int]] = []
    dataset = write_simulated_dataset(simulator, prefix, object_store, batch_size=16,
                                      progress=lambda done, total: seen.append((done, total)))
    assert seen == [(16, 40), (32, 40), (40, 40)]
    assert dataset.particles_star == f"{prefix}/{PARTICLES_STAR}"
    stored = {str(info.uri)[len(prefix) + 1 :] for info in object_store.list(prefix + "/")}
    assert stored == set(dataset.files)
    table = read_star(object_store, dataset.particles_star)
    truth_table = read_star(object_store, f"{prefix}/{GROUND_TRUTH_STAR}")
    check_tables(simulator, table, truth_table)
    stack = read_mrc(object_store, f"{prefix}/{STACK_NAME}")
    assert (stack.header.nx, stack.header.ny, stack.header.nz) == (BOX_PX, BOX_PX, N_PARTICLES)
    assert stack.header.voxel_size_a[0] == pytest.approx(PIXEL_SIZE_A)
    reader = ParticleStackReader(object_store, table, dataset.particles_star, batch_size=16)
    np.testing.assert_array_equal(reader.read(np.arange(N_PARTICLES)), expected_images)
    maps = {Path(path).stem: read_mrc(object_store, f"{prefix}/{path}").data
            for path in dataset.files if path.endswith(".mrc")}
    check_ground_truth(simulator, object_store.get_bytes(f"{prefix}/{GROUND_TRUTH_CSV}"),
                       object_store.get_bytes(f"{prefix}/{SIMULATION_JSON}"), maps)
    assert read_mrc(object_store, f"{prefix}/ground_truth/maps/mean.mrc").header.voxel_size_a[0] == pytest.approx(
        PIXEL_SIZE_A)


def test_dataset_written_to_a_folder_holds_the_same_files(
    tmp_path: Path, simulator: ParticleSimulator, expected_images: np.ndarray
) -> None:
    dataset = write_simulated_dataset(simulator, tmp_path / "sim", batch_size=64)
    root = tmp_path / "sim"
    written = {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}
    assert written == set(dataset.files)
    table = read_star_file(root / PARTICLES_STAR)
    check_tables(simulator, table, read_star_file(root / GROUND_TRUTH_STAR))
    stack = read_mrc_file(root / STACK_NAME)
    assert stack.header.voxel_size_a[0] == pytest.approx(PIXEL_SIZE_A)
    np.testing.assert_array_equal(stack.data, expected_images)
    maps = {path.stem: read_mrc_file(path).data for path in (root / "ground_truth" / "maps").glob("*.mrc")}
    check_ground_truth(simulator, (root / GROUND_TRUTH_CSV).read_bytes(), (root / SIMULATION_JSON).read_bytes(),
                       maps)


def test_a_store_destination_needs_a_store(simulator: ParticleSimulator) -> None:
    with pytest.raises(InvalidArgumentError, match="destination"):
        write_simulated_dataset(simulator, "s3://cryostack-nowhere/simulated")


def test_cli_writes_a_dataset_to_the_store(object_store: ObjectStore, prefix: str) -> None:
    settings = object_store.settings
    env = {
        **os.environ,
        "CRYOSTACK_S3_ENDPOINT": settings.endpoint,
        "CRYOSTACK_S3_ACCESS_KEY": settings.access_key.get_secret_value(),
        "CRYOSTACK_S3_SECRET_KEY": settings.secret_key.get_secret_value(),
        "CRYOSTACK_S3_SECURE": str(settings.secure).lower(),
    }
    command = [sys.executable, "-m", "cryostack.cli.main", "simulate", "--scenario", "three-state",
               "--particles", "12", "--box", "20", "--pixel-size", "5", "--snr", "0.2", "--seed", "4",
               "--out", prefix]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert prefix in result.stdout
    assert "simulated 12/12 particles" in result.stderr
    table = parse_star(object_store.get_bytes(f"{prefix}/{PARTICLES_STAR}"), "particles.star")
    assert len(table) == 12 and table.box_size_px == 20
    np.testing.assert_array_equal(table.pixel_size_a, 5.0)
    stack = decode_mrc(object_store.get_bytes(f"{prefix}/{STACK_NAME}"), STACK_NAME)
    assert stack.data.shape == (12, 20, 20)
    description = json.loads(object_store.get_bytes(f"{prefix}/{SIMULATION_JSON}"))
    assert description["scenario"]["name"] == "three-state" and description["parameters"]["snr"] == 0.2
    assert set(description["files"]["maps"]) == {"state0_closed", "state1_open", "state2_domain_absent", "mean"}


def test_cli_reports_bad_arguments_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["simulate", "--scenario", "hinge", "--particles", "5", "--box", "20", "--snr", "-1",
                   "--out", str(tmp_path / "bad")])
    assert status == 2
    error = capsys.readouterr().err
    assert "snr" in error and "Traceback" not in error
    assert not (tmp_path / "bad" / SIMULATION_JSON).exists()


def test_cli_simulates_from_an_input_map(
    tmp_path: Path, shared_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = shared_data_dir / "maps" / "3j9g_potential_ps4_4.mrc"  # 64³ at 4.4 Å/px
    status = main(["simulate", "--scenario", "hinge", "--particles", "6", "--box", "32", "--map", str(source),
                   "--out", str(tmp_path / "from-map")])
    assert status == 0, capsys.readouterr().err
    table = read_star_file(tmp_path / "from-map" / PARTICLES_STAR)
    # Resampled to box 32 over the same physical box: 8.8 Å/px.
    np.testing.assert_allclose(table.pixel_size_a, 8.8, rtol=1e-6)
    description = json.loads((tmp_path / "from-map" / SIMULATION_JSON).read_bytes())
    assert description["volume_source"] == f"map {source}"
    assert read_mrc_file(tmp_path / "from-map" / "ground_truth" / "maps" / "mean.mrc").data.shape == (32, 32, 32)
    status = main(["simulate", "--scenario", "hinge", "--particles", "6", "--box", "32", "--map", str(source),
                   "--pixel-size", "3.0", "--out", str(tmp_path / "conflict")])
    assert status == 2
    assert "pixel-size" in capsys.readouterr().err

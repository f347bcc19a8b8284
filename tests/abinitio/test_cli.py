"""`cryostack abinitio` end to end: with no service configured it starts one itself, follows the job and prints
where the outputs are; bad parameters exit with status 2 naming the field."""

from __future__ import annotations

import pytest

from cryostack.cli.main import main
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.mrc import read_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import read_star


@pytest.fixture
def particles_uri(object_store: ObjectStore, bucket: str) -> str:
    params = SimulationParameters(n_particles=150, box_px=32, pixel_size_a=6.0, snr=0.5, seed=4)
    return write_simulated_dataset(ParticleSimulator(scenario("three-state"), params), f"s3://{bucket}/data",
                                   object_store).particles_star


@pytest.mark.usefixtures("cli_environment")
def test_abinitio_command_runs_a_job_on_an_embedded_service(
    particles_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([
        "abinitio", "--particles", particles_uri, "--out", f"s3://{bucket}/out", "--classes", "2",
        "--subset", "120", "--subset-seed", "1", "--initial-iterations", "3", "--final-iterations", "1",
        "--minibatch-initial", "40", "--minibatch-final", "60", "--max-resolution", "24", "--seed", "5",
    ])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "iteration 4 of 4: 24.0 Å" in captured.err
    lines = dict(line.split(": ", 1) for line in captured.out.strip().splitlines())
    assert lines["outputs"].startswith(f"s3://{bucket}/out/jobs/")
    particles = read_star(object_store, lines["particles"])
    assert len(particles) == 120 and set(particles.column("rlnClassNumber").astype(int)) <= {1, 2}
    volume_uri = lines["class 1"].rsplit(" ", 1)[-1]
    assert read_mrc(object_store, volume_uri).data.shape == (32, 32, 32)
    assert object_store.get_bytes(lines["report"])[:4] == b"\x89PNG"


@pytest.mark.usefixtures("cli_environment")
def test_abinitio_command_reports_bad_parameters(
    particles_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["abinitio", "--particles", particles_uri, "--out", f"s3://{bucket}/out", "--classes", "1",
                   "--initial-resolution", "10", "--max-resolution", "20"])
    assert status == 2
    assert "parameters.initial_resolution_a" in capsys.readouterr().err
    assert object_store.list(f"s3://{bucket}/out/") == []

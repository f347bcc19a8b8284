"""`cryostack classify2d` end to end: with no service configured it starts one itself, follows the job and prints
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
    return write_simulated_dataset(ParticleSimulator(scenario("floppy"), params), f"s3://{bucket}/data",
                                   object_store).particles_star


@pytest.mark.usefixtures("cli_environment")
def test_classify2d_command_runs_a_job_on_an_embedded_service(
    particles_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([
        "classify2d", "--particles", particles_uri, "--out", f"s3://{bucket}/out", "--classes", "2",
        "--max-particles-per-class", "90", "--online-iterations", "2", "--batch-size-per-class", "40",
        "--max-resolution", "12", "--seed", "5",
    ])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "iteration 3 of 3" in captured.err
    lines = dict(line.split(": ", 1) for line in captured.out.strip().splitlines())
    assert lines["outputs"].startswith(f"s3://{bucket}/out/jobs/")
    particles = read_star(object_store, lines["particles"])
    counts = particles.particles["rlnClassNumber"].value_counts()
    assert counts.sum() == 150 and counts.max() <= 90
    assert read_mrc(object_store, lines["class averages"]).data.shape == (2, 32, 32)


@pytest.mark.usefixtures("cli_environment")
def test_classify2d_command_reports_bad_parameters(
    particles_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["classify2d", "--particles", particles_uri, "--out", f"s3://{bucket}/out", "--classes", "2",
                   "--max-particles-per-class", "10"])
    assert status == 2
    assert "parameters.max_particles_per_class_count" in capsys.readouterr().err
    assert object_store.list(f"s3://{bucket}/out/") == []

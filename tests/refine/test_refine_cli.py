"""`cryostack refine hetero|homo` end to end: with no service configured the command starts one itself, follows
the job and prints where the outputs are; a bad volume or parameter exits with status 2 naming the field."""

from __future__ import annotations

import pytest

from cryostack.cli.main import main
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.mrc import read_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import read_star

# Searches to 24 Å on a box-32, 6 Å/px set: the commands are under test, not the algorithms.
FAST = ["--max-resolution", "24", "--seed", "5"]
# The simulated set's true maps (written beside it): the closed state and the one without the domain.
CLOSED_MAP = "ground_truth/maps/state0_closed.mrc"
ABSENT_MAP = "ground_truth/maps/state2_domain_absent.mrc"


@pytest.fixture
def data_uri(object_store: ObjectStore, bucket: str) -> str:
    """Folder of a small simulated three-state set with its true maps, in the test's bucket."""
    params = SimulationParameters(n_particles=120, box_px=32, pixel_size_a=6.0, snr=0.5, seed=4)
    write_simulated_dataset(ParticleSimulator(scenario("three-state"), params), f"s3://{bucket}/data", object_store)
    return f"s3://{bucket}/data/"


def _lines(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


@pytest.mark.usefixtures("cli_environment")
def test_refine_hetero_command_runs_a_job_on_an_embedded_service(
    data_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([
        "refine", "hetero", "--particles", data_uri + "particles.star", "--out", f"s3://{bucket}/out",
        "--volumes", data_uri + CLOSED_MAP, data_uri + ABSENT_MAP,
        "--subset", "100", "--batch-size-per-class", "40", "--initial-resolution", "30",
        "--random-assignment-iterations", "0", "--max-online-iterations", "1", "--final-full-iterations", "1", *FAST,
    ])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "iteration 2 (full" in captured.err
    lines = _lines(captured.out)
    assert lines["outputs"].startswith(f"s3://{bucket}/out/jobs/")
    particles = read_star(object_store, lines["particles"])
    assert len(particles) == 100 and set(particles.column("rlnClassNumber").astype(int)) <= {1, 2}
    assert lines["class 2"].endswith("class_002.mrc")
    assert read_mrc(object_store, lines["class 1"].rsplit(" ", 1)[-1]).data.shape == (32, 32, 32)
    assert object_store.get_bytes(lines["report"])[:4] == b"\x89PNG"
    assert object_store.get_bytes(lines["fsc"]).startswith(b"shell,")


@pytest.mark.usefixtures("cli_environment")
def test_refine_homo_command_runs_a_job_on_an_embedded_service(
    data_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([
        "refine", "homo", "--particles", data_uri + "particles.star", "--out", f"s3://{bucket}/out",
        "--volume", data_uri + CLOSED_MAP, "--max-iterations", "1", "--global-iterations", "1", *FAST,
    ])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "iteration 1 (global" in captured.err
    lines = _lines(captured.out)
    assert lines["resolution"].endswith("after 1 iterations")
    assert read_mrc(object_store, lines["map"]).data.shape == (32, 32, 32)
    mask = read_mrc(object_store, lines["mask"]).data
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert len(lines["half maps"].split()) == 2
    assert len(read_star(object_store, lines["particles"])) == 120


@pytest.mark.usefixtures("cli_environment")
def test_refine_commands_report_bad_volumes_and_parameters(
    data_uri: str, bucket: str, object_store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--particles", data_uri + "particles.star", "--out", f"s3://{bucket}/out"]
    status = main(["refine", "hetero", *common, "--volumes", data_uri + CLOSED_MAP,
                   data_uri + "particles.mrcs"])
    assert status == 2
    assert "volume_uris[1]" in capsys.readouterr().err

    status = main(["refine", "homo", *common, "--volume", data_uri + CLOSED_MAP,
                   "--mask-threshold", "1.5"])
    assert status == 2
    assert "parameters.mask_threshold_fraction" in capsys.readouterr().err
    assert object_store.list(f"s3://{bucket}/out/") == []

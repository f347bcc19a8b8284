"""Fixtures shared by every test folder: a real S3 object store, fresh buckets, embedded stores, the shared data.

- ``object_store_settings`` / ``object_store`` (session): when ``CRYOSTACK_S3_ENDPOINT`` is set (CI starts one store
  with ``cryostack objectstore start`` and exports the ``CRYOSTACK_S3_*`` variables) the tests use that store;
  otherwise the session starts an embedded SeaweedFS on free ports in a temporary directory and stops it at the end.
- ``bucket`` / ``bucket_uri`` (function): a new empty bucket named ``cryostack-test-<random>``, emptied and removed
  after the test.
- ``cli_environment`` (function): the ``CRYOSTACK_*`` variables a ``cryostack`` command reads, pointing at the
  test store with job state in the test bucket and no stage service address (the command starts its own).
- ``start_embedded_store`` (function): starts extra stores of a test's own (for outage tests); stopped at teardown.
- ``shared_data_dir`` (session): the public test data (``/work/shared/data`` beside the repository, or
  ``CRYOSTACK_TEST_DATA_DIR``); tests that need it are skipped with a reason when it is absent.
- ``upload_real_set`` (function): uploads one of :data:`REAL_SETS` of the shared data into the test's bucket.
- ``cancel_at_iteration`` (function): follows a job until it reports an iteration, cancels it, returns it finished.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryostack.config import ObjectStoreSettings, StageAddresses
from cryostack.io.embedded import EmbeddedStore
from cryostack.io.objectstore import ObjectStore
from cryostack.io.uri import S3Uri
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime.client import JobClient

TEST_BUCKET_PREFIX = "cryostack-test-"
DATA_DIR_ENV = "CRYOSTACK_TEST_DATA_DIR"
# The real particle sets of the shared data (see its README): STAR file and the stack it refers to.
REAL_SETS = {
    "relion31": ("relion31.star", "relion31.mrcs"),
    "relion30": ("empiar_10076_7.star", "empiar_10076_7.mrc"),
    "aspire17": ("sample_particles_relion31.star", "sample.mrcs"),
}


@pytest.fixture(scope="session")
def object_store_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStoreSettings]:
    """Settings of the session's object store: the one in CRYOSTACK_S3_* if configured, else an embedded one."""
    if os.environ.get("CRYOSTACK_S3_ENDPOINT"):
        yield ObjectStoreSettings()
        return
    store = EmbeddedStore.on_free_ports(tmp_path_factory.mktemp("objectstore"))
    settings = store.start()
    try:
        yield settings
    finally:
        store.stop()


@pytest.fixture(scope="session")
def object_store(object_store_settings: ObjectStoreSettings) -> Iterator[ObjectStore]:
    """An ObjectStore client of the session's store."""
    with ObjectStore(object_store_settings) as store:
        yield store


@pytest.fixture
def bucket(object_store: ObjectStore) -> Iterator[str]:
    """A fresh, empty bucket for one test; emptied and removed afterwards."""
    name = f"{TEST_BUCKET_PREFIX}{uuid.uuid4().hex[:16]}"
    object_store.ensure_bucket(name)
    yield name
    object_store.delete_prefix(S3Uri(name))
    object_store.remove_bucket(name)


@pytest.fixture
def bucket_uri(bucket: str) -> S3Uri:
    """The root URI (``s3://<bucket>``) of the test's fresh bucket."""
    return S3Uri(bucket)


@pytest.fixture
def cli_environment(monkeypatch: pytest.MonkeyPatch, object_store_settings: ObjectStoreSettings, bucket: str) -> None:
    """Point ``cryostack`` commands at the test store, keep job state in the test bucket, configure no service."""
    monkeypatch.setenv("CRYOSTACK_S3_ENDPOINT", object_store_settings.endpoint)
    monkeypatch.setenv("CRYOSTACK_S3_ACCESS_KEY", object_store_settings.access_key.get_secret_value())
    monkeypatch.setenv("CRYOSTACK_S3_SECRET_KEY", object_store_settings.secret_key.get_secret_value())
    monkeypatch.setenv("CRYOSTACK_S3_SECURE", "true" if object_store_settings.secure else "false")
    monkeypatch.setenv("CRYOSTACK_JOBS_URI", f"s3://{bucket}/jobs")
    for field in StageAddresses.model_fields:
        monkeypatch.delenv(f"CRYOSTACK_{field.upper()}", raising=False)


@pytest.fixture
def start_embedded_store(tmp_path: Path) -> Iterator[Callable[[], EmbeddedStore]]:
    """Start embedded stores of a test's own on free ports (each in its own folder); all are stopped at teardown."""
    started: list[EmbeddedStore] = []

    def start() -> EmbeddedStore:
        store = EmbeddedStore.on_free_ports(tmp_path / f"store-{len(started)}")
        started.append(store)
        store.start()
        return store

    yield start
    for store in started:
        store.stop()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder of public test data (see its README); skips the test when it is not present."""
    configured = os.environ.get(DATA_DIR_ENV)
    folder = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (folder / "README.md").is_file():
        pytest.skip(f"public test data not found at {folder} (set {DATA_DIR_ENV})")
    return folder


@pytest.fixture
def upload_real_set(
    object_store: ObjectStore, bucket_uri: S3Uri, shared_data_dir: Path
) -> Callable[[str], tuple[S3Uri, Path, Path]]:
    """Upload one of REAL_SETS under ``<bucket>/<name>/``; returns (STAR URI, local STAR path, local stack path)."""

    def upload(name: str) -> tuple[S3Uri, Path, Path]:
        star_name, stack_name = REAL_SETS[name]
        folder = shared_data_dir / "real-particles"
        for file_name in (star_name, stack_name):
            object_store.put_bytes(bucket_uri.join(name, file_name), (folder / file_name).read_bytes())
        return bucket_uri.join(name, star_name), folder / star_name, folder / stack_name

    return upload


@pytest.fixture
def cancel_at_iteration() -> Callable[[JobClient, str, int], jobs_pb2.Job]:
    """A function that follows job ``name`` until it reports ``iteration``, cancels it and returns the finished job."""

    def cancel(client: JobClient, name: str, iteration: int) -> jobs_pb2.Job:
        for update in client.watch(name, timeout_s=300):
            if update.progress.iteration >= iteration:
                client.cancel(name)
                break
        return client.wait(name, timeout_s=300)

    return cancel

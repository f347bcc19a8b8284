"""Typed configuration, read once from the environment and passed down (never module globals).

Every variable is documented here and in the README's configuration table. Credentials are `SecretStr` so they
never appear in logs or reprs.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ObjectStoreSettings(BaseSettings):
    """Where the S3-compatible object store is and how to authenticate (env prefix ``CRYOSTACK_S3_``)."""

    model_config = SettingsConfigDict(env_prefix="CRYOSTACK_S3_", extra="ignore")

    endpoint: str = Field("127.0.0.1:8333", description="host:port of the S3 API (no scheme)")
    access_key: SecretStr = Field(SecretStr(""), description="S3 access key id")
    secret_key: SecretStr = Field(SecretStr(""), description="S3 secret access key")
    secure: bool = Field(False, description="use HTTPS to reach the endpoint")
    region: str = Field("us-east-1", description="S3 region name used for request signing")
    max_attempts: int = Field(5, ge=1, le=20, description="tries per request on transient failures")
    backoff_initial_s: float = Field(0.2, gt=0, description="first retry delay; doubles each try")
    part_size_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024, description="multipart upload part size")
    allowed_buckets: list[str] = Field(
        default_factory=list,
        description="if non-empty, the only buckets requests may name (others are INVALID_ARGUMENT)",
    )


class EmbeddedStoreSettings(BaseSettings):
    """The embedded SeaweedFS `weed mini` started by `cryostack objectstore start` (env prefix ``CRYOSTACK_EMBEDDED_``)."""

    model_config = SettingsConfigDict(env_prefix="CRYOSTACK_EMBEDDED_", extra="ignore")

    state_dir: str = Field(".cryostack/objectstore", description="data, identities, PID file and log of the store")
    s3_port: int = Field(8333, ge=1, le=65535)
    master_port: int = Field(9333, ge=1, le=65535)
    volume_port: int = Field(8080, ge=1, le=65535)
    filer_port: int = Field(8888, ge=1, le=65535)
    admin_port: int = Field(23646, ge=1, le=65535)


class ServiceSettings(BaseSettings):
    """One gRPC service replica (env prefix ``CRYOSTACK_``)."""

    model_config = SettingsConfigDict(env_prefix="CRYOSTACK_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    jobs_uri: str = Field("s3://cryostack/jobs", description="where job state, checkpoints and outputs live")
    max_workers: int = Field(2, ge=1, le=256, description="jobs running at once in this replica")
    max_queued_jobs: int = Field(16, ge=0, le=10_000, description="jobs waiting beyond the running ones")
    grace_period_s: float = Field(10.0, ge=0, description="time given to in-flight RPCs on shutdown")
    auth_token: SecretStr | None = Field(None, description="if set, clients must send 'authorization: Bearer <token>'")
    tls_cert_file: str | None = Field(None, description="PEM server certificate chain; with the key, serve TLS only")
    tls_key_file: str | None = Field(None, description="PEM private key of the server certificate")
    tls_client_ca_file: str | None = Field(None, description="PEM CA bundle; if set, clients need a certificate (mTLS)")
    job_lease_s: float = Field(30.0, gt=0, description="a running job's lease; another replica may resume it after")
    max_box_size_px: int = Field(512, ge=16, description="largest particle box a request may use")
    max_particles: int = Field(10_000_000, ge=1, description="most particles a request may use")
    max_classes: int = Field(500, ge=1, description="most classes a request may ask for")

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self


class StageAddresses(BaseSettings):
    """Where clients (the CLI, the flow) find running stage services (env ``CRYOSTACK_<STAGE>_ADDRESS``).

    An unset address means: start the stage's service in-process for the duration of the call.
    """

    model_config = SettingsConfigDict(env_prefix="CRYOSTACK_", extra="ignore")

    classify2d_address: str | None = Field(None, description="host:port of a classify2d service")
    abinitio_address: str | None = Field(None, description="host:port of an abinitio service")
    refine_address: str | None = Field(None, description="host:port of a refine service")
    variability_address: str | None = Field(None, description="host:port of a variability service")

    def address_of(self, service: str) -> str | None:
        """The configured address of a stage service, or None."""
        return getattr(self, f"{service}_address")

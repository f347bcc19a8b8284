"""Offline checks of the deployment manifests: schema validity and the security/operations invariants of SPEC §7."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
K8S_DIR = DEPLOY_DIR / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/external-s3"]
STAGE_SERVICES = ["classify2d", "abinitio", "refine", "variability"]
KUBERNETES_VERSION = "1.33.0"


def render(kustomization: str) -> list[dict]:
    """Render one kustomization with `kubectl kustomize` into its list of resources."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize rendering needs it (resource files are still validated)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR / kustomization)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def resource_files() -> list[Path]:
    """Every manifest file that is a Kubernetes resource (not a kustomization)."""
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_each_resource_file_is_schema_valid(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents, f"{path} holds no resource"
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_kustomization_is_schema_valid(kustomization: str) -> None:
    resources = render(kustomization)
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    kinds_names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for service in STAGE_SERVICES:
        assert ("Deployment", f"{service}-service") in kinds_names
        assert ("Service", f"{service}-service") in kinds_names
        assert ("HorizontalPodAutoscaler", f"{service}-service") in kinds_names


def stage_deployments(resources: list[dict]) -> list[dict]:
    """The stage-service Deployments among rendered resources."""
    return [
        r
        for r in resources
        if r["kind"] == "Deployment" and r["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "cryostack"
    ]


def test_stage_services_follow_the_operations_and_security_rules() -> None:
    deployments = stage_deployments(render("base"))
    assert sorted(d["metadata"]["name"] for d in deployments) == sorted(f"{s}-service" for s in STAGE_SERVICES)
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        name = deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert container["readinessProbe"]["grpc"]["port"] == 50051, name
        assert container["livenessProbe"]["grpc"]["port"] == 50051, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CRYOSTACK_SERVICE"] == name.removesuffix("-service")
        assert {"secretRef": {"name": "cryostack-s3-credentials"}} in container["envFrom"], name


def test_no_credentials_are_committed_in_manifests() -> None:
    for resource in render("base"):
        assert resource["kind"] != "Secret", "S3 credentials must come from a Secret created outside git"
        if resource["kind"] == "ConfigMap":
            assert not any("SECRET" in key or "ACCESS_KEY" in key for key in resource["data"])


def test_gpu_overlay_requests_one_gpu_per_stage_service() -> None:
    for deployment in stage_deployments(render("overlays/gpu")):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"].endswith("-gpu")
        assert deployment["spec"]["template"]["spec"]["nodeSelector"]


def test_external_s3_overlay_drops_minio() -> None:
    resources = render("overlays/external-s3")
    assert not any(r["metadata"]["name"] == "minio" for r in resources)
    settings = next(r for r in resources if r["kind"] == "ConfigMap")
    assert settings["data"]["CRYOSTACK_S3_SECURE"] == "true"


def test_images_run_as_a_non_root_user() -> None:
    for dockerfile in (DEPLOY_DIR / "docker").glob("Dockerfile.*"):
        user_lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
        assert user_lines and user_lines[-1].split()[1] not in ("root", "0"), dockerfile.name


def test_compose_file_defines_the_whole_stack() -> None:
    compose = yaml.safe_load((DEPLOY_DIR / "compose" / "compose.yaml").read_text())
    assert {"minio", "prefect-server", "worker", *STAGE_SERVICES} <= set(compose["services"])
    for service in STAGE_SERVICES:
        assert compose["services"][service]["build"]["args"]["SERVICE"] == service
        assert compose["services"][service]["read_only"] is True

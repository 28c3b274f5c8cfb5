"""The Kubernetes manifests (configs/kubernetes/) validated offline against the API's schemas
(kubernetes-validate bundles them), their embedded gate configs identical to configs/ and valid, and the
gate's containers holding no capability beyond what capture needs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gate.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MANIFESTS = sorted((CONFIGS / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.30.0"  # native sidecars (restartable init containers) are on by default from 1.29
SOURCES = {"egress-sidecar.yaml": "egress-sidecar.yaml", "ingress-sidecar.yaml": "ingress-sidecar.yaml",
           "node-gateway.yaml": "home-router.yaml", "sni-ingress.yaml": "sni-ingress.yaml"}


def resources(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_there_is_a_manifest_for_each_role() -> None:
    assert [p.name for p in MANIFESTS] == sorted(SOURCES)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_pass_strict_schema_validation(path: Path) -> None:
    for resource in resources(path):
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_the_validator_catches_a_misplaced_field() -> None:
    """The check above can fail: a field where the schema has none is refused in strict mode."""
    deployment = next(r for r in resources(CONFIGS / "kubernetes" / "sni-ingress.yaml") if r["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["capabilitiez"] = ["NET_ADMIN"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_embedded_configs_are_the_repositorys_and_valid(path: Path, tmp_path: Path) -> None:
    (configmap,) = [r for r in resources(path) if r["kind"] == "ConfigMap"]
    embedded = configmap["data"]["gate.yaml"]
    assert embedded == (CONFIGS / SOURCES[path.name]).read_text()
    (tmp_path / "gate.yaml").write_text(embedded)
    load_config(tmp_path / "gate.yaml")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_gate_holds_only_the_capabilities_capture_needs(path: Path) -> None:
    for workload in (r for r in resources(path) if r["kind"] in ("Deployment", "DaemonSet")):
        pod = workload["spec"]["template"]["spec"]
        (gate,) = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "ugate"]
        security = gate["securityContext"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert set(security["capabilities"].get("add", [])) <= {"NET_ADMIN", "NET_RAW"}
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        if gate in pod.get("initContainers", []):  # a native sidecar, started (and probed) before the app
            assert gate["restartPolicy"] == "Always" and "startupProbe" in gate

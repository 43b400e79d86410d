"""The Kubernetes manifests (deploy/k8s/): valid against the Kubernetes schemas (kubernetes-validate, strict), and
consistent with the server: ports, probes, the drain timeout, the kustomization's file list."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.server_process import REPO

K8S = REPO / "deploy" / "k8s"
# No schema ships for these (a kustomize file, a Prometheus Operator CRD); their shape is checked below.
WITHOUT_SCHEMA = {"kustomization.yaml", "servicemonitor.yaml"}


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_manifests_pass_strict_schema_validation():
    files = sorted(K8S.glob("*.yaml"))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(validate), "--strict", *map(str, files)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = {Path(line.split()[1]).name for line in result.stdout.splitlines() if " passed for resource " in line}
    assert passed == {f.name for f in files} - WITHOUT_SCHEMA, result.stdout


def test_kustomization_lists_every_manifest():
    listed = set(load("kustomization.yaml")["resources"])
    assert listed == {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_matches_the_server():
    deployment = load("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = tomllib.loads(load("configmap.yaml")["data"]["modelpool.toml"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config["server"]["port"], "metrics": config["server"]["metrics_port"]}
    # Native gRPC probes on the health service for start and readiness; the kubelet waits out the drain.
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["startupProbe"]["grpc"]["port"] == ports["grpc"]
    assert pod["terminationGracePeriodSeconds"] > config["server"]["drain_timeout_s"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert len(config["models"][0]["workers"][0]["devices"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = load("service.yaml")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance over the pods themselves
    assert {p["name"] for p in service["spec"]["ports"]} == set(ports)
    monitor = load("servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor" and monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    hpa = load("hpa.yaml")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "modelpool_requests_queued"

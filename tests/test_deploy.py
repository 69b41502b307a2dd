"""The deploy kits and the dashboard files: what can be checked without Docker or Kubernetes.

YAML parses; compose and Kubernetes reference files and objects that exist; the example config loads; the
Dockerfile is non-root with a healthcheck and a volume; Prometheus's own ``promtool`` accepts the scrape config
and the alert rules; ``systemd-analyze verify`` accepts the unit; the client examples parse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import load
from mirror.config.cache import cache_config
from tests.support.ops import require

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *(ROOT / "grafana").rglob("*.yml")])


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    assert load_yaml(path), f"{path} is empty"


def test_compose_references_files_that_exist() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")[0]
    assert {"mirror", "prometheus", "grafana"} <= set(compose["services"])
    build = compose["services"]["mirror"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    dashboards = DEPLOY / "../grafana/dashboards"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()


def test_kubernetes_manifests_fit_together() -> None:
    kube = DEPLOY / "kubernetes"
    kustomization = load_yaml(kube / "kustomization.yaml")[0]
    objects: dict[tuple[str, str], Any] = {}
    for resource in kustomization["resources"]:
        assert (kube / resource).is_file(), f"kustomization lists {resource}, which does not exist"
        for doc in load_yaml(kube / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    assert {k for k, _ in objects} >= {"Deployment", "PersistentVolumeClaim", "Service", "ConfigMap", "ServiceMonitor"}
    deployment = objects[("Deployment", "mirror")]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for volume in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in objects
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects[("Service", "mirror")]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert {e["port"] for e in objects[("ServiceMonitor", "mirror")]["spec"]["endpoints"]} <= ports
    # The ConfigMap's mirror.toml is a valid mirror config, and the cache fits in the volume.
    toml_text = objects[("ConfigMap", "mirror-config")]["data"]["mirror.toml"]
    config = load_toml_config(toml_text, Path(os.environ.get("TMPDIR", "/tmp")) / f"cm-{os.getpid()}.toml")
    requested = objects[("PersistentVolumeClaim", "mirror-data")]["spec"]["resources"]["requests"]["storage"]
    assert config.cache_size < int(requested.removesuffix("Gi")) * 2**30


def load_toml_config(text: str, path: Path) -> Any:
    path.write_text(text)
    try:
        config = load({}, str(path), {})
        cache_config(config)
        return config
    finally:
        path.unlink()


def test_example_config_loads() -> None:
    config = load({}, str(DEPLOY / "mirror.toml"), {})
    assert config.cache_size == 50 * 2**30
    assert cache_config(config).low_watermark == 0.85


def test_dockerfile_is_slim_non_root_with_healthcheck_and_volume() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0"))
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert re.search(r'^VOLUME \["/data"\]', text, re.MULTILINE)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY {item}: not in the repository"


def test_prometheus_config_and_alerts_pass_promtool(tmp_path: Path) -> None:
    promtool = require("promtool")
    config = tmp_path / "prometheus.yml"
    shutil.copy(DEPLOY / "prometheus" / "prometheus.yml", config)
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    for args in (["check", "config", str(config)], ["check", "rules", str(tmp_path / "alerts.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    unit = tmp_path / "mirror.service"
    # verify insists that ExecStart's binary exists: point it at this Python, with the same arguments.
    text = (DEPLOY / "systemd" / "mirror.service").read_text()
    assert "ExecStart=/usr/local/bin/mirror serve" in text
    unit.write_text(text.replace("/usr/local/bin/mirror", f"{sys.executable} -m mirror"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "mirror.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_client_examples_parse() -> None:
    clients = DEPLOY / "clients"
    daemon = json.loads((clients / "daemon.json").read_text())
    assert daemon["registry-mirrors"][0].startswith("http")
    hosts = tomllib.loads((clients / "containerd/certs.d/docker.io/hosts.toml").read_text())
    assert any(h["capabilities"] == ["pull", "resolve"] for h in hosts["host"].values())
    registries = tomllib.loads((clients / "registries.conf").read_text())
    assert registries["registry"][0]["mirror"][0]["location"]
    for ci in (clients / "ci").iterdir():
        assert "mirror" in ci.read_text() and load_yaml(ci)


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = load_yaml(ROOT / "grafana/provisioning/dashboards/mirror.yml")[0]["providers"][0]
    compose = load_yaml(DEPLOY / "docker-compose.yml")[0]
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "../grafana/dashboards"
    dashboard = json.loads((ROOT / "grafana/dashboards/mirror.json").read_text())
    assert dashboard["uid"] and all(p.get("targets") or p["type"] == "row" for p in dashboard["panels"])
    datasource = load_yaml(ROOT / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]

"""The cluster's deploy kits (deploy/cluster/, deploy/kubernetes/cluster/): what can be checked without Docker or
Kubernetes.

Compose references files and volumes that exist and gives every replica its own advertise URL and data dir; the
replicas' config loads as each replica reads it (its environment over the shared file) and names the services
the kit runs; the real HAProxy accepts its config, with one checked server per replica; Prometheus's ``promtool``
accepts the scrape config; the bucket one-shot creates the bucket in a real SeaweedFS with the kit's identity
file; the Kubernetes objects fit together and their ConfigMap loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import botocore.session
import pytest
import yaml
from botocore.config import Config as BotoConfig

from mirror.config import Config, ConfigError, load
from mirror.config.cluster import ClusterConfig, cluster_config
from mirror.config.storage import StorageConfig, storage_config
from tests.support.ops import require
from tests.support.seaweed import seaweed_server

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "deploy" / "cluster"
KUBE = ROOT / "deploy" / "kubernetes" / "cluster"
REPLICAS = ("mirror-1", "mirror-2", "mirror-3")


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(KIT / "docker-compose.yml")[0]
    return document


def replicas(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The mirror services: those that advertise themselves to the others."""
    return {name: s for name, s in services.items() if "MIRROR_CLUSTER_ADVERTISE" in s.get("environment", {})}


def load_as(toml: Path, environ: dict[str, str]) -> tuple[Config, ClusterConfig, StorageConfig]:
    config = load({}, str(toml), environ)
    return config, cluster_config(config), storage_config(config, environ)


# --- compose ------------------------------------------------------------------------------------------------------
def test_compose_references_files_and_volumes_that_exist() -> None:
    kit = compose()
    services = kit["services"]
    assert set(services) >= {*REPLICAS, "haproxy", "redis", "seaweedfs", "create-bucket", "prometheus", "grafana"}
    named = set(kit.get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (KIT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for secret in service.get("secrets", []):
            assert (KIT / kit["secrets"][secret]["file"]).is_file(), f"{name}: secret {secret} has no file"
        for needed in service.get("depends_on", []):
            assert needed in services, f"{name} depends on {needed}, which is not a service"
    for name in REPLICAS:
        build = services[name]["build"]
        assert (KIT / build["context"] / build["dockerfile"]).is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana/dashboards" / Path(home).name).is_file()
    datasource = load_yaml(ROOT / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"][0]
    assert urlsplit(datasource["url"]).hostname in services


def test_every_replica_has_its_own_advertise_and_data_dir() -> None:
    services = compose()["services"]
    mirrors = replicas(services)
    assert set(mirrors) == set(REPLICAS)
    advertised = [urlsplit(s["environment"]["MIRROR_CLUSTER_ADVERTISE"]) for s in mirrors.values()]
    assert len({a.geturl() for a in advertised}) == len(REPLICAS)
    for (name, service), url in zip(mirrors.items(), advertised, strict=True):
        assert (url.hostname, url.port) == (name, 5000), f"{name} advertises {url.geturl()}: not its own address"
        assert "mirror-cluster" in service["secrets"]
    data = [v.split(":")[0] for s in mirrors.values() for v in s["volumes"] if v.split(":")[1] == "/data"]
    assert len(set(data)) == len(REPLICAS), "each replica needs a data dir of its own"
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert services["create-bucket"]["restart"] == "on-failure"
    for name in REPLICAS:
        assert services[name]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"


def test_each_replica_loads_the_shared_config_with_its_environment(tmp_path: Path) -> None:
    """As each replica reads it: its compose environment over mirror.toml, the compose secret as its file. The
    config names the services the kit runs, and the bucket's keys are the identity SeaweedFS is given."""
    kit = compose()
    services = kit["services"]
    secret_file = KIT / kit["secrets"]["mirror-cluster"]["file"]
    shutil.copy(secret_file, tmp_path / "secret")  # /run/secrets/mirror-cluster in the container
    (identity,) = json.loads((KIT / "s3.json").read_text())["identities"]
    (credentials,) = identity["credentials"]
    document = tomllib.loads((KIT / "mirror.toml").read_text())
    assert document["cluster"]["secret_file"] == "/run/secrets/mirror-cluster"
    for name, service in replicas(services).items():
        environ = {**service["environment"], "MIRROR_CLUSTER_SECRET_FILE": str(tmp_path / "secret")}
        config, cluster, storage = load_as(KIT / "mirror.toml", environ)
        assert cluster.advertise == f"http://{name}:5000"
        assert cluster.secret == secret_file.read_text().strip()
        assert urlsplit(cluster.redis_url).hostname in services
        assert config.host_port[1] == urlsplit(cluster.advertise).port
        assert storage.s3 and urlsplit(storage.endpoint_url or "").hostname == "seaweedfs"
        assert urlsplit(storage.endpoint_url or "").port == 8333  # SeaweedFS's S3 gateway
        assert (storage.access_key, storage.secret_key) == (credentials["accessKey"], credentials["secretKey"])
        assert storage.bucket == services["create-bucket"]["environment"]["BUCKET"]
        assert config.data_dir == Path("/data")


def test_the_bucket_one_shot_creates_the_bucket_in_a_real_seaweedfs(tmp_path: Path) -> None:
    """create-bucket.sh against a real SeaweedFS started with the kit's s3.json: the bucket is there for the kit's
    identity afterwards, and a second run (the stack started again) finds it and succeeds."""
    services = compose()["services"]
    bucket = services["create-bucket"]["environment"]["BUCKET"]
    (credentials,) = json.loads((KIT / "s3.json").read_text())["identities"][0]["credentials"]
    with seaweed_server(tmp_path, s3_config=KIT / "s3.json") as endpoint_url:
        environ = {**os.environ, "BUCKET": bucket, "SEAWEED_MASTER": (tmp_path / "weed.master").read_text()}
        for _ in range(2):
            run = subprocess.run(
                ["sh", str(KIT / "create-bucket.sh")], env=environ, capture_output=True, text=True, timeout=180
            )
            assert run.returncode == 0, run.stdout + run.stderr
        assert f"bucket {bucket} is there" in run.stdout
        own = kit_client(endpoint_url, credentials["accessKey"], credentials["secretKey"])
        assert [b["Name"] for b in own.list_buckets()["Buckets"]] == [bucket]
        own.put_object(Bucket=bucket, Key="probe", Body=b"kit")
        assert own.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"kit"


def kit_client(endpoint_url: str, access_key: str, secret_key: str) -> S3Client:
    """An S3 client with the kit's identity (not the tests' own), path-style as the mirror addresses the bucket."""
    made = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    return cast("S3Client", made)


# --- HAProxy and Prometheus ---------------------------------------------------------------------------------------
def seconds(value: str) -> float:
    """An HAProxy time (``10m``, ``30s``; a bare number is milliseconds) in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match is not None, f"not an HAProxy time: {value}"
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 0.001}[match.group(2)]


def test_haproxy_accepts_its_config_with_one_checked_server_per_replica() -> None:
    haproxy = require("haproxy")
    result = subprocess.run([haproxy, "-c", "-f", str(KIT / "haproxy.cfg")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split("#")[0].split() for line in (KIT / "haproxy.cfg").read_text().splitlines()]
    lines = [line for line in lines if line]
    servers = {line[1]: line[2:] for line in lines if line[0] == "server"}
    mirrors = replicas(compose()["services"])
    assert set(servers) == set(mirrors)
    for name, service in mirrors.items():
        url = urlsplit(service["environment"]["MIRROR_CLUSTER_ADVERTISE"])
        assert servers[name][0] == f"{url.hostname}:{url.port}" and "check" in servers[name]
    assert ["balance", "roundrobin"] in lines
    assert ["option", "httpchk", "GET", "/readyz"] in lines
    timeouts = {line[1]: seconds(line[2]) for line in lines if line[0] == "timeout"}
    assert timeouts["client"] >= 300 and timeouts["server"] >= 300, "a multi-GB layer needs long timeouts"
    assert any("/_mirror/" in line and line[0] == "http-request" for line in lines), "internal endpoints stay inside"


def test_prometheus_scrapes_every_replica_and_passes_promtool(tmp_path: Path) -> None:
    promtool = require("promtool")
    shutil.copy(KIT / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = [j for j in load_yaml(KIT / "prometheus.yml")[0]["scrape_configs"] if j["job_name"] == "mirror"]
    targets = {t: group["labels"]["replica"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:5000": name for name in replicas(compose()["services"])}
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert "../prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def test_the_image_serves_both_modes() -> None:
    """One image: the Dockerfile installs the extras the bucket and the cluster need, as pyproject.toml names them."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (installed,) = re.findall(r"pip install .*'\.\[([\w,]+)\]'", (ROOT / "deploy/Dockerfile").read_text())
    assert {"s3", "cluster"} <= set(installed.split(",")) <= set(extras)


# --- Kubernetes ---------------------------------------------------------------------------------------------------
def kube_objects() -> dict[tuple[str, str], Any]:
    kustomization = load_yaml(KUBE / "kustomization.yaml")[0]
    objects: dict[tuple[str, str], Any] = {}
    for resource in kustomization["resources"]:
        assert (KUBE / resource).is_file(), f"kustomization lists {resource}, which does not exist"
        for doc in load_yaml(KUBE / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kubernetes_cluster_manifests_fit_together() -> None:
    objects = kube_objects()
    deployment = objects[("Deployment", "mirror")]
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = objects[("PodDisruptionBudget", "mirror")]
    assert pdb["spec"]["minAvailable"] == 2 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/data"]] and container["args"][-2:] == ["--data-dir", "/data"]
    for volume in volumes.values():
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in objects
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in objects
    for source in container.get("envFrom", []):
        assert ("Secret", source["secretRef"]["name"]) in objects
    env = [e["name"] for e in container["env"]]
    advertise = next(e for e in container["env"] if e["name"] == "MIRROR_CLUSTER_ADVERTISE")
    assert advertise["value"] == "http://$(POD_IP):5000" and env.index("POD_IP") < env.index(advertise["name"])
    assert container["env"][env.index("POD_IP")]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    service = objects[("Service", "mirror")]
    ports = {p["name"] for p in container["ports"]}
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    monitor = objects[("ServiceMonitor", "mirror")]["spec"]
    assert {e["port"] for e in monitor["endpoints"]} <= ports
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert any(r["targetLabel"] == "replica" for e in monitor["endpoints"] for r in e["relabelings"])


def test_the_configmap_loads_with_the_secrets_it_names(tmp_path: Path) -> None:
    """The ConfigMap's mirror.toml as a pod reads it: the cluster secret at the path the Secret is mounted on, the
    bucket's keys from the Secret's environment, its advertise from its IP. The placeholder secret is refused."""
    objects = kube_objects()
    pod = objects[("Deployment", "mirror")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    toml_path = tmp_path / "mirror.toml"
    toml_path.write_text(objects[("ConfigMap", "mirror-config")]["data"]["mirror.toml"])
    secret_file = Path(tomllib.loads(toml_path.read_text())["cluster"]["secret_file"])
    volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == str(secret_file.parent))
    secret = objects[("Secret", next(v for v in pod["volumes"] if v["name"] == volume)["secret"]["secretName"])]
    assert secret_file.name in secret["stringData"], f"{secret_file} is not a key of the mounted Secret"
    bucket = objects[("Secret", container["envFrom"][0]["secretRef"]["name"])]["stringData"]
    environ = {**bucket, "MIRROR_CLUSTER_ADVERTISE": "http://10.0.0.7:5000"}
    (tmp_path / "secret").write_text("f" * 64)  # what `openssl rand -hex 32` gives
    _, cluster, storage = load_as(toml_path, {**environ, "MIRROR_CLUSTER_SECRET_FILE": str(tmp_path / "secret")})
    assert cluster.enabled and cluster.advertise == "http://10.0.0.7:5000" and cluster.secret == "f" * 64
    assert storage.s3 and storage.access_key == bucket["AWS_ACCESS_KEY_ID"]
    (tmp_path / "placeholder").write_text(secret["stringData"][secret_file.name])
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_as(toml_path, {**environ, "MIRROR_CLUSTER_SECRET_FILE": str(tmp_path / "placeholder")})

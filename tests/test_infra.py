"""infra/: every manifest parses and agrees with the code — the entrypoint exists, the specs it names validate, the
head asks for no GPU, nothing is exposed outside the cluster, no secret is inline, and the campaign fits."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from pipeline.cluster.resources import check_fit, resource_plan
from pipeline.cluster.submit import SECRET_NAME
from pipeline.config import load_spec

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.parent.name != "specs")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def of_kind(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in docs(p) if d.get("kind") == kind]


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (cluster,) = of_kind("RayCluster")
    return cluster


def test_every_manifest_parses_with_the_kinds_kuberay_and_kubernetes_expect():
    assert {p.relative_to(INFRA).as_posix() for p in MANIFESTS} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "cron/cronjob.yaml",
    }
    expected = {
        "RayCluster": "ray.io/v1",
        "RayJob": "ray.io/v1",
        "CronJob": "batch/v1",
        "NetworkPolicy": "networking.k8s.io/v1",
        "Secret": "v1",
        "ConfigMap": "v1",
        "Service": "v1",
        "Ingress": "networking.k8s.io/v1",
        "Job": "batch/v1",
        "RayService": "ray.io/v1",
        "RayCronJob": "ray.io/v1",
    }
    seen = set()
    for path in MANIFESTS:
        for doc in docs(path):
            assert doc.get("kind") and doc.get("apiVersion"), path
            assert doc["apiVersion"] == expected.get(doc["kind"], doc["apiVersion"]), (path, doc["kind"])
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), path
            seen.add(doc["kind"])
    assert {"RayCluster", "RayJob", "CronJob"} <= seen


def test_entrypoints_name_the_real_module_and_existing_valid_specs():
    assert importlib.util.find_spec("jobs.generate") is not None
    (rayjob,) = of_kind("RayJob")
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.generate"]
    specs = [entry[3]]
    (cron,) = of_kind("CronJob")
    (submit,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = submit["command"]
    assert command[:2] == ["genpipe", "submit"] and "--wait" in command
    specs.append(command[2])
    for spec in specs:
        assert (REPO / spec).is_file(), spec
        assert load_spec(str(REPO / spec)).name == rayjob["spec"]["metadata"]["genpipe_job"]


def test_the_cron_submits_to_the_clusters_own_dashboard_service(raycluster):
    (cron,) = of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    address = command[command.index("--address") + 1]
    assert address == f"http://{raycluster['metadata']['name']}-head-svc:8265"
    (rayjob,) = of_kind("RayJob")
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}


def test_the_head_has_no_gpu_and_the_workers_do(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    assert str(head["rayStartParams"]["num-gpus"]) == "0"
    for c in containers(head["template"]["spec"]):
        for section in ("limits", "requests"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {}), c["name"]
    groups = raycluster["spec"]["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        for c in containers(g["template"]["spec"])
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), g["groupName"]


def test_nothing_is_exposed_outside_the_cluster(raycluster):
    assert raycluster["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not raycluster["spec"].get("headGroupSpec", {}).get("enableIngress", False)
    assert of_kind("Ingress") == []
    for path in MANIFESTS:
        for doc in docs(path):
            assert not [t for t in walk(doc, "type") if t in ("LoadBalancer", "NodePort")], path
            assert not [t for t in walk(doc, "serviceType") if t != "ClusterIP"], path
    (policy,) = of_kind("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": raycluster["metadata"]["name"]}


def test_token_auth_is_on_and_no_secret_is_written_inline(raycluster):
    assert raycluster["spec"]["authOptions"]["mode"] == "token"
    secret = raycluster["spec"]["authOptions"]["secretName"]
    for path in MANIFESTS:
        for doc in docs(path):
            assert doc.get("kind") != "Secret" or not (doc.get("data") or doc.get("stringData")), path
            for env in (e for envs in walk(doc, "env") for e in envs):
                if SECRET_NAME.search(env["name"]) and env["name"] != "RAY_AUTH_MODE":  # a switch, not a secret
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (path, env["name"])
    token_refs = [
        e["valueFrom"]["secretKeyRef"]
        for p in MANIFESTS
        for d in docs(p)
        for envs in walk(d, "env")
        for e in envs
        if e["name"] == "RAY_AUTH_TOKEN"
    ]
    assert len(token_refs) >= 2 and all(ref == {"name": secret, "key": "auth_token"} for ref in token_refs)


def test_manifests_run_the_ray_version_and_image_the_project_pins(raycluster):
    assert raycluster["spec"]["rayVersion"] == version("ray")
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(rf"^ray=={re.escape(version('ray'))}$", constraints, re.M)
    images = {img for p in MANIFESTS for d in docs(p) for img in walk(d, "image")}
    assert len(images) == 1, images  # one image for head, workers and submitters


def test_the_campaign_fits_the_clusters_worker_groups(raycluster):
    """What `genpipe submit` checks against the live cluster, checked here against the manifest, without GPUs."""
    head = {"CPU": float(raycluster["spec"]["headGroupSpec"]["rayStartParams"].get("num-cpus", 0)), "GPU": 0.0}
    nodes = [head]
    for group in raycluster["spec"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        nodes += [{"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}] * group["minReplicas"]
    (rayjob,) = of_kind("RayJob")
    spec = load_spec(str(REPO / rayjob["spec"]["entrypoint"].split()[3]))
    plan = resource_plan(spec)
    assert plan["total_gpus"] == 9.0  # 8 generators × 1 GPU + 4 scorers × 0.25 GPU
    assert check_fit(plan, nodes) == []
    assert check_fit(plan, nodes[:2]) != []  # one GPU node is not enough


def test_dockerfile_uses_a_cuda_base_pins_torch_and_installs_with_the_constraints():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+$", base), base
    assert "FROM ${CUDA_IMAGE}" in text
    pinned = next(
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch==")
    )
    assert pinned == "torch==2.14.1" and "pip install -c constraints.txt torch==2.14.1" in text
    assert 'pip install -c constraints.txt ".[s3]"' in text
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in source.split():
            assert (REPO / item).exists(), item
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {"**/.venv", ".git", "runs"} <= set(ignore)

"""deploy/: KubeRay and Kubernetes manifests parse, use the CRD field names, and agree with each other and the code.

Field names are those of the KubeRay ray.io/v1 Go types and CRDs (ray-operator/apis/ray/v1/raycluster_types.go,
rayjob_types.go, raycronjob_types.go; config/crd/bases/ray.io_raycronjobs.yaml of KubeRay 1.6, where a
RayCronJob's jobTemplate is a RayJobSpec). An unknown or misspelled field is dropped silently by the API server
(or rejected by strict validation), so every key at these levels must be one of them.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pruner.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"

RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
              "env", "envFrom", "volumeMounts", "version"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYCRONJOB_SPEC = {"schedule", "jobTemplate", "suspend"}
ENTRYPOINT = ["python", "-m", "pruner.jobs.prune", "--config", "/config/job.yaml"]
SECRET = "pruner-object-store"
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def load(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    return doc


def pods(cluster_spec: dict) -> dict[str, dict]:
    """{"head" | worker group name: pod spec} of a RayClusterSpec."""
    out = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    out.update({g["groupName"]: g["template"]["spec"] for g in cluster_spec.get("workerGroupSpecs", [])})
    return out


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": load("raycluster.yaml")["spec"],
            "rayjob.yaml": load("rayjob.yaml")["spec"]["rayClusterSpec"],
            "raycronjob.yaml": load("raycronjob.yaml")["spec"]["jobTemplate"]["rayClusterSpec"]}


def check_keys(obj: dict, allowed: set, where: str, required: set = frozenset()) -> None:
    assert set(obj) <= allowed, f"{where}: unknown KubeRay fields {sorted(set(obj) - allowed)}"
    assert required <= set(obj), f"{where}: missing {sorted(required - set(obj))}"


def walk(node):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_every_manifest_parses_with_kinds():
    kinds = {p.name: [(d["apiVersion"], d["kind"]) for d in yaml.safe_load_all(p.read_text())]
             for p in sorted(DEPLOY.glob("*.yaml"))}
    assert kinds == {"configmap.yaml": [("v1", "ConfigMap")], "cronjob.yaml": [("batch/v1", "CronJob")],
                     "raycluster.yaml": [("ray.io/v1", "RayCluster")], "raycronjob.yaml": [("ray.io/v1", "RayCronJob")],
                     "rayjob.yaml": [("ray.io/v1", "RayJob")],
                     "storage.yaml": [("v1", "PersistentVolumeClaim"), ("v1", "PersistentVolumeClaim")]}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_cluster_spec_fields(name):
    spec = cluster_specs()[name]
    check_keys(spec, RAYCLUSTER_SPEC, f"{name} RayClusterSpec", {"headGroupSpec", "rayVersion", "workerGroupSpecs"})
    check_keys(spec["headGroupSpec"], HEAD_GROUP, f"{name} headGroupSpec", {"template", "rayStartParams"})
    check_keys(spec.get("autoscalerOptions", {}), AUTOSCALER, f"{name} autoscalerOptions")
    groups = spec["workerGroupSpecs"]
    for g in groups:
        check_keys(g, WORKER_GROUP, f"{name} workerGroupSpecs[{g.get('groupName')}]",
                   {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"})
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), params  # map[string]string in the CRD
    pod = pods(spec)
    limits = {k: c["resources"]["limits"] for k, p in pod.items() for c in p["containers"]}
    assert "nvidia.com/gpu" not in limits["head"] and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert [g for g in groups if "nvidia.com/gpu" in limits[g["groupName"]]], "no GPU worker group"


def test_raycluster_autoscales_gpu_workers():
    spec = load("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["maxReplicas"] > gpu["minReplicas"] >= 1


def test_rayjob_and_raycronjob():
    job = load("rayjob.yaml")["spec"]
    check_keys(job, RAYJOB_SPEC, "RayJob spec", {"entrypoint", "rayClusterSpec"})
    cron = load("raycronjob.yaml")["spec"]
    check_keys(cron, RAYCRONJOB_SPEC, "RayCronJob spec", {"schedule", "jobTemplate"})
    check_keys(cron["jobTemplate"], RAYJOB_SPEC, "RayCronJob jobTemplate", {"entrypoint", "rayClusterSpec"})
    for spec in (job, cron["jobTemplate"]):
        assert shlex.split(spec["entrypoint"]) == ENTRYPOINT
        assert spec["shutdownAfterJobFinishes"] is True
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]:  # the driver sizes itself when the job starts
            assert g["replicas"] == g["minReplicas"] == g["maxReplicas"]


def test_cronjob_submits_the_entrypoint_to_the_raycluster():
    cron = load("cronjob.yaml")["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    argv = c["command"] + c["args"]
    assert argv[:3] == ["ray", "job", "submit"] and argv[argv.index("--") + 1:] == ENTRYPOINT
    assert argv[argv.index("--address") + 1] == f"http://{load('raycluster.yaml')['metadata']['name']}-head-svc:8265"
    assert len(load("raycronjob.yaml")["spec"]["schedule"].split()) == 5


def test_entrypoint_module_exists():
    spec = importlib.util.find_spec(ENTRYPOINT[2])
    assert spec is not None and spec.origin.endswith("prune.py")
    assert "--config" in Path(spec.origin).read_text()


def test_configmap_holds_a_valid_job_config_mounted_where_the_entrypoint_reads_it():
    cm = load("configmap.yaml")
    cfg = load_config(data=yaml.safe_load(cm["data"]["job.yaml"]), check_paths=False)
    assert cfg.output_dir == "/data/runs" and cfg.trajectory.file.startswith("/checkpoints/")
    mount_dir, key = ENTRYPOINT[-1].rsplit("/", 1)
    for name, spec in cluster_specs().items():
        head = pods(spec)["head"]
        volumes = {v["name"]: v for v in head["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c["volumeMounts"]}
        assert volumes[mounts[mount_dir]]["configMap"]["name"] == cm["metadata"]["name"], name
        assert key in cm["data"]
        claims = {m: volumes[v].get("persistentVolumeClaim", {}).get("claimName") for m, v in mounts.items()}
        assert claims[cfg.output_dir] == "pruner-runs" and claims["/checkpoints"] == "pruner-checkpoints", name
        for group, pod in pods(spec).items():  # every node reads the checkpoints
            paths = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert "/checkpoints" in paths, (name, group)
    pvcs = {d["metadata"]["name"] for d in yaml.safe_load_all((DEPLOY / "storage.yaml").read_text())}
    assert pvcs == {"pruner-runs", "pruner-checkpoints"}


def test_images_and_versions_match_the_dockerfiles():
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", (REPO / "docker" / "Dockerfile.gpu").read_text(), re.M)[1]
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray_version, name
        for group, pod in pods(spec).items():
            flavour = "cpu" if group == "head" else "gpu"
            assert [c["image"] for c in pod["containers"]] == [f"registry.example.com/pruner:{version}-{flavour}"]
    cron_pod = load("cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron_pod["containers"][0]["image"] == f"registry.example.com/pruner:{version}-cpu"


def test_pods_run_as_non_root():
    all_pods = [p for spec in cluster_specs().values() for p in pods(spec).values()]
    all_pods.append(load("cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    for pod in all_pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_credentials_only_from_secret_key_refs():
    for name, spec in cluster_specs().items():
        for group, pod in pods(spec).items():  # head and workers read shards from the object store
            env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
            assert CREDENTIAL_ENV <= set(env), (name, group)
    for path in sorted(DEPLOY.glob("*.yaml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            assert doc["kind"] != "Secret", f"{path.name}: Secrets are created out of band, never committed"
            for node in walk(doc):
                if "name" in node and ("value" in node or "valueFrom" in node):  # an env var
                    if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", node["name"], re.I):
                        assert "value" not in node, f"{path.name}: {node['name']} has a literal value"
                        assert node["valueFrom"]["secretKeyRef"]["name"] == SECRET, (path.name, node)
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: AWS key id literal"
        assert not re.search(r"[A-Za-z0-9/+]{40,}", text), f"{path.name}: a long token-like literal"
        assert "runtimeEnv" not in text, f"{path.name}: runtime envs are shown in the dashboard and logs"
    job_config = yaml.safe_load(load("configmap.yaml")["data"]["job.yaml"])
    for node in walk(job_config):
        assert not [k for k in node if re.search(r"key|secret|token|password|credential", k, re.I)], node

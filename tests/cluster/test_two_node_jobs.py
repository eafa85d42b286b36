"""A real two-node Ray on 127.0.0.1, started with `ray start` as cluster/aws.yaml starts its nodes: the head stands in
for the CPU pool (label pool=data), a second node for the GPU pool (pool=gpu). The prepare and train workflows go to
it with `ray job submit --working-dir .` and the shipped cluster configs, paths pointed at a folder that stands in
for the shared filesystem. Ray's state API then says where their actors ran.

Two things make one machine behave as two. Each node has a temp folder of its own (`--temp-dir`), as each real node
has its own disk: nodes sharing one would share the folder where Ray unpacks a job's working_dir, and one node's
clean-up would delete it under the other's running job. And both nodes see the test's shared folder, which is
exactly what Ray Train asks of a multi-node storage_path: the controller writes a marker file there and every
worker looks for it, so a folder that every node mounts (NFS, EFS, Filestore) passes and a disk of the head's alone
fails. The shared folder here plays /mnt/shared.
"""
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
CPUS_PER_NODE = 2


@dataclass
class Cluster:
    dashboard: str                 # http://127.0.0.1:PORT, the address `ray job submit` talks to
    env: dict[str, str]            # a client's environment: token auth on, this cluster's token
    data_node: str                 # node ids
    gpu_node: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(cluster_env: dict[str, str], *args: str, timeout: float = 60) -> str:
    done = subprocess.run([RAY, *args], env=cluster_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def state(cluster: Cluster, kind: str, *filters: str) -> list[dict]:
    """`ray list KIND --detail` as JSON: what the state API knows, dead actors and finished tasks included."""
    args = ["list", kind, "--address", cluster.dashboard, "--detail", "--format", "json", "--limit", "10000"]
    for f in filters:
        args += ["--filter", f]
    return json.loads(ray_cli(cluster.env, *args))


def _processes_naming(folder: str) -> list[int]:
    """Pids whose command line names `folder` (every Ray process names its node's temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if folder in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop(nodes: list[subprocess.Popen], temp_root: str) -> None:
    """End what `ray start --block` started, by its process groups, then any process of these nodes that left
    them; never `ray stop`, which would stop every Ray of this machine."""
    for node in reversed(nodes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for node in reversed(nodes):
        try:
            node.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.pid, signal.SIGKILL)
    for pid in _processes_naming(temp_root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray_nodes")
    temp_root = tempfile.mkdtemp(prefix="atk-", dir="/tmp")   # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))   # this cluster's own token, not ~/.ray/auth_token
    gcs, dashboard = free_port(), free_port()
    common = ["--block", f"--num-cpus={CPUS_PER_NODE}", "--disable-usage-stats"]
    head = ["start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_root}/data", "--labels=pool=data", *common]
    worker = ["start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={free_port()}",
              f"--temp-dir={temp_root}/gpu", "--labels=pool=gpu", *common]
    nodes: list[subprocess.Popen] = []
    found = Cluster(f"http://127.0.0.1:{dashboard}", env, "", "")
    try:
        for name, args in (("head", head), ("worker", worker)):
            with open(logs / f"{name}.log", "w") as log:
                nodes.append(subprocess.Popen([RAY, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            alive = _wait_for_nodes(found, len(nodes), nodes, logs / f"{name}.log")
        by_pool = {n["labels"]["pool"]: n["node_id"] for n in alive}
        found.data_node, found.gpu_node = by_pool["data"], by_pool["gpu"]
        yield found
    finally:
        _stop(nodes, temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)


def _wait_for_nodes(cluster: Cluster, count: int, nodes: list[subprocess.Popen], log: Path) -> list[dict]:
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(n.poll() is not None for n in nodes):
            raise RuntimeError(f"a Ray node exited:\n{log.read_text()[-3000:]}")
        try:
            alive = [n for n in state(cluster, "nodes") if n["state"] == "ALIVE"]
        except (AssertionError, json.JSONDecodeError, subprocess.TimeoutExpired):
            alive = []
        if len(alive) == count:
            return alive
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes did not come up in 120 s:\n{log.read_text()[-3000:]}")


@dataclass
class Submitted:
    id: str
    output: str                    # what `ray job submit` streamed while it waited
    status: str                    # the job's final status, from the state API
    logs: str                      # `ray job logs`, kept by the cluster
    job_id: str                    # Ray's id of the job (its tasks and actors carry it)


def submit(cluster: Cluster, module: str, args: list[str], timeout: float, keep: Path) -> Submitted:
    """`ray job submit` from the repository root as a user runs it, waiting for the end and streaming the logs;
    what it printed is kept in `keep` for whoever reads a failure."""
    job = f"{module.rsplit('.', 1)[1]}-{uuid.uuid4().hex[:8]}"
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", job, "--working-dir", ".",
               "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "-m", module, *args]
    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    (keep / f"{job}.log").write_text(done.stdout + done.stderr)
    (record,) = [j for j in state(cluster, "jobs") if j.get("submission_id") == job]
    logs = ray_cli(cluster.env, "job", "logs", "--address", cluster.dashboard, job)
    return Submitted(job, done.stdout + done.stderr, record["status"], logs, record["job_id"])


# --- what a user has on the shared filesystem before the first job ---------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The shared folder (/mnt/shared on a cluster): a small demo dataset of real digits and spoken digit words,
    tiny tokenizers, and a tiny base LLM with its own tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import AudioVQConfig, AudioVQTokenizer, ImageVQConfig, ImageVQTokenizer, QuantizerConfig
    from models.text_tokenizer import train_text_tokenizer
    from workflows.demo_data import DemoDataConfig, build_demo_data

    root = tmp_path_factory.mktemp("shared")
    build_demo_data(DemoDataConfig(out=str(root / "data"), images=24, audio_per_digit=1, videos=0, seed=5))
    torch.manual_seed(0)
    ImageVQTokenizer(ImageVQConfig(channels=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=8))) \
        .save_pretrained(root / "tokenizers" / "image")
    AudioVQTokenizer(AudioVQConfig(channels=8, n_mels=16, quantizer=QuantizerConfig(codebook_size=8, code_dim=8))) \
        .save_pretrained(root / "tokenizers" / "audio")
    texts = [json.loads(line)["text"] for line in (root / "data" / "manifest.jsonl").read_text().splitlines()]
    tokenizer = train_text_tokenizer(texts, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root


@pytest.fixture(scope="module")
def prepare_job(cluster, shared) -> Submitted:
    return submit(cluster, "workflows.prepare", [
        "--config", "workflows/configs/cluster/prepare.yaml",
        f"--manifest={shared / 'data' / 'manifest.jsonl'}", f"--out={shared / 'prepared'}",
        f"tokenizers={shared / 'tokenizers'}", f"text_tokenizer={shared / 'llm'}",
        "sequences.context_length=128", "tokenize.concurrency=1", "tokenize.num_cpus=1", "tokenize.batch_size=8",
        "rows_per_part=1000"], timeout=420, keep=shared)


def test_prepare_job_runs_its_data_work_on_the_cpu_pool_and_writes_where_the_config_says(cluster, shared,
                                                                                       prepare_job):
    assert prepare_job.status == "SUCCEEDED", prepare_job.output[-5000:]
    for line in ("part 1/1", "input rows", "shards, errors/ and stats.json are in"):   # the workflow's own lines
        assert line in prepare_job.output and line in prepare_job.logs, line

    out = shared / "prepared"
    stats = json.loads((out / "stats.json").read_text())
    manifest = (shared / "data" / "manifest.jsonl").read_text().splitlines()
    assert stats["input_rows"] == len(manifest) == stats["ok_rows"] + stats["error_rows"]
    assert stats["ok_rows"] == len(manifest) and set(stats["media_tokens"]) == {"image", "audio"}
    assert {p.name.split("-")[2] for p in (out / "train").glob("part-*.parquet")} == {"image", "audio"}

    tokenizer_actors = [a for a in state(cluster, "actors") if "TokenizeActor" in a["class_name"]]
    assert tokenizer_actors and {a["node_id"] for a in tokenizer_actors} == {cluster.data_node}
    # reading holds no CPU, so only its selector keeps it off other nodes; preprocessing may be fused into the actors
    tasks = [t for t in state(cluster, "tasks", f"job_id={prepare_job.job_id}")
             if "MapBatches" in t["name"] and t["type"] != "ACTOR_CREATION_TASK"]   # creations: see the actors
    assert any("read_media" in t["name"] for t in tasks)
    assert {t["node_id"] for t in tasks} == {cluster.data_node}, {t["name"]: t["node_id"] for t in tasks}


def test_train_job_runs_its_workers_on_the_gpu_pool_and_exports_the_model_where_the_config_says(
        cluster, shared, prepare_job):
    from models import load_pretrained

    assert prepare_job.status == "SUCCEEDED"
    out, storage = shared / "models" / "teal", shared / "ray"
    job = submit(cluster, "workflows.train", [
        "--config", "workflows/configs/cluster/train.yaml",
        f"data={shared / 'prepared'}", f"base_llm={shared / 'llm'}", f"--out={out}", "name=two-node",
        f"loop.storage_path={storage}",          # the shared folder, as an NFS mount would be
        "loop.use_gpu=false", "loop.num_workers=2", "loop.cpus_per_worker=1", "loop.micro_batch_size=2",
        "loop.grad_accum=1", "loop.log_every=2", "loop.checkpoint_every=4", "loop.deepspeed.precision=fp32",
        "loop.optim.warmup_steps=1", "loop.max_failures=0", "stages=[{name: joint, train: [all], steps: 4}]"],
        timeout=480, keep=shared)
    assert job.status == "SUCCEEDED", job.output[-5000:]
    # the driver's lines and, streamed from the GPU node, the rank-0 worker's
    for line in ("stage 1/1 'joint'", "step 4/4 loss", "LLM untouched: True", json.dumps({"model": str(out)})):
        assert line in job.output and line in job.logs, line

    for name in ("config.json", "model.safetensors", "vocabulary.json", "tokenizers/image/config.json",
                 "text_tokenizer/tokenizer.json", "metrics.jsonl", "training.json"):
        assert (out / name).is_file(), name
    training = json.loads((out / "training.json").read_text())
    assert [s["stage"] for s in training["stages"]] == ["joint"] and training["stages"][0]["frozen_llm_unchanged"]
    assert (storage / "two-node-joint" / "step_000004" / "complete" / "rank1.json").is_file()
    assert load_pretrained(out).embeddings["image"].weight.shape[0] == 16

    workers = [a for a in state(cluster, "actors") if a["class_name"] == "RayTrainWorker"]
    assert len(workers) == 2 and {a["node_id"] for a in workers} == {cluster.gpu_node}

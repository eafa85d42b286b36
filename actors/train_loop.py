"""The one training loop: Ray Train's TorchTrainer, a DeepSpeed engine per worker, streamed Ray Data shards,
checkpoints that are written whole before they count, resume, and recovery from a lost worker.

Every model with `training_step(batch) -> StepOutput` trains here: the tokenizers, CLIP, the X2L interface and
the TEAL MultimodalLM. The driver calls `fit(job)`; each worker runs `_worker_loop`.

A checkpoint directory (one per reported step, `step_NNNNNN/`) holds:
  ds/            DeepSpeed's own checkpoint (model, optimizer, schedule; every rank's shards)
  complete/      one `rankR.json` per rank, written after its shards: the files it wrote and their sizes
  export/        only in the last one: the trained model as a folder `load_pretrained` reads
A checkpoint is loaded only when every rank's manifest is there and every file it names has its size.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.train_data import DataConfig, batch_size_of, count_tokens, make_collate
from models.configuration import ConfigError

logger = logging.getLogger(__name__)
EXPORT_DIR = "export"


class CheckpointError(RuntimeError):
    """A checkpoint that is not whole: a rank's manifest or a file it names is missing or has the wrong size."""


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 2                # 0, 1, 2 or 3
    offload_optimizer: bool = False    # optimizer state in CPU memory (ZeRO 1-3)
    offload_params: bool = False       # parameters in CPU memory (ZeRO 3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPUs, fp32 on CPUs


@dataclass
class OptimOptions:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1          # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0             # 0: no clipping


@dataclass
class Fault:
    """Deliberate failure, for recovery tests and drills, at `rank` and `step` of a run's first attempt: the worker
    exits (os._exit) once the step and its checkpoint are done and committed (`after_step`), or half-way through
    writing the step's checkpoint (`during_save`); or, with `await_kill`, it writes its pid to `pid_file` once the
    step's checkpoint is committed and waits (up to a minute) for someone to kill it with a real signal."""
    rank: int = -1                     # -1: none
    step: int = 0
    when: Literal["after_step", "during_save", "await_kill"] = "after_step"
    pid_file: str = ""


@dataclass
class LoopConfig:
    name: str = "run"                  # the run's folder under storage_path; same name + storage = resume
    storage_path: str = "runs/ray"     # a shared path or cloud URI on multi-node clusters
    steps: int = 100                   # optimizer steps
    micro_batch_size: int = 8          # per worker
    grad_accum: int = 1
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)   # custom resources, e.g. {"nvme": 1}
    label_selector: dict[str, str] = field(default_factory=dict)   # the workers' nodes, e.g. {"pool": "gpu"}
    max_failures: int = 2              # worker-group restarts from the last checkpoint
    poll_s: float = 0.25               # how often Ray Train's controller takes a report and checks the workers
                                       # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a report waits for the controller,
                                       # so Ray's default of 2 s holds every report up to 2 s
    seed: int = 0
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    fault: Fault = field(default_factory=Fault)

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be at least 1, got {getattr(self, name)}")
        if not self.poll_s > 0:
            raise ConfigError(f"loop.poll_s must be a positive number of seconds, got {self.poll_s}")


@dataclass
class Job:
    """What to train: `build()` runs on every worker and returns the model with its trainable parts set."""
    build: Callable[[], torch.nn.Module]
    loop: LoopConfig
    data: DataConfig
    datasets: dict[str, ray.data.Dataset]     # "train" and optionally "val"


@dataclass
class RunResult:
    export: Path | None                # the exported model folder (local copy)
    history: list[dict[str, Any]]
    val: list[dict[str, Any]]
    resumed_from: list[int]            # the step each (re)start began at: [0] when nothing failed
    frozen_digest_before: str
    frozen_digest_after: str
    checkpoint_path: str


# --- schedule and DeepSpeed config ----------------------------------------------------------------------
def lr_factor(step: int, optim: OptimOptions, total: int) -> float:
    """Linear warmup to 1, then a cosine down to min_lr_ratio at `total`."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(loop: LoopConfig, on_gpu: bool) -> dict[str, Any]:
    ds = loop.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, not {ds.zero_stage}")
    if ds.offload_params and ds.zero_stage != 3:
        raise ValueError("deepspeed.offload_params needs zero_stage 3")
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and on_gpu)
    return {"train_micro_batch_size_per_gpu": loop.micro_batch_size,
            "gradient_accumulation_steps": loop.grad_accum,
            "gradient_clipping": loop.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,     # a torch AdamW over the trainable parameters only
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


# --- checkpoints -----------------------------------------------------------------------------------------
def _write_manifest(root: Path, rank: int, world: int, tag: str) -> None:
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and not p.relative_to(root).parts[0] == "complete"}
    (root / "complete").mkdir(exist_ok=True)
    tmp = root / "complete" / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world_size": world, "tag": tag, "files": files}))
    tmp.rename(root / "complete" / f"rank{rank}.json")


def verify_checkpoint(root: str | Path) -> dict[str, Any]:
    """Every rank's manifest present and every file it names whole; returns the tag and world size."""
    root = Path(root)
    manifests = sorted((root / "complete").glob("rank*.json")) if (root / "complete").is_dir() else []
    if not manifests:
        raise CheckpointError(f"{root}: no complete/rank*.json: the checkpoint was never finished")
    entries = [json.loads(m.read_text()) for m in manifests]
    world = entries[0]["world_size"]
    ranks = {e["rank"] for e in entries}
    if ranks != set(range(world)):
        raise CheckpointError(f"{root}: manifests of ranks {sorted(ranks)} of a world of {world}")
    for entry in entries:
        for name, size in entry["files"].items():
            path = root / name
            if not path.is_file():
                raise CheckpointError(f"{root}: rank {entry['rank']} wrote {name}, which is missing")
            if path.stat().st_size != size:
                raise CheckpointError(f"{root}: {name} has {path.stat().st_size} bytes, rank {entry['rank']} "
                                      f"wrote {size}")
    return {"tag": entries[0]["tag"], "world_size": world}


def _die(where: str) -> None:
    logger.warning("fault injection: this worker exits now (%s)", where)
    os._exit(1)


def _inject_after_step(fault: Fault, step: int) -> None:
    if fault.when == "during_save":
        return
    # every report so far committed by the controller, so the step's checkpoint is what a restart finds
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    if fault.when == "after_step":
        _die(f"after step {step}")
    Path(fault.pid_file).write_text(str(os.getpid()))
    logger.warning("fault injection: waiting to be killed after step %d (pid %d)", step, os.getpid())
    time.sleep(60)
    raise RuntimeError(f"fault injection: nobody killed pid {os.getpid()} within a minute")


# --- the worker loop -------------------------------------------------------------------------------------
def _gathered(engine, params: list[torch.nn.Parameter]):
    """Full tensors of ZeRO-3 partitioned parameters inside the block (a collective: every rank enters)."""
    import contextlib

    import deepspeed

    if engine is not None and engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def frozen_digest(model: torch.nn.Module, engine=None) -> str:
    """SHA-256 over every parameter that does not train, gathered one at a time under ZeRO-3."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        with _gathered(engine, [p]):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _to_device(batch: Any, device: torch.device, float_dtype: torch.dtype) -> Any:
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.to(float_dtype) if t.is_floating_point() else t

    return {k: move(v) for k, v in batch.items()} if isinstance(batch, dict) else move(batch)


def _batches(shard, loop: LoopConfig, collate, state: dict[str, Any]) -> Iterator[Any]:
    """Endless micro-batches over epochs; on resume, the batches of the current epoch already trained on are
    skipped (read but not collated), so the run continues from its data position."""
    while True:
        skip = state["batch_in_epoch"]
        seen = 0
        for raw in shard.iter_batches(batch_size=loop.micro_batch_size, batch_format="numpy", drop_last=True,
                                      prefetch_batches=2):
            seen += 1
            if seen <= skip:
                continue
            state["batch_in_epoch"] = seen
            yield collate(raw)
        if seen == 0:
            raise ValueError("a worker's data shard has no full micro-batch: use more data, fewer workers "
                             "or a smaller micro_batch_size")
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def _reduction_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces GPU tensors only, gloo CPU ones."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mean_over_ranks(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """Per-key means over every rank's window; a metric some batches lack (no media token, no SEA pair) is
    averaged over the batches that have it, and ranks may hold different keys."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: sums[k] / counts[k] for k in sorted(sums)}
    every: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, sorted(sums))
    keys = sorted(set().union(*every))
    t = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0.0)] for k in keys], dtype=torch.float64,
                     device=_reduction_device())
    dist.all_reduce(t)
    return {k: float(total) / float(n) for k, (total, n) in zip(keys, t.tolist()) if n > 0}


def _sum_over_ranks(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: GPU memory allocated on a GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


@torch.no_grad()
def _val_loss(engine, shard, loop: LoopConfig, collate, device, float_dtype, max_batches: int = 16) -> float:
    """Mean loss over (up to max_batches per rank of) the held-out shard; every rank reads its whole shard,
    which Ray splits evenly, so that ZeRO-3's gathers stay in step."""
    engine.eval()
    total, n = 0.0, 0
    for raw in shard.iter_batches(batch_size=loop.micro_batch_size, batch_format="numpy", drop_last=False):
        if n >= max_batches:
            continue
        out = engine(_to_device(collate(raw), device, float_dtype))
        total, n = total + float(out.loss), n + 1
    engine.train()
    got = _sum_over_ranks([total, float(n)])
    return got[0] / got[1] if got[1] else float("nan")


def _new_window() -> dict[str, Any]:
    """What the loop sums between two log lines."""
    return {"t0": time.perf_counter(), "tokens": 0, "samples": 0, "sums": {}, "counts": {}}


def _accumulate(window: dict[str, Any], metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        window["sums"][k] = window["sums"].get(k, 0.0) + v
        window["counts"][k] = window["counts"].get(k, 0) + 1


def _worker_loop(job: dict[str, Any]) -> dict[str, Any]:
    import deepspeed

    loop, data = job["loop"], job["data"]
    if os.path.isdir(job["cwd"]):
        # relative paths in configs mean the driver's folder (a worker with a runtime env starts elsewhere); on
        # another node of a `ray job submit` run the job's working_dir copy is already the worker's folder
        os.chdir(job["cwd"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(loop.seed)

    model = job["build"]()
    digest_before = frozen_digest(model) if rank == 0 else ""
    groups = model.optimizer_groups()          # (parameters, learning-rate multiple); the base rate's first
    if not any(params for params, _ in groups):
        raise ValueError("nothing to train: the model has no parameter with requires_grad")
    optimizer = torch.optim.AdamW([{"params": params, "lr": loop.optim.lr * scale} for params, scale in groups],
                                  lr=loop.optim.lr, betas=tuple(loop.optim.betas), weight_decay=loop.optim.weight_decay)
    ds_config = deepspeed_config(loop, on_gpu)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, loop.optim, loop.steps)))
    float_dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "val": [],
                             "resumed_from": [], "digest_before": digest_before}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            info = verify_checkpoint(folder)
            if info["world_size"] != world:
                logger.warning("checkpoint written by %d workers, resuming on %d", info["world_size"], world)
            _, client = engine.load_checkpoint(os.path.join(folder, "ds"), tag=info["tag"])
            state = client["anytoken"]
    state["resumed_from"].append(state["step"])
    # a drill's fault fires in a run's first attempt only: the attempts after it show the recovery
    fault_armed = loop.fault.rank == rank and len(state["resumed_from"]) == 1
    if rank == 0:
        logger.info("training from step %d of %d (%d workers, ZeRO-%d, %s)", state["step"], loop.steps, world,
                    loop.deepspeed.zero_stage, "bf16" if float_dtype == torch.bfloat16 else "fp32")

    collate = make_collate(data)
    batches = _batches(ray.train.get_dataset_shard("train"), loop, collate, state)
    val_shard = ray.train.get_dataset_shard("val") if job["has_val"] else None
    window = _new_window()

    while state["step"] < loop.steps:
        for _ in range(loop.grad_accum):
            batch = _to_device(next(batches), device, float_dtype)
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            window["tokens"] += count_tokens(batch)
            window["samples"] += batch_size_of(batch)
            _accumulate(window, out.metrics)
        state["step"] += 1
        step = state["step"]
        norm = engine.get_global_grad_norm()
        if norm is not None:
            _accumulate(window, {"grad_norm": float(norm)})

        if step % loop.log_every == 0 or step == loop.steps:
            seconds = time.perf_counter() - window["t0"]
            entry = _mean_over_ranks(window["sums"], window["counts"])
            tokens, samples = _sum_over_ranks([window["tokens"], window["samples"]])
            entry.update(step=step, epoch=state["epoch"], lr=float(scheduler.get_last_lr()[0]),
                         tokens_per_s=tokens / seconds, samples_per_s=samples / seconds,
                         peak_memory_mb=_sum_over_ranks([peak_memory_mb(device)], op="max")[0])
            state["history"].append(entry)
            if rank == 0:
                logger.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", step, loop.steps,
                            entry.get("loss", float("nan")), entry["lr"], entry.get("grad_norm", float("nan")),
                            entry["tokens_per_s"])
            window = _new_window()
            if step % loop.checkpoint_every != 0 and step != loop.steps:
                ray.train.report(entry)

        if step % loop.checkpoint_every == 0 or step == loop.steps:
            if val_shard is not None:
                state["val"].append({"step": step, "val_loss": _val_loss(engine, val_shard, loop, collate, device,
                                                                         float_dtype)})
            _save(engine, model, state, rank, world, final=step == loop.steps,
                  die_while_saving=fault_armed and loop.fault.step == step and loop.fault.when == "during_save")
        if fault_armed and loop.fault.step == step:
            _inject_after_step(loop.fault, step)

    return {"history": state["history"], "val": state["val"], "resumed_from": state["resumed_from"]}


def _save(engine, model, state: dict[str, Any], rank: int, world: int, final: bool, die_while_saving: bool) -> None:
    step = state["step"]
    tag = f"step{step}"
    metrics = {"step": step, **{k: v for k, v in (state["history"][-1] if state["history"] else {}).items()
                                if k != "step"}}
    if state["val"] and state["val"][-1]["step"] == step:
        metrics["val_loss"] = state["val"][-1]["val_loss"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if final:
            _export(engine, model, state, rank, root / EXPORT_DIR)
        engine.save_checkpoint(str(root / "ds"), tag=tag, client_state={"anytoken": state})
        if die_while_saving:
            time.sleep(3)
            _die(f"while writing the checkpoint of step {step}")
        _write_manifest(root, rank, world, tag)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:06d}")


def _export(engine, model, state: dict[str, Any], rank: int, folder: Path) -> None:
    """Rank 0 writes the model folder; under ZeRO-3 every rank takes part in gathering what it saves."""
    names = set(model.saved_state())
    params = [p for n, p in model.named_parameters() if n in names]
    with _gathered(engine, params):
        if rank == 0:
            model.save_pretrained(folder)
    digest_after = frozen_digest(model, engine)
    if rank == 0:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state["history"]))
        (folder / "training.json").write_text(json.dumps(
            {"steps": state["step"], "val": state["val"], "resumed_from": state["resumed_from"],
             "frozen_digest_before": state["digest_before"], "frozen_digest_after": digest_after}, indent=2))


# --- the driver ------------------------------------------------------------------------------------------
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def _controller_polls_every(seconds: float) -> Iterator[None]:
    """Ray Train hands this variable from the driver's environment to the controller it starts in `fit()`; it is
    set only for that call, and what the driver had before comes back."""
    before = os.environ.get(POLL_ENV)
    os.environ[POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        if before is None:
            del os.environ[POLL_ENV]
        else:
            os.environ[POLL_ENV] = before


def fit(job: Job, export_to: str | Path | None = None) -> RunResult:
    """Train, resuming from the run's last whole checkpoint if it has one; copy the export to `export_to`."""
    loop = job.loop
    resources = {"CPU": loop.cpus_per_worker, **loop.resources_per_worker}
    if loop.use_gpu:
        resources["GPU"] = 1
    storage = loop.storage_path if "://" in loop.storage_path else str(Path(loop.storage_path).resolve())
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"build": job.build, "loop": loop, "data": job.data,
                                         "has_val": "val" in job.datasets, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=loop.num_workers, use_gpu=loop.use_gpu,
                                     resources_per_worker=resources, label_selector=loop.label_selector or None),
        run_config=RunConfig(name=loop.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=loop.max_failures, controller_failure_limit=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=loop.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get(
                                 "ANYTOKEN_WORKER_THREADS", "1")}}),
        datasets=job.datasets,
        # the same rows in the same order on every run, so a resumed run sees what the uninterrupted one would
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)))
    with _controller_polls_every(loop.poll_s):
        result = trainer.fit()
    back = result.return_value or {}
    export = None
    info: dict[str, Any] = {}
    with result.checkpoint.as_directory() as folder:
        verify_checkpoint(folder)
        if (Path(folder) / EXPORT_DIR).is_dir():
            info = json.loads((Path(folder) / EXPORT_DIR / "training.json").read_text())
            if export_to is not None:
                import shutil

                export = Path(export_to)
                if export.exists():
                    shutil.rmtree(export)
                shutil.copytree(Path(folder) / EXPORT_DIR, export)
    return RunResult(export=export, history=back.get("history", []), val=back.get("val", []),
                     resumed_from=back.get("resumed_from", info.get("resumed_from", [])),
                     frozen_digest_before=info.get("frozen_digest_before", ""),
                     frozen_digest_after=info.get("frozen_digest_after", ""),
                     checkpoint_path=result.checkpoint.path)


"""The training loop on a real local Ray with 2 CPU workers, gloo and real DeepSpeed."""
import json
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.train_data import DataConfig, sequence_dataset
from actors.train_loop import (CheckpointError, DeepSpeedOptions, Fault, Job, LoopConfig, OptimOptions,
                               _mean_over_ranks, _sum_over_ranks, fit, lr_factor, verify_checkpoint)
from models import load_pretrained
from models.multimodal_lm import LoraConfig, MultimodalLM, MultimodalLMConfig
from models.sequences import media_text_documents, pack_documents
from models.vocabulary import JointVocabulary

WORDS = ["zero", "one", "two", "three"]
CONTEXT = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory, text_tokenizer_path) -> Path:
    """Packed shards as `anytoken prepare` writes them: image codes 4d..4d+3 paired with the word for d."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("shards")
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 16})
    vocab.save_pretrained(root)
    tok = AutoTokenizer.from_pretrained(text_tokenizer_path)
    for split, n in (("train", 384), ("val", 16)):
        docs = []
        for i in range(n):
            d = i % 4
            block = vocab.wrap("image", torch.arange(4 * d, 4 * d + 4))
            text = tok(WORDS[d], add_special_tokens=False)["input_ids"]
            docs += media_text_documents(f"{split}{i}", block, text, ["understanding", "generation"], bos_id=None,
                                         eos_id=1)
        rows = pack_documents(docs, CONTEXT, pad_id=1)
        table = pa.Table.from_pylist([{k: getattr(r, k) for k in ("input_ids", "loss_mask", "doc_ids",
                                                                  "position_ids")} for r in rows])
        (root / split).mkdir()
        pq.write_table(table, root / split / "part-00000-image-0000.parquet")
    return root


def build_lm(llm: str, vocabulary: dict) -> MultimodalLM:
    torch.manual_seed(0)
    model = MultimodalLM(MultimodalLMConfig(base_llm=llm, vocabulary=vocabulary, text_special_ids=[0, 1]))
    model.set_trainable(["special", "image"])
    return model


def make_job(shards: Path, llm: str, tmp: Path, name: str, **loop) -> Job:
    vocabulary = json.loads((shards / "vocabulary.json").read_text())
    data = DataConfig(kind="sequences", path=str(shards))
    settings = dict(name=name, storage_path=str(tmp / "ray"), steps=12, micro_batch_size=4, log_every=2,
                    checkpoint_every=4, num_workers=2, optim=OptimOptions(lr=3e-2, warmup_steps=2))
    settings.update(loop)
    return Job(build=partial(build_lm, llm, vocabulary), loop=LoopConfig(**settings), data=data,
               datasets={"train": sequence_dataset(data, "train"), "val": sequence_dataset(data, "val")})


@pytest.mark.parametrize("bad", [{"poll_s": 0}, {"poll_s": -1.0}, {"log_every": 0}, {"checkpoint_every": 0},
                                 {"micro_batch_size": 0}, {"grad_accum": 0}])
def test_a_loop_config_that_cannot_run_is_refused_with_its_key(bad):
    (key,) = bad
    with pytest.raises(ValueError, match=f"loop.{key} must be"):
        LoopConfig(**bad)


def test_the_schedule_warms_up_then_follows_a_cosine():
    optim = OptimOptions(warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, optim, 20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="NCCL needs a GPU"))])
def test_the_logged_figures_are_reduced_over_ranks_on_either_backend(backend, tmp_path):
    """The loop's metric reductions in a real one-rank process group: NCCL reduces only GPU tensors, so on a GPU
    run they must build theirs there (they built CPU ones, and every GPU run failed at its first log step)."""
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert _sum_over_ranks([3.0, 5.0]) == [3.0, 5.0]
        assert _sum_over_ranks([7.0], op="max") == [7.0]
        assert _mean_over_ranks({"loss": 6.0}, {"loss": 3.0}) == {"loss": 2.0}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_the_joint_embedding_and_leaves_the_llm_alone(ray_local, shards, tiny_llm_path, tmp_path, stage):
    job = make_job(shards, tiny_llm_path, tmp_path, f"zero{stage}", deepspeed=DeepSpeedOptions(zero_stage=stage))
    result = fit(job, export_to=tmp_path / "export")
    losses = [h["lm_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(2, 13, 2))
    assert losses[-1] < 0.6 * losses[0], losses
    assert result.history[-1]["tokens_per_s"] > 0 and result.history[-1]["lr"] < 3e-2
    assert [v["step"] for v in result.val] == [4, 8, 12] and result.val[-1]["val_loss"] < result.val[0]["val_loss"]
    assert result.frozen_digest_before == result.frozen_digest_after != ""
    assert result.resumed_from == [0]

    model = load_pretrained(result.export)                      # the export reloads and gives the trained loss
    assert model.frozen_digest() == build_lm(tiny_llm_path, model.vocab.to_dict()).frozen_digest()
    batch = next(iter(job.datasets["val"].iter_torch_batches(batch_size=8)))
    with torch.no_grad():
        loss = model.training_step({k: batch[k] for k in ("input_ids", "loss_mask", "doc_ids", "position_ids")})
    assert loss.metrics["lm_loss"] < losses[0] * 0.6
    assert (result.export / "metrics.jsonl").read_text().count("\n") == len(result.history)


def build_lora_plus(llm: str, vocabulary: dict) -> MultimodalLM:
    torch.manual_seed(0)
    model = MultimodalLM(MultimodalLMConfig(base_llm=llm, vocabulary=vocabulary, text_special_ids=[0, 1],
                                            lora=LoraConfig(rank=2, b_lr_ratio=8.0)))
    model.set_trainable(["image", "lora.image"])
    return model


@pytest.mark.slow
def test_lora_b_matrices_learn_at_their_multiple_of_the_rate(ray_local, shards, tiny_llm_path, tmp_path):
    """One step of Adam moves each weight by about lr (its first step is lr * g / |g|): B, which starts at zero,
    ends at 8 lr where the image table moved at most lr."""
    vocabulary = json.loads((shards / "vocabulary.json").read_text())
    data = DataConfig(kind="sequences", path=str(shards))
    loop = LoopConfig(name="lora-plus", storage_path=str(tmp_path / "ray"), steps=1, micro_batch_size=4,
                      num_workers=2, optim=OptimOptions(lr=1e-3, warmup_steps=1, grad_clip=0.0))
    result = fit(Job(build=partial(build_lora_plus, tiny_llm_path, vocabulary), loop=loop, data=data,
                     datasets={"train": sequence_dataset(data, "train")}), export_to=tmp_path / "export")
    trained = load_pretrained(result.export).state_dict()
    start = build_lora_plus(tiny_llm_path, vocabulary).state_dict()
    b = max(float(trained[n].abs().max()) for n in trained if ".lora_b_image" in n)
    table = float((trained["embeddings.image.weight"] - start["embeddings.image.weight"]).abs().max())
    assert b == pytest.approx(8e-3, rel=1e-3) and 0 < table <= 1e-3 * 1.001


def build_noting_the_poll(llm: str, vocabulary: dict, note: str) -> MultimodalLM:
    """build_lm on a worker, which first writes down how often its controller was told to poll."""
    from actors.train_loop import POLL_ENV

    Path(note).write_text(os.environ.get(POLL_ENV, "unset"))
    return build_lm(llm, vocabulary)


@pytest.mark.slow
def test_the_controller_polls_as_the_loop_config_says_and_the_driver_keeps_its_own(ray_local, shards, tiny_llm_path,
                                                                                    tmp_path, monkeypatch):
    """Ray Train passes the variable from the driver to the controller and on to the workers; Ray's own default
    (2 s) would hold each report of a short run up to 2 s."""
    from actors.train_loop import POLL_ENV

    monkeypatch.setenv(POLL_ENV, "7")
    job = make_job(shards, tiny_llm_path, tmp_path, "poll", steps=1, poll_s=0.4)
    vocabulary = json.loads((shards / "vocabulary.json").read_text())
    job.build = partial(build_noting_the_poll, tiny_llm_path, vocabulary, str(tmp_path / "poll.txt"))
    fit(job)
    assert (tmp_path / "poll.txt").read_text() == "0.4" and os.environ[POLL_ENV] == "7"


@pytest.mark.slow
def test_a_resumed_run_continues_the_count_and_the_curve(ray_local, shards, tiny_llm_path, tmp_path):
    import ray.train

    whole = fit(make_job(shards, tiny_llm_path, tmp_path, "whole"))
    # the first attempt dies after step 8 (checkpointed) with no restarts allowed: the job fails ...
    with pytest.raises(ray.train.TrainingFailedError):
        fit(make_job(shards, tiny_llm_path, tmp_path, "split", checkpoint_every=8, max_failures=0,
                     fault=Fault(rank=0, step=8, when="after_step")))
    # ... and submitting it again (same name and storage) resumes at step 8
    second = fit(make_job(shards, tiny_llm_path, tmp_path, "split", checkpoint_every=8))
    assert second.resumed_from == [0, 8]
    assert [h["step"] for h in second.history] == [h["step"] for h in whole.history]
    # Ray hands blocks to workers in arrival order, so batches may differ a little between runs; a run that lost
    # its state on resume would be back near the first loss (about 4) instead of on the uninterrupted curve
    for a, b in zip(whole.history, second.history):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=0.1), ([h["lm_loss"] for h in whole.history],
                                                                    [h["lm_loss"] for h in second.history])


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_finishes_from_its_checkpoint(ray_local, shards, tiny_llm_path,
                                                                            tmp_path):
    # rank 1 parks itself after step 4's checkpoint is committed; the test kills it with SIGKILL
    pid_file = tmp_path / "worker.pid"
    job = make_job(shards, tiny_llm_path, tmp_path, "killed",
                   fault=Fault(rank=1, step=4, when="await_kill", pid_file=str(pid_file)))
    killed: list[int] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not pid_file.is_file():
            time.sleep(0.1)
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = fit(job, export_to=tmp_path / "export")
    thread.join()
    assert killed, "the worker never reached the step where it waits to be killed"
    assert result.resumed_from == [0, 4]
    assert result.history[-1]["step"] == 12 and (tmp_path / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_half_written_checkpoint_is_never_loaded(ray_local, shards, tiny_llm_path, tmp_path):
    # rank 1 dies while writing step 8's checkpoint: the run must go on from step 4, the last whole one
    job = make_job(shards, tiny_llm_path, tmp_path, "halfway", fault=Fault(rank=1, step=8, when="during_save"))
    result = fit(job)
    assert result.resumed_from == [0, 4]
    assert result.history[-1]["step"] == 12
    # and a checkpoint folder with a file missing or cut short is refused, not loaded
    folder = Path(result.checkpoint_path)
    verify_checkpoint(folder)
    victim = max((p for p in folder.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="bytes"):
        verify_checkpoint(folder)
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(folder)
    for manifest in (folder / "complete").glob("*.json"):
        manifest.unlink()
    with pytest.raises(CheckpointError, match="never finished"):
        verify_checkpoint(folder)

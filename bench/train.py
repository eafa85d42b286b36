"""Benchmark: the TEAL training loop on Ray Train + DeepSpeed, by worker count and ZeRO stage.

    python bench/train.py [--steps 24] [--context 512] [--hidden 256] [--layers 4] [--use-gpu] [--settings 1x0,2x3]

Trains a MultimodalLM (joint tables over a frozen Llama of the given shape) on synthetic packed shards for
each setting: 1 worker ZeRO-0, 2 workers ZeRO-0/2/3 (and 1 worker ZeRO-2/3). Prints one JSON line with, per
setting (or those --settings names, WORKERSxSTAGE), samples/s and tokens/s (the last logging window, so start-up and the first steps are left out),
the peak memory of a worker, and the model FLOP/s achieved as a fraction of the matmul peak of this machine
measured in the same run (one thread per worker on CPUs; the GPU's bf16 peak with --use-gpu).
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.basename(os.path.abspath(sys.path[0])) == "bench":
    sys.path.pop(0)     # bench/tokenizers.py would hide the tokenizers package

import argparse
import json
import shutil
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from actors.train_data import DataConfig, sequence_dataset
from actors.train_loop import DeepSpeedOptions, Job, LoopConfig, OptimOptions, fit
from models.multimodal_lm import MultimodalLM, MultimodalLMConfig
from models.sequences import media_text_documents, pack_documents
from models.text_tokenizer import byte_level_tokenizer
from models.vocabulary import JointVocabulary

SETTINGS = [(1, 0), (1, 2), (1, 3), (2, 0), (2, 2), (2, 3)]


def make_inputs(folder: Path, args: argparse.Namespace) -> tuple[str, dict, float]:
    """A frozen Llama of the asked shape, its tokenizer, packed shards of random image-caption pairs, and how
    many keys a position attends to on average (attention stays within a document)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                                       intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                                       num_attention_heads=max(1, args.hidden // 64),
                                       max_position_embeddings=args.context))
    llm.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")
    vocab = JointVocabulary(len(tokenizer), {"image": 1024})
    vocab.save_pretrained(folder / "data")
    generator = torch.Generator().manual_seed(0)
    docs = []
    for i in range(args.documents):
        block = vocab.wrap("image", torch.randint(0, 1024, (64,), generator=generator))
        text = torch.randint(4, len(tokenizer), (12,), generator=generator).tolist()
        docs += media_text_documents(f"s{i}", block, text, ["understanding", "generation"], bos_id=None, eos_id=1)
    rows = pack_documents(docs, args.context, pad_id=2)
    table = pa.Table.from_pylist([{k: getattr(r, k) for k in ("input_ids", "loss_mask", "doc_ids", "position_ids")}
                                  for r in rows])
    (folder / "data" / "train").mkdir(parents=True)
    pq.write_table(table, folder / "data" / "train" / "part-00000-image-0000.parquet")
    keys = [p + 1 for r in rows for p, d in zip(r.position_ids, r.doc_ids) if d >= 0]
    return str(folder / "llm"), vocab.to_dict(), sum(keys) / len(keys)


def build(llm: str, vocabulary: dict) -> MultimodalLM:
    model = MultimodalLM(MultimodalLMConfig(base_llm=llm, vocabulary=vocabulary, text_special_ids=[0, 1, 2, 3]))
    model.set_trainable(["special", "image"])
    return model


def flops_per_position(model: MultimodalLM, keys: float) -> float:
    """Training FLOPs per sequence position: forward 2N + attention over `keys` keys (its document's tokens up
    to it), backward the same for activation gradients (the LLM is frozen) plus 2 per trainable matmul weight;
    N counts matmul weights, not lookups."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    matmul = [p for p in model.parameters() if id(p) not in embeddings and p.ndim == 2]
    n = sum(p.numel() for p in matmul)
    trainable = sum(p.numel() for p in matmul if p.requires_grad)
    config = model.llm.config
    attention = 4 * config.num_hidden_layers * keys * config.hidden_size    # QK^T and AV
    return 2 * (2 * n + attention) + 2 * trainable


def matmul_peak(use_gpu: bool, repeats: int = 10) -> float:
    """FLOP/s of a square matmul: one CPU thread (per worker) at 1024, or the GPU in bf16 at 8192 (a smaller one
    would time the launch, not the GPU)."""
    device = "cuda" if use_gpu else "cpu"
    size = 8192 if use_gpu else 1024
    dtype = torch.bfloat16 if use_gpu else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b    # warm-up: the library picks its kernel
    best = float("inf")
    for _ in range(repeats):
        if use_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if use_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(threads)
    return 2 * size ** 3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--settings", default=",".join(f"{w}x{z}" for w, z in SETTINGS),
                        help="workers x ZeRO stage, comma-separated")
    parser.add_argument("--out", default="runs/bench/train")
    args = parser.parse_args()
    settings = [tuple(int(n) for n in setting.split("x")) for setting in args.settings.split(",")]
    folder = Path(args.out).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    llm, vocabulary, keys = make_inputs(folder, args)
    model = build(llm, vocabulary)
    per_position = flops_per_position(model, keys)
    peak = matmul_peak(args.use_gpu)
    result = {"context": args.context, "hidden": args.hidden, "layers": args.layers,
              "keys_per_position": round(keys, 1),
              "parameters": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "micro_batch_per_worker": args.micro_batch, "matmul_peak_gflops_per_worker": round(peak / 1e9, 2)}
    del model
    workers_max = max(w for w, _ in settings)
    ray.init(address="local", num_cpus=workers_max + 2, num_gpus=torch.cuda.device_count() if args.use_gpu else None,
             include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = DataConfig(kind="sequences", path=str(folder / "data"), val_split=None)
    try:
        for workers, zero in settings:
            if args.use_gpu and workers > torch.cuda.device_count():
                continue
            loop = LoopConfig(name=f"w{workers}-zero{zero}", storage_path=str(folder / "ray"), steps=args.steps,
                              micro_batch_size=args.micro_batch, log_every=args.steps // 2,
                              checkpoint_every=args.steps, num_workers=workers, use_gpu=args.use_gpu,
                              max_failures=0, deepspeed=DeepSpeedOptions(zero_stage=zero),
                              optim=OptimOptions(warmup_steps=2))
            try:
                run = fit(Job(build=partial(build, llm, vocabulary), loop=loop, data=data,
                              datasets={"train": sequence_dataset(data, "train")}))
            except Exception as error:     # recorded, and the other settings still measured
                result[f"w{workers}_zero{zero}"] = {"error": f"{type(error).__name__}: {error}"[:400]}
                continue
            last = run.history[-1]
            achieved = last["samples_per_s"] * args.context * per_position
            result[f"w{workers}_zero{zero}"] = {
                "samples_per_s": round(last["samples_per_s"], 2), "tokens_per_s": round(last["tokens_per_s"], 1),
                "positions_per_s": round(last["samples_per_s"] * args.context, 1),
                "peak_memory_mb_per_worker": round(last["peak_memory_mb"], 1),
                "model_gflops": round(achieved / 1e9, 3), "fraction_of_matmul_peak": round(achieved / (peak * workers), 3)}
    finally:
        ray.shutdown()
    one, two = result.get("w1_zero0", {}), result.get("w2_zero0", {})
    result["two_vs_one_worker_zero0"] = round(two["samples_per_s"] / one["samples_per_s"], 2) \
        if "samples_per_s" in one and "samples_per_s" in two else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()

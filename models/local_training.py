"""Single-process training of any model with a training_step: the laptop path, the benchmarks and the tests.

The cluster path (Ray Train + DeepSpeed) calls the same training_step.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from models.tokenizer import MediaTokenizer

logger = logging.getLogger(__name__)


def sample_batches(data: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random batches (with replacement across batches, none within one) from a tensor of examples."""
    if len(data) == 0:
        raise ValueError("cannot sample batches from an empty tensor")
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(data))
    while True:
        yield data[torch.randperm(len(data), generator=generator)[:size]]


def train_locally(model: MediaTokenizer, batches: Iterator[torch.Tensor], steps: int, lr: float = 1e-3,
                  grad_clip: float = 1.0, log_every: int = 0) -> list[dict[str, float]]:
    """Adam on the trainable parameters for `steps` steps; returns every step's metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    history = []
    for step in range(steps):
        out = model.training_step(next(batches))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        history.append(out.metrics)
        if log_every and (step % log_every == 0 or step == steps - 1):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in out.metrics.items())
            logger.info("%s step %d/%d: %s", model.kind, step + 1, steps, shown)
    model.eval()
    return history

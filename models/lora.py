"""LoRA: low-rank trainable updates beside frozen linear layers (W x + B A x * alpha / rank), one or more adapters.

With several adapters, every token is routed to at most one of them: `LoraRoute.tokens` holds, for the forward
pass under way, a (B, T) tensor of adapter indices (-1: none, the frozen layer alone). The TEAL model routes each
token to the adapter of the modality whose block it follows (X-LLM's per-modality interfaces), so training one
modality's adapter cannot change what the model does with another's.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class LoraRoute:
    """Which adapter each token of the current forward pass goes through; shared by every LoRALinear of a model.
    None: every token goes through the first adapter (the single-adapter case)."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    @contextmanager
    def using(self, tokens: torch.Tensor | None) -> Iterator[None]:
        previous, self.tokens = self.tokens, tokens
        try:
            yield
        finally:
            self.tokens = previous


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear; only the adapters' `lora_a_<adapter>` and `lora_b_<adapter>` train. B starts at
    zero: the wrap changes nothing until trained. (Parameters of the module itself, not of a ParameterDict: ZeRO-3
    gathers a module's own parameters when it runs.)"""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, adapters: list[str], route: LoraRoute):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not adapters:
            raise ValueError("LoRA needs at least one adapter")
        self.base = base
        self.scale = alpha / rank
        self.route = route
        self.adapters = list(adapters)
        for name in self.adapters:
            a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.register_parameter(f"lora_a_{name}", a)
            self.register_parameter(f"lora_b_{name}",
                                    nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype)))

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter `name`'s B A x, scaled."""
        return x @ getattr(self, f"lora_a_{name}").t() @ getattr(self, f"lora_b_{name}").t() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        tokens = self.route.tokens
        if tokens is None:
            return out + self.update(self.adapters[0], x)
        flat, which = x.reshape(-1, x.shape[-1]), tokens.reshape(-1).to(x.device)
        if len(which) != len(flat):
            raise ValueError(f"the LoRA route names {len(which)} tokens but this layer got {len(flat)}: code that "
                             "runs a layer on some of the tokens must route those (LoraRoute.using)")
        delta = out.new_zeros(flat.shape[0], out.shape[-1])
        for i, name in enumerate(self.adapters):
            # every adapter joins the graph, with no rows too: data-parallel ranks whose batches hold different
            # modalities must reduce the same gradients (zeros for an adapter a rank did not use)
            rows = (which == i).nonzero()[:, 0]
            delta = delta.index_add(0, rows, self.update(name, flat[rows]))
        return out + delta.view(out.shape)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, adapters: list[str],
               route: LoraRoute) -> list[str]:
    """Replace every nn.Linear whose name ends with one of `targets`; returns the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                setattr(module, child_name, LoRALinear(child, rank, alpha, adapters, route))
                replaced.append(full)
    if not replaced:
        raise ValueError(f"no linear layer matches the LoRA targets {targets}")
    return replaced

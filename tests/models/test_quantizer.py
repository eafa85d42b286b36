import os

import pytest
import torch
import torch.nn.functional as F

from models.quantizer import QuantizerConfig, VectorQuantizer


def test_lookup_is_by_cosine_so_scale_does_not_matter():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=4, code_dim=2)).eval()
    vq.codebook.copy_(torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]]))
    z = torch.tensor([[10.0, 1.0], [0.01, 0.2], [-3.0, -0.5], [0.1, -7.0]])
    assert vq(z).codes.tolist() == [0, 1, 2, 3]
    assert vq(z * 100).codes.tolist() == [0, 1, 2, 3]


def test_straight_through_gradient_reaches_the_input():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4))
    z = torch.randn(5, 4, requires_grad=True)
    out = vq(z)
    (out.vectors.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_ema_codebook_moves_to_the_data_clusters(seeded):
    centers = F.normalize(torch.randn(4, 8), dim=-1)
    vq = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=8, decay=0.9))
    vq.train()
    for _ in range(60):
        data = centers[torch.randint(0, 4, (256,))] + 0.02 * torch.randn(256, 8)
        with torch.enable_grad():
            vq(data)
    best = (centers @ vq.codebook.t()).max(dim=1).values
    assert best.min() > 0.99, best


def test_dead_codes_are_restarted_from_the_data(seeded):
    vq = VectorQuantizer(QuantizerConfig(codebook_size=32, code_dim=8, dead_code_threshold=0.5))
    vq.train()
    direction = F.normalize(torch.randn(1, 8), dim=-1)
    data = direction + 0.05 * torch.randn(64, 8)
    with torch.enable_grad():
        vq(data)
    # every code was unused at the start, so every code now sits near the data
    assert (vq.codebook @ direction.t()).min() > 0.9


def test_eval_mode_leaves_the_codebook_alone():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4)).eval()
    before = vq.codebook.clone()
    vq(torch.randn(100, 4))
    assert torch.equal(before, vq.codebook)


def test_out_of_range_lookup_is_refused():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.lookup(torch.tensor([0, 8]))


def _two_rank_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)   # same initial codebook on both ranks, as data-parallel replicas have
    vq = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4, decay=0.8)).train()
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(5):
        with torch.enable_grad():
            vq(torch.randn(32, 4) + rank)
    results[rank] = vq.codebook.clone()
    dist.destroy_process_group()


def test_data_parallel_replicas_keep_one_codebook():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_two_rank_worker, args=(port, results), nprocs=2, join=True)
    assert torch.equal(results[0], results[1])


def test_statistics_stay_float32_when_the_model_is_cast_to_bf16():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4)).to(torch.bfloat16)
    assert vq.codebook.dtype == vq.cluster_size.dtype == vq.code_sum.dtype == torch.float32
    out = vq.train()(torch.randn(16, 4, dtype=torch.bfloat16))
    assert out.vectors.dtype == torch.bfloat16

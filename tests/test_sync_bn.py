"""Batch-norm statistics synchronised over 2 real gloo ranks equal those of the whole batch on one
process: the values, the log-determinant and the gradients."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nvp_dist.flows import RealNVP, bits_per_dim, set_stats_reducer
from nvp_dist.train.distributed import all_reduce_sum, average_buffers
from tests.flow_helpers import small_cfg
from tests.launch_helpers import free_port


def _model():
    torch.manual_seed(0)
    model = RealNVP(small_cfg(1, 8, 2, res_blocks=1, mid_channels=4)).double()
    with torch.no_grad():  # move off the identity so that every batch norm matters
        for name, p in model.named_parameters():
            if name.endswith(".g") or name.endswith(".scale"):
                p.add_(0.3)
    return model.train()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 1, 8, 8), generator=g, dtype=torch.uint8), torch.rand(8, 1, 8, 8, generator=g, dtype=torch.float64)


def _loss_and_grads(model, x, u, scale):
    loss = bits_per_dim(model, x, noise=u).sum() * scale
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model()
    set_stats_reducer(model, all_reduce_sum)
    x, u = _data()
    half = slice(rank * 4, rank * 4 + 4)
    loss, grads = _loss_and_grads(model, x[half], u[half], 1.0)
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "running": model.state_dict()}, out)
    dist.destroy_process_group()


def test_two_rank_statistics_equal_whole_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    dist_result = torch.load(out)
    model = _model()
    x, u = _data()
    loss, grads = _loss_and_grads(model, x, u, 1.0)
    assert torch.allclose(dist_result["loss"], loss, rtol=1e-10)
    for name, g in grads.items():
        assert torch.allclose(dist_result["grads"][name], g, rtol=1e-7, atol=1e-10), name
    for name, b in model.state_dict().items():
        if "running" in name:
            assert torch.allclose(dist_result["running"][name], b, rtol=1e-7, atol=1e-10), name


def _average_rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model()  # no reducer: each rank's running averages follow its own half of the batch
    x, u = _data()
    bits_per_dim(model, x[rank * 4:rank * 4 + 4], noise=u[rank * 4:rank * 4 + 4])
    torch.save(model.state_dict(), f"{out}.before{rank}")
    average_buffers(model)
    torch.save(model.state_dict(), f"{out}.after{rank}")
    dist.destroy_process_group()


def test_unsynchronised_running_averages_are_averaged_over_ranks(tmp_path):
    out = tmp_path / "state"
    mp.spawn(_average_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    before = [torch.load(f"{out}.before{r}") for r in range(2)]
    after = [torch.load(f"{out}.after{r}") for r in range(2)]
    running = [n for n in before[0] if "running" in n]
    assert running and any(not torch.equal(before[0][n], before[1][n]) for n in running)
    for name in before[0]:
        if before[0][name].is_floating_point():
            expected = (before[0][name] + before[1][name]) / 2
            assert torch.allclose(after[0][name], expected, rtol=1e-12) and torch.equal(after[0][name], after[1][name]), name
        else:  # counters stay as they were
            assert torch.equal(after[0][name], before[0][name]), name

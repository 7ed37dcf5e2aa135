"""The speed options (nvp_dist/train/speed.py) leave the flow's numbers alone: log-det, latents and the
inverse of a compiled or channels-last model match the eager NCHW model's. Their speed is measured in
benchmarks/bench_speed.py, not here."""
import copy

import pytest
import torch

from nvp_dist.config import load_config
from nvp_dist.flows import RealNVP
from nvp_dist.flows.resnet import STNetwork
from nvp_dist.train.speed import apply_speed_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(**options):
    torch.manual_seed(0)
    # One scale of the debug model's shape: the smallest model with both coupling kinds.
    cfg = load_config("configs/debug.yaml", ["model.num_scales=1", "model.mid_channels=4"])
    eager = RealNVP(cfg.model)
    with torch.no_grad():  # off the initial identity (zero-initialised s/t outputs): a log-det to compare
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = copy.deepcopy(eager)
    assert apply_speed_options(fast, **options) == sum(isinstance(m, STNetwork) for m in fast.modules()) > 0
    return eager, fast, torch.randn(8, 1, 8, 8)


def _check_same_flow(eager, fast, x, tol):
    for mode in ("train", "eval"):
        getattr(eager, mode)(), getattr(fast, mode)()
        zs_e, ld_e = eager(x)
        zs_f, ld_f = fast(x)
        assert ld_e.abs().max() > 0.1
        assert torch.allclose(ld_f, ld_e, rtol=0, atol=tol * (1 + ld_e.abs().max().item())), (mode, (ld_f - ld_e).abs().max())
        for a, b in zip(zs_f, zs_e):
            assert torch.allclose(a, b, rtol=0, atol=tol), mode
    with torch.no_grad():
        zs, _ = fast(x)
        assert torch.allclose(fast.inverse(zs), x, rtol=0, atol=1e-4)
        assert torch.allclose(fast.inverse(zs), eager.inverse(zs), rtol=0, atol=tol)
    # the running batch-norm statistics moved alike
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=tol), name


def test_channels_last_keeps_the_flow_and_lays_out_nhwc():
    eager, fast, x = _pair(channels_last=True)
    seen = []
    net = next(m for m in fast.modules() if isinstance(m, STNetwork))
    nhwc = torch.channels_last
    # the networks' convolutions take and give NHWC; the parameters stay contiguous (DeepSpeed's broadcast)
    net.in_conv.register_forward_hook(lambda m, a, out: seen.append(a[0].is_contiguous(memory_format=nhwc)
                                                                    and out.is_contiguous(memory_format=nhwc)))
    assert all(p.is_contiguous() for p in fast.parameters())
    _check_same_flow(eager, fast, x, 1e-5)
    assert seen and all(seen)
    assert list(fast.state_dict()) == list(eager.state_dict())


def test_compile_keeps_log_det_and_inverse():
    eager, fast, x = _pair(compile=True)
    assert list(fast.state_dict()) == list(eager.state_dict())  # checkpoints move between the modes
    _check_same_flow(eager, fast, x, 1e-5)
    # gradients agree too
    eager.train(), fast.train()
    grads = []
    for model in (eager, fast):
        model.zero_grad()
        model(x)[1].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_compile_raises_dynamo_recompile_limits_under_either_name():
    """Every s/t network shares one forward: Dynamo's per-code-object limit must cover them all, whether
    this torch calls it recompile_limit (2.7+) or cache_size_limit (2.6)."""
    import torch._dynamo.config as dynamo_cfg

    limit = lambda new, old: getattr(dynamo_cfg, new if hasattr(dynamo_cfg, new) else old)
    _, fast, _ = _pair(compile=True)  # compiles lazily: nothing is traced here
    n = sum(isinstance(m, STNetwork) for m in fast.modules())
    assert limit("recompile_limit", "cache_size_limit") >= 8 * n
    assert limit("accumulated_recompile_limit", "accumulated_cache_size_limit") >= 16 * n


def test_compile_refuses_zero3_and_res_block_checkpointing():
    from nvp_dist.config import ConfigError

    for bad, message in (("train.zero_stage=3", "ZeRO-3"), ("train.activation_checkpointing=res_block", "res_block")):
        with pytest.raises(ConfigError, match=message):
            load_config("configs/debug.yaml", ["train.compile=true", bad])

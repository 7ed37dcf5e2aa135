"""Shared helpers for the model tests: small configs and parameters moved off their identity init."""
import torch

from nvp_dist.flows import ModelConfig, RealNVP


def small_cfg(c=3, size=8, scales=2, **kw) -> ModelConfig:
    base = dict(in_channels=c, image_size=size, num_scales=scales, res_blocks=1, mid_channels=4)
    base.update(kw)
    return ModelConfig(**base)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and batch-norm running statistic a random non-trivial value, so the maps
    under test are far from the identity a fresh model starts as."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
    return module


def random_model(cfg: ModelConfig, dtype=torch.float64, seed=0) -> RealNVP:
    torch.manual_seed(seed)
    return randomize_(RealNVP(cfg).to(dtype), seed)


def per_example_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the per-example Jacobian of fn (a batch map whose examples are independent),
    from autograd's full Jacobian: the diagonal blocks of d fn(x) / d x."""
    b, d = x.shape[0], x[0].numel()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).reshape(b, d), x.reshape(b, d))
    return torch.stack([torch.linalg.slogdet(jac[i, :, i, :])[1] for i in range(b)])

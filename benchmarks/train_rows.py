"""One measurement of bench_train.py, in a fresh process so that its peak memory is its own:

    python benchmarks/train_rows.py '<job as JSON>'     -> one JSON line on stdout

Run by the project's .venv for nvp-dist and by benchmarks/.venv-peers for normflows and FrEIA. Besides
torch, psutil and the peer being measured it imports only nvp_dist.flows.preprocess (torch-only, found
through the repository path in the peers' venv), so every implementation trains on the same synthetic
images, dequantised and logit-transformed the package's way, and is scored by the same bits/dim.

Jobs: kind "train" (one model trained for warmup + steps Adam steps), "conv" (the ceiling: a 3x3
convolution at the model's width, forward + backward) and "matmul" (the ceiling of a large square matmul).
"""
from __future__ import annotations

import functools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nvp_dist.flows.preprocess import dequantize, to_logit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_images(n: int, channels: int, side: int, seed: int) -> torch.Tensor:
    """uint8 [n, C, side, side]: random 4x4 colour fields upsampled plus mild noise (as bench_data.py's):
    structure a model can learn, where pure noise sits at 8 bits/dim whatever the model does."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, channels, 4, 4), generator=g)
    fine = coarse.repeat_interleave(side // 4, 2).repeat_interleave(side // 4, 3)
    return (fine + torch.randint(-12, 13, fine.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def bits_from_log_prob(log_p_y: torch.Tensor, logdet_pre: torch.Tensor, d: int) -> torch.Tensor:
    """The package's bits/dim (nvp_dist.flows.preprocess.bits_from_latents) from a peer's log p(y)."""
    return (-(log_p_y + logdet_pre) + d * math.log(256)) / (d * math.log(2))


def log_normal(zs) -> torch.Tensor:
    return sum((-0.5 * z.float() ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) for z in zs)


# --- nvp-dist -------------------------------------------------------------------------------------------

class MasterAdam:
    """DeepSpeed's bf16 training in miniature (what the trainer gets from train.precision=bf16): Adam
    updates float32 master weights from float32 copies of the bf16 gradients, clipped as DeepSpeed clips,
    and the bf16 module weights are the masters rounded."""

    def __init__(self, groups, clip: float, **adam):
        self.pairs = [(p, p.detach().float().requires_grad_()) for g in groups for p in g["params"]]
        master = {id(p): m for p, m in self.pairs}
        self.opt = torch.optim.Adam([{**g, "params": [master[id(p)] for p in g["params"]]} for g in groups], **adam)
        self.clip = clip

    def zero_grad(self):
        for p, _ in self.pairs:
            p.grad = None

    def step(self):
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
        if self.clip:  # 0 turns clipping off, as train.grad_clip does
            torch.nn.utils.clip_grad_norm_([m for _, m in self.pairs], self.clip)
        self.opt.step()
        with torch.no_grad():
            for p, m in self.pairs:
                p.copy_(m)


class ClippedAdam(torch.optim.Adam):
    """torch's Adam after global-norm clipping at 100 (the paper's and the trainer's), for every row alike."""

    def __init__(self, groups, clip: float = 100.0, **adam):
        super().__init__(groups, **adam)
        self.clip = clip

    def step(self, closure=None):
        if self.clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.clip)
        return super().step(closure)


def build_nvp(job, device):
    """RealNVP from the config and overrides, the trainer's memory mode ("<train.memory>[+<train.activation_
    checkpointing>]") applied before the bf16 cast (the trainer's order: apply_memory_policy, then
    DeepSpeed's cast, then keep_flow_state_float32); returns
    (model, optimiser, loss(x, generator) -> mean bits/dim)."""
    from nvp_dist.config import load_config
    from nvp_dist.flows import RealNVP, bits_per_dim
    from nvp_dist.train.engine import keep_flow_state_float32, param_groups
    from nvp_dist.train.memory import apply_memory_policy

    cfg = load_config(job["config"], job["overrides"])
    t = cfg.train
    model = RealNVP(cfg.model)
    memory, _, checkpointing = job["memory"].partition("+")  # e.g. "invertible+res_block"
    apply_memory_policy(model, memory, checkpointing or "none")
    model.to(device)
    groups = param_groups(model, t.l2)
    adam = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    if job.get("fused"):  # the trainer's fused Adam (device_check.py on CUDA)
        adam["fused"] = True
    if job["dtype"] == "bf16":
        model.to(torch.bfloat16)
        keep_flow_state_float32(model)
        opt = MasterAdam(groups, t.grad_clip, **adam)
    else:
        opt = ClippedAdam(groups, t.grad_clip, **adam)
    return model, opt, lambda x, g: bits_per_dim(model, x, generator=g).mean()


# --- peers ----------------------------------------------------------------------------------------------

def st_resnet(c_in: int, c_out: int, mid: int, blocks: int) -> nn.Module:
    """The paper's s/t ResNet in plain torch (no weight norm, no skip sums) for FrEIA, which takes the
    subnet from the user: BN, 3x3 conv, residual blocks (BN-ReLU-3x3-BN-ReLU-3x3), BN-ReLU-1x1. The last
    layer starts at zero so each block starts as the identity (FrEIA's advice; the paper's too)."""
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1),
                                   nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1))

        def forward(self, x):
            return x + self.f(x)

    out = nn.Conv2d(mid, c_out, 1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.BatchNorm2d(c_in), nn.Conv2d(c_in, mid, 3, padding=1),
                         *[Res() for _ in range(blocks)], nn.BatchNorm2d(mid), nn.ReLU(), out)


def build_normflows(a: dict):
    """normflows.MultiscaleFlow as in its Glow/Real NVP multiscale examples, to the paper's layout: per scale
    3 checkerboard AffineCouplingBlocks (alternating colouring), Squeeze, 3 channel-wise ones (alternating
    halves), Merge factoring out half; 4 checkerboard ones at the last scale. Each coupling is followed by
    ActNorm (normflows' normalisation flow where the paper has batch norm) and its s/t net is normflows'
    ConvResidualNet (batch norm on) with the scale's width and blocks, last layer zeroed as normflows'
    GlowBlock(init_zeros=True) does. normflows' lists run latent -> image, so each scale is reversed."""
    import normflows as nf

    c, s, L, blocks = a["in_channels"], a["image_size"], a["num_scales"], a["res_blocks"]

    def coupling(mode, c_cond, c_change, mid, actnorm_channels):
        net = nf.nets.ConvResidualNet(c_cond, 2 * c_change, mid, num_blocks=blocks, use_batch_norm=True)
        nn.init.zeros_(net.final_layer.weight)
        nn.init.zeros_(net.final_layer.bias)
        return [nf.flows.AffineCouplingBlock(net, split_mode=mode), nf.flows.ActNorm((actnorm_channels, 1, 1))]

    q0, flows = [], []
    for i in reversed(range(L)):  # coarsest first
        ci, si, mid = c * 2 ** i, s // 2 ** i, a["mid_channels"] * 2 ** i
        data_order = []  # image -> latent
        for k in range(4 if i == L - 1 else 3):  # a checkerboard half of the pixels conditions the other
            data_order += coupling("checkerboard" + "_inv" * (k % 2), ci, ci, mid, ci)
        if i < L - 1:
            data_order.append(nf.flows.Squeeze())  # its inverse is the image -> latent squeeze
            for k in range(3):
                data_order += coupling("channel" + "_inv" * (k % 2), 2 * ci, 2 * ci, 2 * mid, 4 * ci)
        flows.append(list(reversed(data_order)))
        latent = (ci, si, si) if i == L - 1 else (2 * ci, si // 2, si // 2)
        q0.append(nf.distributions.DiagGaussian(latent, trainable=False))
    # A Merge between levels: in the image -> latent direction it splits off half the channels.
    model = nf.MultiscaleFlow(q0, flows, [nf.flows.Merge() for _ in range(L - 1)], class_cond=False)
    return model, lambda y: model.log_prob(y, None)


def build_freia(a: dict, block: str):
    """FrEIA GraphINN. FrEIA's couplings split channels; for a checkerboard split its docs prepend
    IRevNetDownsampling, so each scale is: IRevNetDownsampling, 3 couplings at the scale's width (the
    checkerboard ones), 3 at twice the width (the channel-wise ones), Split factoring out half; the last
    scale 4 couplings after its downsampling. `block` "aio": one AllInOneBlock per paper coupling (affine
    coupling with one s/t subnet, soft-clamped, plus a fixed channel permutation and a global affine);
    "rnvp": RNVPCouplingBlock, two-sided with separate s and t subnets (4 per block), ceil(n/2) blocks where
    the paper has n couplings. Subnets: st_resnet at the scale's width and blocks."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    c, L, blocks = a["in_channels"], a["num_scales"], a["res_blocks"]
    h = Ff.InputNode(c, a["image_size"], a["image_size"])
    nodes, outs = [h], []

    def add(inputs, module, **kw):
        nodes.append(Ff.Node(inputs, module, kw))
        return nodes[-1]

    for i in range(L):
        mid = a["mid_channels"] * 2 ** i
        h = add(h, Fm.IRevNetDownsampling)
        widths = [mid] * 4 if i == L - 1 else [mid] * 3 + [2 * mid] * 3
        if block == "rnvp":  # a two-sided block is two couplings: 3 + 3 -> 2 + 2, 4 -> 2
            widths = [mid] * 2 if i == L - 1 else [mid] * 2 + [2 * mid] * 2
        for w in widths:
            sub = functools.partial(lambda ci, co, w: st_resnet(ci, co, w, blocks), w=w)
            if block == "rnvp":
                h = add(h, Fm.RNVPCouplingBlock, subnet_constructor=sub)  # FrEIA's default clamping
            else:
                h = add(h, Fm.AllInOneBlock, subnet_constructor=sub)
        if i < L - 1:
            split = add(h, Fm.Split, section_sizes=[2 * c * 2 ** i] * 2, dim=0)
            outs.append(Ff.OutputNode((split, 1)))
            h = (split, 0)
    outs.append(Ff.OutputNode(h))
    model = Ff.GraphINN(nodes + outs)

    def log_prob(y):
        zs, logdet = model(y)
        return log_normal(zs) + logdet

    return model, log_prob


def build_peer(job, device):
    a = job["arch"]
    if job["impl"] == "normflows":
        model, log_prob = build_normflows(a)
    else:
        model, log_prob = build_freia(a, "rnvp" if job["impl"] == "freia-rnvp" else "aio")
    model.to(device)
    # The config's learning rate (the parent passes it: omegaconf is not in the peers' venv); no L2.
    opt = ClippedAdam([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=job["lr"])
    d = a["in_channels"] * a["image_size"] ** 2

    def loss(x, g):
        y, logdet_pre = to_logit(dequantize(x, generator=g), 0.05)
        return bits_from_log_prob(log_prob(y), logdet_pre, d).mean()

    return model, opt, loss


# --- measurements ---------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_now(device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return psutil.Process().memory_info().rss / 2 ** 20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_peak(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux


def train(job) -> dict:
    device = torch.device(job["device"])
    torch.manual_seed(0)
    a = job["arch"]
    build = build_nvp if job["impl"] == "nvp-dist" else build_peer
    model, opt, loss = build(job, device)
    batch = job["batch"]
    pool = synthetic_images(4 * batch, a["in_channels"], a["image_size"], seed=1).to(device)  # 4 batches cycled
    g = torch.Generator(device).manual_seed(2)  # the same dequantisation noise for every implementation
    model.train()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = memory_now(device)
    started = cpu = None
    for step in range(job["warmup"] + job["steps"]):
        if step == job["warmup"]:
            sync(device)
            started, cpu = time.perf_counter(), cpu_seconds()
        x = pool[(step % 4) * batch:(step % 4 + 1) * batch]
        opt.zero_grad()
        value = loss(x, g)
        value.backward()
        opt.step()
        value.item()  # the step's synchronisation point
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    peak = memory_peak(device)
    # After every update: bits/dim of the first batch again (its own statistics, as in training), and the
    # model's forward FLOPs counted on that pass (convolutions and matmuls; elementwise work is not counted).
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bits = loss(pool[:batch], torch.Generator(device).manual_seed(3)).item()
    return {
        "images_per_s": job["steps"] * batch / seconds, "step_s": seconds / job["steps"],
        "images_per_cpu_s": job["steps"] * batch / cpu,
        # The share of its threads' cores the row got: well under 1 when other work took the cores.
        "cpu_share": cpu / (seconds * torch.get_num_threads()),
        "peak_mib": peak, "train_mib": peak - before, "bits_per_dim": bits,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "fwd_flops_per_image": counter.get_total_flops() / batch,
    }


def timed(fn, device, min_seconds: float = 2.0, min_reps: int = 2) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per call of fn after one warm-up call, over at least min_reps calls and
    min_seconds."""
    fn()
    sync(device)
    reps, start, cpu = 0, time.perf_counter(), cpu_seconds()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    sync(device)
    return (time.perf_counter() - start) / reps, (cpu_seconds() - cpu) / reps


def rates(flops: float, seconds: tuple[float, float]) -> dict:
    return {"flops_per_s": flops / seconds[0], "flops_per_cpu_s": flops / seconds[1]}


def conv_ceiling(job) -> dict:
    """FLOP/s of a bias-free 3x3 convolution width -> width at side x side, forward and backward (input and
    weight gradients): the s/t networks' dominant operation at the model's first-scale width and size
    (later scales keep width x pixels constant in Real NVP, so the same FLOPs per convolution)."""
    device, dtype, w, s, b = torch.device(job["device"]), DTYPES[job["dtype"]], job["width"], job["side"], job["batch"]
    x = torch.randn(b, w, s, s, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(w, w, 3, 3, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(b, w, s, s, device=device, dtype=dtype)

    def fwd_bwd():
        F.conv2d(x, weight, padding=1).backward(grad)

    return rates(3 * 2 * b * s * s * w * w * 9, timed(fwd_bwd, device))


def matmul_ceiling(job) -> dict:
    device, dtype, n = torch.device(job["device"]), DTYPES[job["dtype"]], job["n"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return rates(2 * n ** 3, timed(lambda: a @ b, device))


def check_preload() -> None:
    """ld.so skips an LD_PRELOAD it cannot load with a warning and runs on the C library's malloc: a row
    measured that way would be labelled with the wrong allocator, so it stops instead."""
    maps = Path("/proc/self/maps")
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if maps.is_file() and os.path.realpath(lib) not in maps.read_text():
            sys.exit(f"LD_PRELOAD={lib} was not loaded into this process (ld.so ignored it)")


if __name__ == "__main__":
    check_preload()
    job = json.loads(sys.argv[1])
    print(json.dumps({"train": train, "conv": conv_ceiling, "matmul": matmul_ceiling}[job["kind"]](job)))

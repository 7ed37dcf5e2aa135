"""memory=invertible against standard autograd on the debug config: gradients in float32 and float64,
running averages updated once per step, activations saved for backward, the error report, configuration,
and 2-rank DeepSpeed training."""
import copy

import pytest
import torch
from torch import nn

from nvp_dist.config import ConfigError, load_config
from nvp_dist.flows import RealNVP, log_standard_normal
from nvp_dist.flows.batchnorm import FlowBatchNorm, set_stats_reducer
from nvp_dist.flows.invertible import invertible_error_report
from nvp_dist.train.memory import apply_activation_checkpointing, apply_memory_mode, apply_memory_policy
from tests.flow_helpers import randomize_
from tests.launch_helpers import DEBUG, train_and_check_agreement


pytestmark = pytest.mark.usefixtures("one_thread")


def debug_model(dtype=torch.float32, seed=0, **model_overrides) -> RealNVP:
    """The debug config's model, parameters moved off the identity, in training mode (batch statistics)."""
    cfg = load_config(DEBUG, [f"model.{k}={v}" for k, v in model_overrides.items()]).model
    torch.manual_seed(seed)
    return randomize_(RealNVP(cfg), seed).to(dtype).train()


def batch(model: RealNVP, n=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = 2 * torch.randn(n, 1, 8, 8, generator=g).to(dtype)
    cond = torch.randn(n, model.cfg.cond_dim, generator=g).to(dtype) if model.cfg.cond_dim else None
    return y, cond


def apply_mode(model: RealNVP, mode: str) -> None:
    """mode: "<train.memory>[+<train.activation_checkpointing>]", applied as the trainer applies them."""
    memory, _, checkpointing = mode.partition("+")
    apply_memory_policy(model, memory, checkpointing or "none")


def step(model: RealNVP, mode: str, y, cond=None):
    """One forward/backward on a copy in `mode` ("<memory>[+<activation_checkpointing>]"): (loss,
    {parameter name or '<cond>': gradient}, the copy)."""
    model = copy.deepcopy(model)
    apply_mode(model, mode)
    cond = None if cond is None else cond.detach().clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks in every mode
    zs, logdet = model(y, cond)
    loss = -(log_standard_normal(zs) + logdet).mean()
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    if cond is not None:
        grads["<cond>"] = cond.grad.double()
    return loss.item(), grads, model


def norm(grads) -> torch.Tensor:
    return torch.sqrt(sum((g ** 2).sum() for g in grads.values()))


def difference(a, b) -> torch.Tensor:
    return torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in b))


@pytest.mark.parametrize("cond_dim,mode", [(0, "invertible"), (10, "invertible"), (10, "invertible+res_block")])
def test_float32_gradients_equal_standard(cond_dim, mode):
    model = debug_model(cond_dim=cond_dim, res_blocks=2)
    y, cond = batch(model)
    loss_s, std, _ = step(model, "standard", y, cond)
    loss_i, inv, _ = step(model, mode, y, cond)
    _, ref, _ = step(model.double(), "standard", y.double(), None if cond is None else cond.double())
    # The same arithmetic; a no-grad forward may pick other kernels, so the sum can differ in its last bits.
    assert loss_i == pytest.approx(loss_s, rel=1e-6, abs=0)  # measured 0 to 1.1e-7
    assert difference(inv, std) <= 1e-5 * norm(std)  # measured 0.5e-6 to 2e-6
    # Per tensor: equal to 1e-5 relative beyond what float32 resolves at all (standard float32 against
    # standard float64, and rounding at the whole gradient's scale): gradients that cancel over the batch
    # (conv biases feeding a batch norm, t's bias before the flow's batch norm: exactly zero) come out as
    # rounding noise in either mode.
    floor = 1e-6 * norm(ref)  # float32 rounding at the scale of the whole gradient
    for n in ref:
        assert (inv[n] - std[n]).norm() <= 1e-5 * ref[n].norm() + 4 * (std[n] - ref[n]).norm() + floor, n


@pytest.mark.parametrize("cond_dim,dropout,mode", [(0, 0.0, "invertible"), (10, 0.3, "invertible"),
                                                    (10, 0.3, "invertible+res_block"),
                                                    (10, 0.3, "checkpoint+res_block")])
def test_float64_gradients_equal_standard_to_rounding(cond_dim, dropout, mode):
    model = debug_model(torch.float64, cond_dim=cond_dim, dropout=dropout, res_blocks=2)
    y, cond = batch(model, dtype=torch.float64)
    loss_s, std, _ = step(model, "standard", y, cond)
    loss_i, inv, _ = step(model, mode, y, cond)
    assert loss_i == pytest.approx(loss_s, rel=1e-14, abs=0)
    total = norm(std)
    assert difference(inv, std) <= 1e-12 * total  # measured 1e-15 to 5e-15
    for n in std:  # dropout masks replayed: a different mask would differ at order one
        assert (inv[n] - std[n]).norm() <= 1e-10 * std[n].norm() + 1e-13 * total, n


@pytest.mark.parametrize("sync", [False, True], ids=["local-bn", "reducer-bn"])
def test_running_averages_updated_once_per_step_in_every_mode(sync):
    model = debug_model(torch.float64)
    if sync:  # the synchronised-statistics code path, with a one-rank reducer
        set_stats_reducer(model, lambda t: t)
    y, _ = batch(model, dtype=torch.float64)
    before = {n: b.clone() for n, b in model.named_buffers()}
    _, _, std = step(model, "standard", y)
    after = dict(std.named_buffers())
    for name, norm_layer in std.named_modules():
        if isinstance(norm_layer, FlowBatchNorm):  # exactly one momentum update from this batch's statistics
            m, old = norm_layer.momentum, before[f"{name}.running_mean"]
            used = (1 - norm_layer.mask(2, 2)).sum(dim=(0, 2, 3)) > 0  # channels the coupling changes
            expected = torch.where(used, (1 - m) * old + m * norm_layer.last_mean, old)
            assert torch.equal(after[f"{name}.running_mean"], expected)
    if sync:
        assert all(int(b) == 1 for n, b in after.items() if n.endswith("num_batches_tracked"))
    for mode in ("checkpoint", "invertible", "standard+res_block", "invertible+res_block"):
        _, _, other = step(model, mode, y)
        for n, b in other.named_buffers():
            assert torch.equal(b, after[n]), (mode, n)
        for a, b in zip(std.modules(), other.modules()):
            if isinstance(a, FlowBatchNorm):  # what inverse() uses after the step
                assert torch.equal(a.last_mean, b.last_mean) and torch.equal(a.last_var, b.last_var), mode


class SavedActivations:
    """saved_tensors_hooks accounting of the tensors autograd keeps for backward (parameters excluded),
    by storage: how many were saved and their bytes at the end of forward, and the peak bytes alive."""

    def __init__(self):
        self.refs, self.sizes, self.count, self.live, self.peak = {}, {}, 0, 0, 0

    def pack(self, t):
        if isinstance(t, nn.Parameter):
            return t
        key = t.untyped_storage().data_ptr()
        if not self.refs.get(key):
            self.sizes[key] = t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        self.count += 1
        return _Saved(self, key, t)

    @staticmethod
    def unpack(saved):
        return saved if isinstance(saved, torch.Tensor) else saved.tensor

    def release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes[key]


class _Saved:
    def __init__(self, owner, key, tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):
        self.owner.release(self.key)


def saved_activations(res_blocks: int, mode: str):
    model = debug_model(res_blocks=res_blocks)
    apply_mode(model, mode)
    y, _ = batch(model)
    acct = SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(acct.pack, acct.unpack):
        zs, logdet = model(y)
        loss = -(log_standard_normal(zs) + logdet).mean()
        kept = (acct.count, acct.live)  # what stays alive from forward until backward
        loss.backward()  # the hooks also see backward's local recomputation
    assert acct.live == 0
    return kept, acct.peak


def test_invertible_saves_far_less_and_does_not_grow_with_res_blocks():
    (n_std1, kept_std1), peak_std1 = saved_activations(1, "standard")
    (n_std4, kept_std4), peak_std4 = saved_activations(4, "standard")
    (n_inv1, kept_inv1), peak_inv1 = saved_activations(1, "invertible")
    (n_inv4, kept_inv4), peak_inv4 = saved_activations(4, "invertible")
    # measured (batch 32): standard 841 tensors / 3732 KiB -> 1831 / 9634 KiB; invertible 25 / 28 KiB at both
    assert kept_std4 > 2 * kept_std1 and n_std4 > 2 * n_std1
    assert (n_inv1, kept_inv1) == (n_inv4, kept_inv4)
    assert kept_inv1 * 50 < kept_std1
    # The peak in backward is one coupling's local graph on top of that (541 and 1338 KiB), so it grows
    # with res_blocks, but stays a fraction of standard's.
    assert peak_inv1 * 4 < peak_std1 and peak_inv4 * 4 < peak_std4


def test_res_block_checkpoints_shrink_the_invertible_backward_peak():
    """Inside invertible backprop's recomputation, res_block checkpointing keeps one tensor per residual
    block (its input, which the 1x1 skip convolution needs anyway) instead of the block's whole graph."""
    peaks = {(n, m): saved_activations(n, m) for n in (1, 4) for m in ("invertible", "invertible+res_block")}
    assert peaks[1, "invertible"][0] == peaks[4, "invertible+res_block"][0]  # nothing more kept across
    # measured (batch 32): 554 -> 1371 KiB without, 348 -> 547 KiB with; a residual block's input is
    # 32 x 8 x 8 x 8 floats = 64 KiB (plus its batch norms' per-channel statistics), and it is the largest
    # coupling's that makes the peak.
    growth_plain = peaks[4, "invertible"][1] - peaks[1, "invertible"][1]
    growth_rb = peaks[4, "invertible+res_block"][1] - peaks[1, "invertible+res_block"][1]
    block_input = 32 * 8 * 8 * 8 * 4
    assert 3 * block_input <= growth_rb <= 3 * 1.02 * block_input  # measured 3 x 66144 bytes
    assert growth_plain > 4 * growth_rb
    assert peaks[1, "invertible+res_block"][1] < 0.7 * peaks[1, "invertible"][1]


def test_error_report_on_a_random_model():
    model = debug_model(cond_dim=10)
    y, cond = batch(model)
    report = invertible_error_report(model, y, cond)
    assert len(report["reconstruction_per_block"]) == 10  # 3 + 3 couplings, then 4 at the last scale
    assert 0 < report["reconstruction_max_rel"] < 1e-5
    assert report["grad_rel"] < 1e-5 and report["loss_rel"] < 1e-6
    assert all(p.grad is None for p in model.parameters())  # it worked on copies


def test_memory_mode_keeps_state_dict_and_outputs_and_excludes_checkpointing():
    model = debug_model()
    y, _ = batch(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        zs, logdet = model(y)
    inv = copy.deepcopy(model)
    assert apply_memory_mode(inv, "invertible") == 2  # one per Scale
    assert list(inv.state_dict()) == keys
    with torch.no_grad():
        zs_i, logdet_i = inv(y)
    for a, b in zip(zs, zs_i):
        assert torch.equal(a, b)
    assert torch.allclose(logdet, logdet_i, rtol=1e-6, atol=0)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, "scale")
    with pytest.raises(RuntimeError, match="already replaced"):
        apply_memory_mode(checkpointed, "invertible")
    with pytest.raises(ValueError, match="memory must be one of"):
        apply_memory_mode(model, "reversible")


def test_memory_config_is_validated():
    assert load_config(DEBUG).train.memory == "standard"
    assert load_config(DEBUG, ["train.memory=invertible"]).train.memory == "invertible"
    with pytest.raises(ConfigError, match="train.memory must be one of"):
        load_config(DEBUG, ["train.memory=reversible"])
    with pytest.raises(ConfigError, match="train.memory=invertible and train.activation_checkpointing=coupling"):
        load_config(DEBUG, ["train.memory=invertible", "train.activation_checkpointing=coupling"])
    both = load_config(DEBUG, ["train.memory=invertible", "train.activation_checkpointing=res_block"]).train
    assert (both.memory, both.activation_checkpointing) == ("invertible", "res_block")


# Synchronised batch norm at ZeRO-3: the invertible backward's recomputation calls its collectives again.
@pytest.mark.parametrize("stage,precision,checkpointing,sync_bn",
                         [(3, "bf16", "none", True), (1, "fp32", "none", False), (3, "fp32", "res_block", True)])
def test_two_ranks_learn_and_agree_with_invertible_backprop(digits_dir, tmp_path, stage, precision,
                                                            checkpointing, sync_bn):
    out = tmp_path / "run"
    train_and_check_agreement(digits_dir, out, f"train.zero_stage={stage}", f"train.precision={precision}",
                              "train.memory=invertible", f"train.activation_checkpointing={checkpointing}",
                              f"train.sync_bn={str(sync_bn).lower()}")

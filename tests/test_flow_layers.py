"""Every flow layer against independent references: autograd Jacobians, exact patterns, round trips."""
import pytest
import torch

from nvp_dist.flows import (AffineCoupling, CouplingForm, FlowBatchNorm, channel_mask, checkerboard_mask, squeeze,
                            squeeze_ordered, unsqueeze, unsqueeze_ordered)
from nvp_dist.flows.coupling import gather_checkerboard, scatter_checkerboard
from tests.flow_helpers import per_example_logdet, randomize_


def test_checkerboard_mask_pattern():
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    m0 = checkerboard_mask(2, 4, 4, parity=0)
    m1 = checkerboard_mask(2, 4, 4, parity=1)
    assert m0.shape == (1, 2, 4, 4)
    assert torch.equal(m0[0, 0], expected) and torch.equal(m0[0, 1], expected)
    assert torch.equal(m1[0, 0], 1 - expected)


def test_channel_mask_pattern():
    m0 = channel_mask(4, 2, 3, half=0)
    m1 = channel_mask(4, 2, 3, half=1)
    assert m0.shape == (1, 4, 2, 3)
    assert m0[0, :, 0, 0].tolist() == [1, 1, 0, 0]
    assert m1[0, :, 1, 2].tolist() == [0, 0, 1, 1]


def test_squeeze_layout_and_round_trip():
    x = torch.arange(2 * 4 * 4, dtype=torch.float64).view(1, 2, 4, 4)
    s = squeeze(x)
    assert s.shape == (1, 8, 2, 2)
    # channel c*4 + 2i + j holds sub-pixel (i, j) of colour c.
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(s[0, c * 4 + 2 * i + j], x[0, c, i::2, j::2])
    o = squeeze_ordered(x)
    # diagonal sub-pixels of every colour first, then the anti-diagonal ones.
    order = [(0, 0), (1, 1), (0, 1), (1, 0)]
    for k, (i, j) in enumerate(order):
        for c in range(2):
            assert torch.equal(o[0, k * 2 + c], x[0, c, i::2, j::2])
    assert torch.equal(unsqueeze(s), x)
    assert torch.equal(unsqueeze_ordered(o), x)


COUPLINGS = [
    (kind, checker, parity, form, mask_input, cond_dim)
    for kind, checker in (("checkerboard", "masked"), ("checkerboard", "gathered"), ("channel", "masked"))
    for parity in (0, 1)
    for form in CouplingForm
    for mask_input, cond_dim in ((True, 0), (False, 3))
]


@pytest.mark.parametrize("kind,checker,parity,form,mask_input,cond_dim", COUPLINGS)
def test_coupling_jacobian_and_inverse(kind, checker, parity, form, mask_input, cond_dim):
    torch.manual_seed(1)
    layer = AffineCoupling(kind, parity, 4, 6, 1, form, mask_input, cond_dim, checkerboard=checker).double()
    randomize_(layer, seed=parity).eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    cond = torch.randn(2, cond_dim, dtype=torch.float64) if cond_dim else None
    y, logdet = layer(x, cond)
    ref = per_example_logdet(lambda v: layer(v, cond)[0], x)
    assert torch.allclose(logdet, ref, rtol=1e-8, atol=1e-10)
    assert logdet.abs().min() > 1e-2  # a non-trivial map
    assert torch.allclose(layer.inverse(y, cond), x, rtol=0, atol=1e-10)
    # the kept elements pass through exactly
    keep = layer.mask(4, 4).bool().expand_as(x)
    assert torch.equal(y[keep], x[keep])


def test_gathered_checkerboard_packs_each_colour_row_by_row():
    x = torch.arange(4 * 6, dtype=torch.float64).view(1, 1, 4, 6)
    for parity in (0, 1):
        kept, changed = gather_checkerboard(x, parity)
        assert kept.shape == changed.shape == (1, 1, 4, 3)
        keep = checkerboard_mask(1, 4, 6, parity).bool()
        for i in range(4):  # row i of `kept` is row i of x at the mask's kept columns, left to right
            assert kept[0, 0, i].tolist() == x[0, 0, i][keep[0, 0, i]].tolist()
            assert changed[0, 0, i].tolist() == x[0, 0, i][~keep[0, 0, i]].tolist()
        assert torch.equal(scatter_checkerboard(kept, changed, parity), x)
    with pytest.raises(ValueError, match="even width"):
        gather_checkerboard(torch.zeros(1, 1, 4, 5), 0)


def test_coupling_float32_inverse():
    layer = randomize_(AffineCoupling("checkerboard", 0, 3, 8, 2)).eval()
    x = torch.randn(4, 3, 8, 8)
    y, _ = layer(x)
    assert torch.allclose(layer.inverse(y), x, atol=1e-5)


def test_fresh_coupling_is_identity():
    for kind in ("checkerboard", "channel"):
        layer = AffineCoupling(kind, 1, 4, 8, 2)
        x = torch.randn(3, 4, 4, 4)
        y, logdet = layer(x)
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3))


def test_fresh_coupling_learns_its_scale():
    # A fresh coupling is the identity, yet the gradient reaches the scale path: for checkerboard through c
    # (starting at 0), for channel-wise through raw_s's output layer (c starting at 1). Both zero would be a
    # stationary point that leaves s = 0 for good.
    torch.manual_seed(0)
    for kind in ("checkerboard", "channel"):
        layer = AffineCoupling(kind, 0, 4, 8, 2)
        x = torch.randn(3, 4, 4, 4)
        y, logdet = layer(x)
        (0.5 * (y ** 2).sum() - logdet.sum()).backward()
        out = layer.net.out[-1]
        scale_path = layer.scale.grad.abs().sum() + out.g.grad[:out.g.numel() // 2].abs().sum()
        assert scale_path > 1e-3, kind


@pytest.mark.parametrize("mask_kind", ["checkerboard", "channel"])
def test_flow_batchnorm_training_mode(mask_kind):
    torch.manual_seed(0)
    fn = checkerboard_mask if mask_kind == "checkerboard" else channel_mask
    bn = FlowBatchNorm(4, lambda h, w, d=None: fn(4, h, w, 1, d), momentum=0.1, eps=1e-4).double().train()
    x = 3 + 2 * torch.randn(5, 4, 4, 4, dtype=torch.float64)
    y, logdet = bn(x)
    keep = fn(4, 4, 4, 1).double()
    change = (1 - keep).bool().expand_as(x)
    # independent batch statistics over the changed elements of each channel
    for c in range(4):
        vals = x[:, c][change[:, c]]
        if vals.numel():
            assert torch.allclose(bn.last_mean[c], vals.mean())
            assert torch.allclose(bn.last_var[c], vals.var(unbiased=False))
            assert abs(y[:, c][change[:, c]].mean().item()) < 1e-10
    assert torch.equal(y[~change], x[~change])
    # log-det: the Jacobian of the map with the batch statistics held fixed (the paper's convention)
    mean, var = bn.last_mean, bn.last_var
    ref = per_example_logdet(lambda v: bn.normalize(v, keep, mean, var)[0], x)
    assert torch.allclose(logdet, ref, rtol=1e-8)
    assert torch.allclose(bn.inverse(y), x, atol=1e-10)  # undoes the latest training forward
    # running averages moved towards the batch statistics
    moved = (1 - keep[0]).sum(dim=(1, 2)) > 0
    assert torch.allclose(bn.running_mean[moved], 0.1 * mean[moved])


def test_flow_batchnorm_eval_mode():
    bn = FlowBatchNorm(3, lambda h, w, d=None: checkerboard_mask(3, h, w, 0, d), momentum=0.1, eps=1e-4).double()
    randomize_(bn).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y, logdet = bn(x)
    assert torch.allclose(logdet, per_example_logdet(lambda v: bn(v)[0], x), rtol=1e-8)
    assert torch.allclose(bn.inverse(y), x, atol=1e-10)

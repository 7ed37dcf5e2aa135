"""The whole multiscale model and the objective against independent references."""
import math

import numpy as np
import pytest
import torch

from nvp_dist.flows import RealNVP, bits_per_dim, from_logit
from tests.flow_helpers import per_example_logdet, random_model, small_cfg

SHAPES = [(1, 4, 2), (3, 8, 2), (3, 8, 3)]  # (channels, size, scales)


def _flat(zs):
    return torch.cat([z.flatten(1) for z in zs], dim=1)


@pytest.mark.parametrize("checkerboard", ["masked", "gathered"])
@pytest.mark.parametrize("c,size,scales", SHAPES)
def test_model_jacobian_float64(c, size, scales, checkerboard):
    model = random_model(small_cfg(c, size, scales, checkerboard=checkerboard)).eval()
    y = torch.randn(2, c, size, size, dtype=torch.float64)
    zs, logdet = model(y)
    assert sum(z[0].numel() for z in zs) == c * size * size
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes(size, size)
    ref = per_example_logdet(lambda v: _flat(model(v)[0]), y)
    assert torch.allclose(logdet, ref, rtol=1e-8)
    assert logdet.abs().min() > 0.1
    assert torch.allclose(model.inverse(zs), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("c,size,scales", SHAPES)
def test_model_inverse_float32(c, size, scales):
    model = random_model(small_cfg(c, size, scales), dtype=torch.float32).eval()
    y = torch.randn(3, c, size, size)
    assert torch.allclose(model.inverse(model(y)[0]), y, atol=1e-5)


def test_training_mode_inverse_uses_batch_statistics():
    model = random_model(small_cfg(3, 8, 2)).train()
    y = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    zs, _ = model(y)
    assert torch.allclose(model.inverse(zs), y, atol=1e-10)


def test_fresh_model_without_bn_is_identity_permutation():
    model = RealNVP(small_cfg(3, 8, 3, coupling_bn=False))
    y = torch.randn(2, 3, 8, 8)
    zs, logdet = model(y)
    assert torch.equal(logdet, torch.zeros(2))
    assert torch.equal(torch.sort(_flat(zs), dim=1).values, torch.sort(y.flatten(1), dim=1).values)
    assert torch.equal(model.inverse(zs), y)


def test_bits_per_dim_matches_closed_form_for_identity():
    alpha = 0.05
    model = RealNVP(small_cfg(3, 8, 2, coupling_bn=False, alpha=alpha))
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    u = torch.rand(k.shape, generator=g, dtype=torch.float32)
    got = bits_per_dim(model, k, noise=u).detach().numpy()
    # independent computation in numpy float64: standard normal on the logit-transformed data
    x = (k.numpy().astype(np.float64) + u.numpy().astype(np.float64)) / 256
    p = alpha + (1 - 2 * alpha) * x
    y = np.log(p / (1 - p))
    d = 3 * 8 * 8
    log_normal = (-0.5 * y ** 2 - 0.5 * np.log(2 * np.pi)).reshape(5, -1).sum(1)
    log_jac = np.log((1 - 2 * alpha) / (p * (1 - p))).reshape(5, -1).sum(1)
    expected = (-(log_normal + log_jac) + d * np.log(256)) / (d * np.log(2))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bits_per_dim_float64_matches_change_of_variables():
    model = random_model(small_cfg(1, 4, 2)).eval()
    k = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    u = torch.rand(k.shape, dtype=torch.float64)
    bpd = bits_per_dim(model, k, noise=u)
    # direct: the whole map x -> z (logit then flow) differentiated by autograd
    x = (k.double() + u) / 256
    def full(v):
        p = 0.05 + 0.9 * v
        return _flat(model(torch.log(p) - torch.log1p(-p))[0])
    z = full(x)
    logdet = per_example_logdet(full, x)
    log_pz = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(1)
    expected = (-(log_pz + logdet) + 16 * math.log(256)) / (16 * math.log(2))
    assert torch.allclose(bpd, expected, rtol=1e-10)


def test_sample_temperature_zero_is_image_of_zero():
    torch.manual_seed(0)
    model = random_model(small_cfg(3, 8, 2), dtype=torch.float32).train()
    a = model.sample(3, temperature=0.0)
    b = model.sample(3, temperature=0.0)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 8, 8)
    assert torch.equal(a, b)
    model.eval()
    zeros = [torch.zeros(3, *s) for s in model.latent_shapes(8, 8)]
    assert torch.equal(a, from_logit(model.inverse(zeros), 0.05))
    assert model.training is False  # restored to the mode it was in
    model.train()
    model.sample(1)
    assert model.training


def test_sample_larger_than_training_size():
    model = random_model(small_cfg(3, 8, 2), dtype=torch.float32)
    assert model.sample(2, size=16).shape == (2, 3, 16, 16)


def test_conditioning_changes_output_and_is_required():
    model = random_model(small_cfg(3, 8, 2, cond_dim=2), dtype=torch.float32).eval()
    y = torch.randn(2, 3, 8, 8)
    za, _ = model(y, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    zb, _ = model(y, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert not torch.allclose(za[0], zb[0])
    with pytest.raises(ValueError, match="cond"):
        model(y)


def test_l2_parameters_are_magnitudes_and_scales():
    model = RealNVP(small_cfg(3, 8, 2))
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.l2_parameters())}
    assert names and all(n.endswith(".g") or n.endswith(".scale") for n in names)
    n_couplings = 3 + 3 + 4
    assert sum(n.endswith(".scale") for n in names) == n_couplings


def test_dropout_option_acts_in_training_only():
    model = random_model(small_cfg(3, 8, 2, dropout=0.5), dtype=torch.float64)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 10  # one per coupling's block
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.eval()
    zs, logdet = model(y)
    assert torch.allclose(model.inverse(zs), y, atol=1e-10)
    assert torch.equal(model(y)[1], logdet)  # deterministic in evaluation
    model.train()
    torch.manual_seed(0)
    a = model(y)[1]
    torch.manual_seed(1)
    assert not torch.allclose(a, model(y)[1])

"""Typed configs: every shipped YAML loads, bad keys and types fail with the dotted key, counts are right."""
import subprocess
import sys
from pathlib import Path

import pytest

from nvp_dist.config import ConfigError, load_config
from nvp_dist.config_cli import parameter_count

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Parameter counts per shipped config (also the README's table).
PARAMS = {
    "cifar10": 19_584_330, "imagenet32": 45_769_886, "imagenet64": 94_428_474, "lsun_bedroom": 94_428_474,
    "lsun_tower": 94_428_474, "lsun_church": 94_428_474, "celeba": 94_428_474, "debug": 45_366,
    "default": 1_265_278, "celeba_attr": 94_689_562,
}


def st_net_params(cin: int, mid: int, cout: int, blocks: int, cond: int = 0) -> int:
    """Hand count of one s/t ResNet (see nvp_dist/flows/resnet.py); weight-norm convs hold v, g and a bias."""
    bn = lambda c: 2 * c
    conv = lambda i, o, k, bias=True: o * i * k * k + o + (o if bias else 0)
    n = bn(cin) + conv(cin, mid, 3) + conv(mid, mid, 1)
    n += blocks * (bn(mid) + conv(mid, mid, 3, bias=False) + bn(mid) + conv(mid, mid, 3) + conv(mid, mid, 1))
    n += bn(mid) + conv(mid, 2 * cout, 1)
    return n + (cond * mid + mid if cond else 0)


def hand_count(c: int, mid: int, blocks: int, scales: int, cond: int = 0) -> int:
    total = 0
    for i in range(scales):
        ci, mi = c * 2 ** i, mid * 2 ** i
        checker = 4 if i == scales - 1 else 3
        total += checker * (st_net_params(ci + 1, mi, ci, blocks, cond) + 1)
        if i < scales - 1:
            total += 3 * (st_net_params(2 * ci, 2 * mi, 2 * ci, blocks, cond) + 1)
    return total


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_shipped_config_loads_with_asserted_parameter_count(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    m = cfg.model
    assert parameter_count(cfg) == PARAMS[name] == hand_count(m.in_channels, m.mid_channels, m.res_blocks, m.num_scales,
                                                               m.cond_dim)


def test_conditioning_parameters_counted():
    cfg = load_config(CONFIGS / "debug.yaml", ["model.cond_dim=5"])
    assert parameter_count(cfg) == hand_count(1, 8, 1, 2, cond=5)


def test_paper_architectures():
    c10 = load_config(CONFIGS / "cifar10.yaml").model
    assert (c10.num_scales, c10.res_blocks, c10.mid_channels) == (2, 8, 64)
    i32 = load_config(CONFIGS / "imagenet32.yaml").model
    assert (i32.num_scales, i32.res_blocks, i32.mid_channels) == (4, 4, 32)
    for name in ("imagenet64", "lsun_bedroom", "lsun_tower", "lsun_church", "celeba"):
        m = load_config(CONFIGS / f"{name}.yaml").model
        assert (m.image_size, m.num_scales, m.res_blocks, m.mid_channels) == (64, 5, 2, 32)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "debug.yaml", ["model.res_blocks=3", "--train.lr=0.01", "model.coupling_form=official"])
    assert cfg.model.res_blocks == 3 and cfg.train.lr == 0.01 and cfg.model.coupling_form.value == "official"


@pytest.mark.parametrize("override,key", [
    ("model.foo=1", "model.foo"), ("model.res_blocks=abc", "model.res_blocks"),
    ("model.coupling_form=sideways", "model.coupling_form"), ("trian.lr=1", "trian"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "debug.yaml", [override])


def test_bad_yaml_key_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  res_block: 2\n")
    with pytest.raises(ConfigError, match=r"model\.res_block"):
        load_config(bad)


def test_inconsistent_architecture_rejected():
    with pytest.raises(ConfigError, match="num_scales"):
        load_config(CONFIGS / "debug.yaml", ["model.num_scales=4"])


def test_cli_prints_config_and_count():
    out = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "config", str(CONFIGS / "debug.yaml"), "model.mid_channels=8"],
                         capture_output=True, text=True, check=True).stdout
    assert "res_blocks: 1" in out and f"# parameters: {PARAMS['debug']:,}" in out
    bad = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "config", str(CONFIGS / "debug.yaml"), "model.nope=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "model.nope" in bad.stderr


def test_gathered_checkerboard_needs_even_widths():
    assert load_config(CONFIGS / "debug.yaml", ["model.checkerboard=gathered"]).model.checkerboard == "gathered"
    with pytest.raises(ConfigError, match="even width"):
        load_config(CONFIGS / "debug.yaml", ["model.checkerboard=gathered", "model.image_size=12", "model.num_scales=3"])
    with pytest.raises(ConfigError, match="model.checkerboard"):
        load_config(CONFIGS / "debug.yaml", ["model.checkerboard=packed"])

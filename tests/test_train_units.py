"""Trainer pieces against hand-computed values: DeepSpeed config, the paper's L2 groups, schedules,
Polyak averages, checkpoint sealing, verification and pruning, the watchdog's per-attempt store keys."""
import math
import time

import pytest
import torch

from nvp_dist.config import load_config
from nvp_dist.flows import RealNVP
from nvp_dist.train import checkpoint as ckpt
from nvp_dist.train.ema import EMA
from nvp_dist.train.engine import deepspeed_config, lr_lambda, param_groups
from tests.launch_helpers import DEBUG


def test_deepspeed_config_from_typed_config():
    cfg = load_config(DEBUG, ["train.batch_size=64", "train.grad_accum=2", "train.zero_stage=3",
                              "train.precision=bf16", "train.grad_clip=5",
                              "train.deepspeed={zero_optimization: {overlap_comm: true, reduce_bucket_size: 1000}}"])
    ds = deepspeed_config(cfg, world_size=4, cuda=True)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 5
    assert ds["bf16"] == {"enabled": True}
    # merged, not replaced; on CUDA DeepSpeed's own buffer sizes
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000}
    # on CPU the smaller buffers, which the user's train.deepspeed still overrides
    cpu = deepspeed_config(cfg, world_size=4)["zero_optimization"]
    assert cpu == {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000, "allgather_bucket_size": 10**7,
                   "stage3_prefetch_bucket_size": 5 * 10**6, "stage3_max_live_parameters": 10**7}
    with pytest.raises(ValueError, match="world size 3"):
        deepspeed_config(cfg, world_size=3)


def test_l2_applies_to_magnitudes_and_scales_only():
    model = RealNVP(load_config(DEBUG).model)
    decay, rest = param_groups(model, l2=5e-5)
    assert decay["weight_decay"] == pytest.approx(1e-4)  # d/dp of 5e-5 * p^2
    assert rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith((".g", ".scale")) for p in decay["params"])
    assert not any(names[id(p)].endswith((".g", ".scale")) for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_warmup_and_cosine_schedule():
    cfg = load_config(DEBUG, ["train.steps=110", "train.warmup_steps=10", "train.cosine=true", "train.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    flat = lr_lambda(load_config(DEBUG))
    assert flat(0) == flat(1000) == 1.0


def test_ema_warms_up_and_averages_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.9, zero_stage=0)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
    ema.update(model, step=0)  # decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.params["weight"], torch.full((2,), 0.1 * 1 + 0.9 * 3))
    assert torch.allclose(ema.params["running_mean"], torch.full((2,), 0.9 * 2))
    ema.update(model, step=1000)  # decay 0.9
    assert torch.allclose(ema.params["weight"], torch.full((2,), 0.9 * 2.8 + 0.1 * 3))


def test_checkpoint_seal_verify_and_fallback(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        d = root / (ckpt.tag_for(step) + ".tmp")
        d.mkdir(parents=True)
        (d / "weights.pt").write_bytes(bytes(range(256)) * step)
        ckpt.finalize(root, step, keep=2)
    assert ckpt.checkpoint_tags(root) == ["step00000015", "step00000010"]  # pruned to 2
    assert (root / "latest").read_text() == "step00000015"
    assert ckpt.verify(root / "step00000015") is None
    # an interrupted save: a .tmp directory never counts
    (root / "step00000020.tmp").mkdir()
    f = root / "step00000015" / "weights.pt"
    f.write_bytes(f.read_bytes()[:100])
    assert "manifest says" in ckpt.verify(root / "step00000015")
    assert ckpt.newest_valid(root) == "step00000010"
    assert "step00000015 is not usable" in caplog.text
    f2 = root / "step00000010" / "weights.pt"
    data = bytearray(f2.read_bytes())
    data[0] ^= 1
    f2.write_bytes(bytes(data))
    assert "sha256" in ckpt.verify(root / "step00000010")


def _seal(root, step, keep):
    d = root / (ckpt.tag_for(step) + ".tmp")
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(bytes(range(256)) * step)
    ckpt.finalize(root, step, keep=keep)


def _damage(root, step):
    f = root / ckpt.tag_for(step) / "weights.pt"
    f.write_bytes(f.read_bytes()[:-1])


def test_prune_never_removes_the_new_checkpoint_after_a_fallback(tmp_path):
    """`--resume auto` fell back past a damaged step 10 to step 5; the next save (step 8, keep 1) must stay,
    and `latest` must name a directory that verifies."""
    root = tmp_path / "checkpoints"
    _seal(root, 5, keep=2)
    _seal(root, 10, keep=2)
    _damage(root, 10)
    assert ckpt.newest_valid(root) == "step00000005"
    _seal(root, 8, keep=1)
    assert (root / "latest").read_text() == "step00000008"
    assert ckpt.checkpoint_tags(root) == ["step00000008"]  # the abandoned step 10 and the surplus step 5 go
    assert ckpt.verify(root / "step00000008") is None


def test_prune_sets_intact_newer_tags_aside_and_never_rehashes_older_ones(tmp_path):
    """An explicit resume from step 5 past an intact step 10: the save at step 8 sets step 10 aside (kept,
    out of `--resume auto`'s reach); an older tag whose bytes changed but not its size stays (no re-hash)."""
    root = tmp_path / "checkpoints"
    for step in (3, 5, 10):
        _seal(root, step, keep=5)
    f = root / ckpt.tag_for(3) / "weights.pt"
    f.write_bytes(bytes(reversed(f.read_bytes())))
    _seal(root, 8, keep=5)
    assert ckpt.checkpoint_tags(root) == ["step00000008", "step00000005", "step00000003"]
    assert ckpt.verify(root / "step00000010.superseded") is None
    assert ckpt.newest_valid(root) == "step00000008"


def test_prune_skips_damaged_older_tags_when_counting_kept_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 5, 7):
        _seal(root, step, keep=5)
    _damage(root, 7)
    _damage(root, 5)
    _seal(root, 9, keep=2)
    assert ckpt.checkpoint_tags(root) == ["step00000009", "step00000003"]


@pytest.mark.parametrize("argv", [
    ["--config", "c.yaml", "--resume", "auto", "train.steps=3", "train.zero_stage=0"],
    ["--config", "c.yaml", "train.steps=3", "--resume", "auto", "train.zero_stage=0"],  # launch/demo.sh's order
    ["--local_rank=1", "--config", "c.yaml", "train.steps=3", "train.zero_stage=0", "--resume", "auto"],
])
def test_train_arguments_take_overrides_before_or_after_flags(argv):
    from nvp_dist.train.entry import parse_args

    args = parse_args(argv)
    assert (args.config, args.resume, args.overrides) == ("c.yaml", "auto", ["train.steps=3", "train.zero_stage=0"])


def test_watchdog_keys_of_a_failed_attempt_do_not_stop_the_restarted_one(monkeypatch):
    """torchrun --max-restarts can keep one store across restarts: attempt 0's culprit is in it when attempt
    1's ranks start. A restarted rank (forked child, real TCPStore client) must keep running; rank 0 of
    attempt 0 published its failure under its own attempt."""
    import datetime
    import json
    import os

    import torch.distributed as dist

    from nvp_dist.train import watchdog
    from nvp_dist.train.distributed import _free_port, attempt_id

    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10),
                           wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_id()
    watchdog.Watchdog(server, 1, 2, peer_timeout_s=60, interval_s=0.05, attempt=first).finished()  # no wait
    assert watchdog.start(0, 2, peer_timeout_s=60) is not None
    watchdog.report_failure(2, "bad data")  # attempt 0 fails
    assert json.loads(server.get(f"nvp-watchdog/{first}/culprit"))["rank"] == 0

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert attempt_id() != first
    pid = os.fork()
    if pid == 0:  # rank 1 of attempt 1: it would os._exit(2) on seeing the culprit
        code = 1
        try:
            server = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10),
                                   wait_for_workers=False)  # this process's own client, not the parent's
            dog = watchdog.start(1, 2, peer_timeout_s=5)  # polls every 0.5 s; no rank 0 here: exits 1 after 5 s
            beats, deadline = f"nvp-watchdog/{attempt_id()}/hb/1", time.monotonic() + 8
            while server.add(beats, 0) < 4 and time.monotonic() < deadline:  # 3 polls of its thread
                time.sleep(0.05)
            code = 0 if server.add(beats, 0) >= 4 else 3
            dog.stop()
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_watchdog_watches_one_peer_round_the_ring_and_names_a_vanished_one_to_all():
    """World of 4 on a real TCPStore: rank 3 watches rank 0 only (finished ranks are skipped), rank 1 never
    beats and is not its business; rank 0, which never beats either, is published as the culprit with
    code 1 by its watcher (forked, since the watchdog ends its process with os._exit)."""
    import datetime
    import json
    import os

    import torch.distributed as dist

    from nvp_dist.train import watchdog
    from nvp_dist.train.distributed import _free_port

    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10),
                           wait_for_workers=False)
    server.add("nvp-watchdog/t/hb/2", 1)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10),
                                   wait_for_workers=False)
            dog = watchdog.Watchdog(client, 3, 4, peer_timeout_s=0.5, interval_s=0.05, attempt="t")
            assert dog._watched() == 0
            client.add("nvp-watchdog/t/done/0", 1)
            assert dog._watched() == 1  # rank 0 finished: the next one round the ring
            client.add("nvp-watchdog/t/done/0", -1)
            time.sleep(5)  # the watchdog's os._exit(1) ends this child first
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 1
    culprit = json.loads(server.get("nvp-watchdog/t/culprit"))
    assert culprit["rank"] == 0 and culprit["exit_code"] == 1 and "no heartbeat" in culprit["message"]

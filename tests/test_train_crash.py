"""Through the real launcher: rank 0 dies while sealing a checkpoint (the NVP_CHECKPOINT_FAULT hook), and
`--resume auto` continues from the previous checkpoint. Every stage is covered at unit level in
tests/test_checkpoint_crash.py; this is the one stage whose leftovers the trainer must clean itself.
`metrics.jsonl` keeps one record per event and step across the kill, a torn line and the replay."""
import json
from collections import Counter

from nvp_dist.train import checkpoint as ckpt
from tests.launch_helpers import debug_args, explain, run_deepspeed

COMMON = ("train.checkpoint_every=2", "train.eval_every=100", "train.log_every=1")


def test_killed_while_sealing_then_resume_auto(digits_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    root = out / "checkpoints"
    # The launcher passes the environment to every rank; only rank 0 seals, so only rank 0 dies there.
    monkeypatch.setenv(ckpt.FAULT_ENV, "synced@4")
    killed = run_deepspeed(debug_args(digits_dir, out, "train.steps=6", *COMMON))
    assert killed.returncode != 0, explain(killed)
    # Step 4's files are complete and synced, but not yet in place: the checkpoint is still step 2's.
    assert (root / "step00000004.tmp" / "MANIFEST.json").is_file()
    assert (root / "latest").read_text() == "step00000002" and ckpt.verify(root / "step00000002") is None
    # Steps 1-4 were recorded before the kill; a kill mid-write leaves a line without its end.
    metrics = out / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    with open(metrics, "a") as f:
        f.write('{"event": "train", "step": 5, "train_bits')
    monkeypatch.delenv(ckpt.FAULT_ENV)
    resumed = run_deepspeed(debug_args(digits_dir, out, "train.steps=6", *COMMON) + ["--resume", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert "step00000002 at step 2" in resumed.stdout + resumed.stderr
    assert ckpt.checkpoint_tags(root) == ["step00000006", "step00000004", "step00000002"]
    assert all(ckpt.verify(root / t) is None for t in ckpt.checkpoint_tags(root))
    assert not [p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old"))]
    # Resumed at step 2: steps 3 and 4 were replayed and recorded once, the torn line is gone.
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert Counter((r["event"], r["step"]) for r in lines) == \
        Counter([("train", s) for s in range(1, 7)] + [("eval", 6)]), lines

"""Through the real launcher: rank 0 dies while sealing a checkpoint (the NVP_CHECKPOINT_FAULT hook), and
`--resume auto` continues from the previous checkpoint. Every stage is covered at unit level in
tests/test_checkpoint_crash.py; this is the one stage whose leftovers the trainer must clean itself."""
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
    monkeypatch.delenv(ckpt.FAULT_ENV)
    resumed = run_deepspeed(debug_args(digits_dir, out, "train.steps=6", *COMMON) + ["--resume", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert "step00000002 at step 2" in resumed.stdout + resumed.stderr
    assert ckpt.checkpoint_tags(root) == ["step00000006", "step00000004", "step00000002"]
    assert all(ckpt.verify(root / t) is None for t in ckpt.checkpoint_tags(root))
    assert not [p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old"))]

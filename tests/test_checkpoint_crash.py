"""A process killed at each stage of sealing a checkpoint (fault points of NVP_CHECKPOINT_FAULT, no sleeps)
leaves a checkpoint that `--resume auto` accepts: recover() then newest_valid(), as the trainer runs them.
The same through the real launcher is in tests/test_train_crash.py."""
import subprocess
import sys

import pytest

from nvp_dist.train import checkpoint as ckpt
from tests.launch_helpers import ROOT

# Runs finalize() in a child process that the fault point ends.
FINALIZE = ("import sys; from pathlib import Path; from nvp_dist.train import checkpoint as c; "
            "c.finalize(Path(sys.argv[1]), int(sys.argv[2]), keep=3)")


def write_tag(root, step, content, suffix=".tmp"):
    d = root / (ckpt.tag_for(step) + suffix)
    (d / "sub").mkdir(parents=True)
    (d / "weights.pt").write_bytes(content * 1000)
    (d / "sub" / "state.pt").write_bytes(content)
    return d


def finalize_killed_at(root, step, stage):
    env = {"PYTHONPATH": str(ROOT), ckpt.FAULT_ENV: f"{stage}@{step}"}
    return subprocess.run([sys.executable, "-c", FINALIZE, str(root), str(step)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
@pytest.mark.parametrize("stage", ckpt.FAULT_STAGES)
def test_kill_at_each_stage_leaves_a_checkpoint_resume_accepts(tmp_path, stage, resave):
    root = tmp_path / "checkpoints"
    write_tag(root, 5, b"five")
    ckpt.finalize(root, 5, keep=3)
    # A new step, or (after a resume that fell back past it) a re-save of step 5 over the old one.
    step = 5 if resave else 10
    write_tag(root, step, b"new")
    done = finalize_killed_at(root, step, stage)
    if stage == "old_moved" and not resave:  # a new step never sets anything aside: it runs to the end
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == ckpt.FAULT_EXIT, done.stderr
    ckpt.recover(root)
    tag = ckpt.newest_valid(root)
    assert tag is not None and ckpt.verify(root / tag) is None
    reached_rename = ckpt.FAULT_STAGES.index(stage) >= ckpt.FAULT_STAGES.index("renamed") or done.returncode == 0
    expected_content = b"new" if reached_rename else b"five"
    assert tag == ckpt.tag_for(10 if reached_rename and not resave else 5)
    assert (root / tag / "sub" / "state.pt").read_bytes() == expected_content
    assert not [p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_fault_names_a_step(tmp_path):
    """STAGE@STEP fires only at that step's save: an earlier save of the same run completes."""
    root = tmp_path / "checkpoints"
    env = {"PYTHONPATH": str(ROOT), ckpt.FAULT_ENV: "renamed@10"}
    codes = []
    for step in (5, 10):
        write_tag(root, step, b"x")
        codes.append(subprocess.run([sys.executable, "-c", FINALIZE, str(root), str(step)], env=env, cwd=ROOT,
                                    capture_output=True, timeout=120).returncode)
    assert codes == [0, ckpt.FAULT_EXIT]
    assert (root / "latest").read_text() == "step00000005" and ckpt.verify(root / "step00000010") is None

"""A process killed at each stage of sealing a checkpoint (fault points of NVP_CHECKPOINT_FAULT, no sleeps)
leaves a checkpoint that `--resume auto` accepts: recover() then newest_valid(), as the trainer runs them.
The same through the real launcher is in tests/test_train_crash.py."""
import json
import os

import pytest

from nvp_dist.train import checkpoint as ckpt


def write_tag(root, step, content, suffix=".tmp"):
    d = root / (ckpt.tag_for(step) + suffix)
    (d / "sub").mkdir(parents=True)
    (d / "weights.pt").write_bytes(content * 1000)
    (d / "sub" / "state.pt").write_bytes(content)
    return d


def finalize_killed_at(root, step, fault):
    """finalize() in a forked child (no interpreter start-up) that the fault point ends; its exit code."""
    os.environ[ckpt.FAULT_ENV] = fault
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ckpt.finalize(root, step, keep=3)
                code = 0
            finally:
                os._exit(code)
    finally:
        del os.environ[ckpt.FAULT_ENV]
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
@pytest.mark.parametrize("stage", ckpt.FAULT_STAGES)
def test_kill_at_each_stage_leaves_a_checkpoint_resume_accepts(tmp_path, stage, resave):
    root = tmp_path / "checkpoints"
    write_tag(root, 5, b"five")
    ckpt.finalize(root, 5, keep=3)
    # A new step, or (after a resume that fell back past it) a re-save of step 5 over the old one.
    step = 5 if resave else 10
    write_tag(root, step, b"new")
    code = finalize_killed_at(root, step, f"{stage}@{step}")
    # A new step never sets anything aside: there is no old_moved point, and the save runs to the end.
    assert code == (0 if stage == "old_moved" and not resave else ckpt.FAULT_EXIT)
    ckpt.recover(root)
    tag = ckpt.newest_valid(root)
    assert tag is not None and ckpt.verify(root / tag) is None
    reached_rename = ckpt.FAULT_STAGES.index(stage) >= ckpt.FAULT_STAGES.index("renamed") or code == 0
    expected_content = b"new" if reached_rename else b"five"
    assert tag == ckpt.tag_for(10 if reached_rename and not resave else 5)
    assert (root / tag / "sub" / "state.pt").read_bytes() == expected_content
    assert not [p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_fault_names_a_step(tmp_path):
    """STAGE@STEP fires only at that step's save: an earlier save of the same run completes."""
    root = tmp_path / "checkpoints"
    codes = []
    for step in (5, 10):
        write_tag(root, step, b"x")
        codes.append(finalize_killed_at(root, step, "renamed@10"))
    assert codes == [0, ckpt.FAULT_EXIT]
    assert (root / "latest").read_text() == "step00000005" and ckpt.verify(root / "step00000010") is None


def test_eval_figures_export_resolve_to_a_verified_checkpoint(tmp_path, caplog):
    """What `nvp-dist eval`, `figures` and `export` load: `latest` when intact, else the newest intact tag
    (as --resume auto); a damaged tag given itself, or none intact, is an error naming the problem."""
    from nvp_dist.train.export import resolve_tag_dir

    root = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        write_tag(root, step, b"w")
        ckpt.finalize(root, step, keep=3)
    assert resolve_tag_dir(tmp_path / "run") == root / "step00000010"
    victim = root / "step00000010" / "weights.pt"
    victim.write_bytes(victim.read_bytes()[:10])
    for given in (tmp_path / "run", root):
        assert resolve_tag_dir(given) == root / "step00000005"
    assert "falling back" in caplog.text
    with pytest.raises(RuntimeError, match="step00000010 is not a complete checkpoint: weights.pt has 10 bytes"):
        resolve_tag_dir(root / "step00000010")
    (root / "step00000005" / "MANIFEST.json").unlink()
    with pytest.raises(RuntimeError, match="no complete checkpoint under"):
        resolve_tag_dir(tmp_path / "run")


def test_metrics_records_past_the_resumed_step_and_a_torn_line_are_dropped(tmp_path):
    from nvp_dist.train import records

    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "train", "step": s} for s in (1, 2, 3)] + [{"event": "eval", "step": 3}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    path.write_text(text + '{"event": "train", "st')
    records.truncate(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:2]
    records.truncate(path, 2)  # nothing to drop: the file is left alone
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in lines[:2])
    records.truncate(path, 0)  # a fresh start in the same directory
    assert path.read_text() == ""


def test_has_event_finds_an_eval_record_of_that_step_only(tmp_path):
    """A run resumed at its last step re-runs the final evaluation: recorded only if no record of it exists
    (a stop signal during that evaluation abandoned it), never twice."""
    from nvp_dist.train import records

    path = tmp_path / "metrics.jsonl"
    assert not records.has_event(path, "eval", 4)  # no file yet
    path.write_text(json.dumps({"event": "eval", "step": 2}) + "\n" + json.dumps({"event": "train", "step": 4})
                    + "\n" + '{"event": "eval", "st')
    assert records.has_event(path, "eval", 2)
    assert not records.has_event(path, "eval", 4)  # a train record, and a torn line, of step 4 do not count
    with open(path, "a") as f:
        f.write("\n" + json.dumps({"event": "eval", "step": 4}) + "\n")
    assert records.has_event(path, "eval", 4)

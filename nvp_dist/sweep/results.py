"""A sweep's results: one row per trial (sampled values, best bits/dim, steps, status), printed and
written as CSV, and the best trial's configuration as a training YAML that `launch/train.py` runs.

Status is read from what a trial reported against the steps its config asked for: `finished` reached
train.steps, `stopped` ended early without an error (the scheduler stopped it), `failed` raised (the
reason is the trainer's message for a divergence), `not run` never reported.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ray.tune import ResultGrid

from nvp_dist.config import to_yaml
from nvp_dist.sweep.config import SweepConfig, override
from nvp_dist.sweep.trial import trainer_runs_dir


@dataclass
class TrialRow:
    trial_id: str
    values: Dict[str, Any]
    status: str
    steps: int
    best_bits_per_dim: float
    best_step: int
    last_bits_per_dim: float
    reports: int
    # Trainer runs this trial started: 1, plus one per resume (driver restarted, PBT exploit).
    attempts: int = 0
    reason: str = ""


def _reason(error: Optional[BaseException]) -> str:
    if error is None:
        return ""
    # Tune wraps the trial's exception; its message's last line names the original.
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def collect_rows(sweep: SweepConfig, results: ResultGrid) -> List[TrialRow]:
    keys = list(sweep.specs())
    rows = []
    for result in results:
        df = result.metrics_dataframe
        reported = df is not None and not df.empty and sweep.metric in df
        # A trial that failed before its first report has no config in its metrics; Tune's params.json
        # in the trial directory always has it.
        config = result.config or json.loads((Path(result.path) / "params.json").read_text())
        values = {k: config.get(k) for k in keys}
        target = sweep.training_config(values).train.steps
        steps = int(df["step"].max()) if reported else 0
        bits = df[sweep.metric].astype(float) if reported else None
        if result.error is not None:
            status = "failed"
        elif not reported:
            status = "not run"
        else:
            status = "finished" if steps >= target else "stopped"
        trial_id = str(result.metrics["trial_id"])
        runs = trainer_runs_dir(sweep, trial_id)
        rows.append(TrialRow(
            trial_id=trial_id, values=values, status=status, steps=steps,
            best_bits_per_dim=float(bits.min()) if reported else math.nan,
            best_step=int(df["step"].iloc[int(bits.values.argmin())]) if reported else 0,
            last_bits_per_dim=float(bits.iloc[-1]) if reported else math.nan,
            reports=len(df) if df is not None else 0, reason=_reason(result.error),
            attempts=len(list(runs.glob("attempt-*")))))
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: List[TrialRow]) -> Optional[TrialRow]:
    """The lowest bits/dim any trial that did not fail reported (a stopped trial's early value counts too:
    it is a real evaluation of that configuration)."""
    candidates = [r for r in rows if r.status != "failed" and not math.isnan(r.best_bits_per_dim)]
    return min(candidates, key=lambda r: r.best_bits_per_dim) if candidates else None


def _columns(sweep: SweepConfig) -> List[str]:
    return ["trial_id", *sweep.specs(), "best_bits_per_dim", "best_step", "last_bits_per_dim", "steps", "reports",
            "attempts", "status", "reason"]


def _record(row: TrialRow) -> Dict[str, Any]:
    return {"trial_id": row.trial_id, **row.values, "best_bits_per_dim": row.best_bits_per_dim,
            "best_step": row.best_step, "last_bits_per_dim": row.last_bits_per_dim, "steps": row.steps,
            "reports": row.reports, "attempts": row.attempts, "status": row.status, "reason": row.reason}


def write_csv(sweep: SweepConfig, rows: List[TrialRow], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(sweep))
        writer.writeheader()
        writer.writerows(_record(r) for r in rows)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(sweep: SweepConfig, rows: List[TrialRow]) -> str:
    columns = _columns(sweep)
    cells = [[_cell(_record(r)[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths)).rstrip()
    return "\n".join([f"sweep {sweep.name}: {len(rows)} trials", line(columns), *(line(r) for r in cells)])


def write_best_yaml(sweep: SweepConfig, best: TrialRow, path: Path) -> Path:
    """The best trial's full resolved training config, pointed at a fresh out_dir so that
    `launch/train.py --config best.yaml` starts a new run rather than meeting the trial's checkpoints."""
    cfg = sweep.training_config(best.values, override("train.out_dir", str(sweep.experiment_dir / "best-run")),
                                override("name", f"{sweep.name}-best"))
    path.write_text(f"# Best trial {best.trial_id} of sweep {sweep.name}: {best.best_bits_per_dim:.4f} bits/dim "
                    f"at step {best.best_step}.\n" + to_yaml(cfg))
    return path

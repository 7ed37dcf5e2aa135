"""bf16 keeps float32 masters everywhere: at ZeRO 0 DeepSpeed wraps the optimiser in its unfused fp16
wrapper (bf16 as the low precision), whose masters its own `safe_get_full_fp32_param` does not find. The
ZeRO 1-3 bf16 runs of tests/test_train_launcher.py cover the other stages."""
import json
import subprocess
import sys

import torch

from nvp_dist.config import load_config
from nvp_dist.flows import RealNVP
from tests.launch_helpers import DEBUG, ROOT, debug_args, explain, records, run_deepspeed


def test_bf16_zero0_exports_and_evaluates_the_fp32_masters(digits_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_deepspeed(debug_args(digits_dir, out, "train.zero_stage=0", "train.precision=bf16", "train.steps=6",
                                    "train.log_every=3", "train.eval_every=6", "train.checkpoint_every=6"))
    assert proc.returncode == 0, explain(proc)
    states = torch.load(out / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False)
    # The optimiser holds the L2-penalised parameters as its first group, the rest as its second (the
    # paper's penalty as weight decay); names from an independently built model in that order.
    model = RealNVP(load_config(DEBUG, [f"data.path={digits_dir}"]).model)
    decay = {id(p) for p in model.l2_parameters()}
    names = ([n for n, p in model.named_parameters() if id(p) in decay]
             + [n for n, p in model.named_parameters() if id(p) not in decay])
    saved = [t for group in states["optimizer"]["fp32_groups"] for t in group]
    masters = dict(zip(names, saved, strict=True))
    exported = torch.load(out / "model_fp32.pt", weights_only=False)["model"]
    rounded_elements = total = 0
    for name, master in masters.items():
        assert master.dtype == torch.float32
        assert torch.equal(exported[name], master), name
        # the module entry is the masters' bf16 rounding, which six Adam steps have moved them off
        rounded = master.bfloat16().float()
        assert torch.equal(states["module"][name].float(), rounded), name
        rounded_elements += int((rounded != master).sum())
        total += master.numel()
    assert rounded_elements > total // 2, (rounded_elements, total)
    # the run's own evaluation saw the same weights as the exported file
    logged = records(out, "eval")[-1]
    cli = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "eval", "--checkpoint", str(out / "model_fp32.pt")],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    result = json.loads(cli.stdout.strip().splitlines()[-1])
    assert abs(result["bits_per_dim"] - logged["bits_per_dim"]) < 1e-5, (result, logged)

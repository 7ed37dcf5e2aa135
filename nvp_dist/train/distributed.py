"""The one place that reads the distributed environment and initialises communication.

Rank, world size, local rank and device come from the variables the `deepspeed` launcher, `torchrun`,
Kubernetes and Ray Train set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT). The
backend is nccl on CUDA and gloo on CPU. Everything else in the package asks this module.

`python -m nvp_dist.train.distributed` prints the ranks a one-machine launch should start and the
`deepspeed` arguments for them (launch/demo.sh): one rank per visible GPU, else 2 CPU ranks.
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """The environment as the launcher describes it; a plain `python` run is rank 0 of 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    return DistEnv(rank, world, local, local_world, device, backend)


CPU_RANKS = 2  # two gloo ranks: data parallelism exercised, and the 2-core machines this runs on


def visible_gpus(physical: int, cuda_visible_devices: Optional[str]) -> List[int]:
    """The GPU indices CUDA exposes given CUDA_VISIBLE_DEVICES, as the driver reads it: unset means all;
    the list is read up to its first invalid entry (out of range, negative, repeated or not a number),
    so "" and "-1" hide every GPU. UUID entries (GPU-..., MIG-...) are refused: the deepspeed launcher's
    --include takes indices."""
    if cuda_visible_devices is None:
        return list(range(physical))
    shown: List[int] = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if entry.startswith(("GPU-", "MIG-")):
            raise ValueError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}: give GPU indices, not UUIDs "
                             "(the deepspeed launcher's --include takes indices)")
        if not entry.isdigit() or int(entry) >= physical or int(entry) in shown:
            break
        shown.append(int(entry))
    return shown


def launch_ranks(physical: int, environ: Mapping[str, str]) -> Tuple[int, str, List[str], str]:
    """(ranks, accelerator, deepspeed launcher arguments, a line saying why) for one machine with
    `physical` GPUs. The launcher ignores CUDA_VISIBLE_DEVICES when given --num_gpus and numbers GPUs
    from 0, so a restricted set is passed as --include."""
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible_gpus(physical, cvd)
    if not gpus:
        why = "no NVIDIA GPU found" if physical == 0 else f"CUDA_VISIBLE_DEVICES={cvd!r} hides all {physical} GPUs"
        return CPU_RANKS, "cpu", ["--num_gpus", str(CPU_RANKS)], f"{why}: {CPU_RANKS} CPU ranks on gloo"
    if cvd is None:
        args = ["--num_gpus", str(len(gpus))]
    else:
        args = ["--include", "localhost:" + ",".join(map(str, gpus))]
    return len(gpus), "cuda", args, f"{len(gpus)} rank(s) on GPU(s) {gpus} of {physical}, nccl"


def physical_gpus() -> int:
    """GPUs as `nvidia-smi -L` lists them (0 without it: the test launch/setup_env.sh makes). No CUDA
    context is created in the launching process."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    if listing.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (reusing a process group that Ray Train made)."""
    env = read_env()
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _threads_per_rank(env)
    import deepspeed

    if env.device.type == "cpu":
        _skip_shm_allreduce()
    if not dist.is_initialized() and env.world_size == 1:
        # A plain `python launch/train.py` is a world of one; DeepSpeed still wants a process group.
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=env.backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env


def job_store(timeout_s: float) -> dist.TCPStore:
    """A new client connection to the store the process group rendezvoused on (MASTER_ADDR:MASTER_PORT,
    served by rank 0 or torchrun's agent): its own socket, so a watchdog thread can use it beside the
    main thread's collectives."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def attempt_id() -> str:
    """Names this attempt of the job in the store's keys. Under torchrun --max-restarts the agent's store can
    outlive a restart (torch's agent-store rendezvous has, in some versions, kept one store and prefixed its
    own keys with `/worker/attempt_{restart count}`), so keys a failed attempt left there (its culprit) must not reach the restarted ranks.
    TORCHELASTIC_RESTART_COUNT is the same on every rank of an attempt (torch relies on that too); the run
    id (torchrun's --rdzv-id) sets apart jobs sharing one store host. Other launchers start a fresh store."""
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", "none"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{run}/{restart}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(env: DistEnv) -> None:
    # The launcher does not set OMP_NUM_THREADS; ranks sharing the cores with a thread each per core ran
    # 10x slower here than with the cores divided among them (STACK_NOTES).
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))


def _skip_shm_allreduce() -> None:
    # DeepSpeed's CPU shared-memory all-reduce serves inference collectives only; building it costs a
    # 40 s JIT compile on every fresh machine and leaves 66 MB files in /dev/shm after each run. Training
    # collectives go through gloo either way, so mark the op unavailable before the backend is built.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class _AllReduceSum(torch.autograd.Function):
    # d(sum_r x_r)/d x_r = 1 for every rank, so the gradient is the sum of the ranks' output gradients.
    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (for batch-norm statistics)."""
    return _AllReduceSum.apply(t)


def reduce_tensor(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def average_buffers(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer (batch-norm running statistics) by its mean over ranks, in one
    collective. With per-rank batch statistics (sync_bn false) the running averages would otherwise drift
    apart, and the ranks would evaluate, average and checkpoint different models. Running averages are
    linear in the batch statistics, so averaging after every step equals running averages of the ranks'
    mean statistics."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for b, mean in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(mean.view_as(b))


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(env: Optional[DistEnv]) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    # One line for launch/demo.sh: "RANKS ACCELERATOR LAUNCHER-ARGS..."; the reason on stderr.
    n, accelerator, launcher_args, reason = launch_ranks(physical_gpus(), os.environ)
    print(f"ranks: {reason}", file=sys.stderr)
    print(n, accelerator, *launcher_args)

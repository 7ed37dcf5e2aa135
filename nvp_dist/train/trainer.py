"""The training loop: DeepSpeed engine, data stream, non-finite guard, evaluation and checkpoints.

One Trainer per rank. Every collective (loss/grad guard, checkpoint save, evaluation sums) runs on all
ranks in the same order; files are written by rank 0 or per rank, atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from nvp_dist.config import Config, ConfigError, to_yaml
from nvp_dist.data import cond_dim, output_shape, read_manifest, train_batches
from nvp_dist.flows import RealNVP, dequantize, set_stats_reducer, to_logit
from nvp_dist.flows.preprocess import bits_from_latents
from nvp_dist.metrics import TrainingMetrics
from nvp_dist.train import checkpoint as ckpt
from nvp_dist.train import records, safe_load, watchdog
from nvp_dist.train.distributed import (DistEnv, all_reduce_sum, average_buffers, barrier, broadcast_object,
                                        init_distributed, reduce_tensor)
from nvp_dist.train.ema import EMA, full_state_dict
from nvp_dist.train.engine import build_engine
from nvp_dist.train.evaluate import evaluate, noise_generator, write_sample_grid
from nvp_dist.train.failures import EXIT_STOPPED
from nvp_dist.train.masters import fp32_masters
from nvp_dist.train.memory import apply_memory_policy
from nvp_dist.train.speed import apply_speed_options

log = logging.getLogger("nvp_dist.train")


def peak_memory_mib(device: torch.device) -> torch.Tensor:
    """[this process's peak resident memory, the peak torch allocated on `device` (0 off CUDA)] in MiB, so
    far in the run, on `device` for the collective."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return torch.tensor([rss, cuda], dtype=torch.float64, device=device)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


def check_data(cfg: Config) -> None:
    """Fail before any training when the data cannot serve this model (raises DataError/ConfigError)."""
    manifest = read_manifest(cfg.data.path)
    shape = output_shape(cfg.data, manifest)
    m = cfg.model
    if shape != (m.in_channels, m.image_size, m.image_size):
        raise ConfigError(f"data at {cfg.data.path} yields images of shape {shape} after data.transform="
                          f"{cfg.data.transform}, but the model expects ({m.in_channels}, {m.image_size}, {m.image_size})")
    if cond_dim(cfg.data, manifest) != m.cond_dim:
        raise ConfigError(f"model.cond_dim={m.cond_dim} but data.cond={cfg.data.cond} gives "
                          f"{cond_dim(cfg.data, manifest)} conditioning values")


class Trainer:
    """`on_eval(result)` is called on every rank after each evaluation, with the result dict
    (bits_per_dim, images, step, checkpoint: the newest checkpoint directory or None); Ray Tune trials
    report through it."""

    def __init__(self, cfg: Config, resume: str = "none", on_eval: Optional[Callable[[dict], None]] = None):
        self.cfg, t = cfg, cfg.train
        self.on_eval = on_eval
        check_data(cfg)
        self.env: DistEnv = init_distributed(t.collective_timeout_s)
        env = self.env
        watchdog.start(env.rank, env.world_size, t.peer_timeout_s)
        _setup_logging(env)
        self.out = Path(t.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = RealNVP(cfg.model)
        n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        if env.world_size > 1 and t.sync_bn:
            set_stats_reducer(model, all_reduce_sum)
        apply_memory_policy(model, t.memory, t.activation_checkpointing)
        apply_speed_options(model, compile=t.compile, channels_last=t.channels_last)
        self.engine, self.optimizer, self.scheduler = build_engine(model.to(env.device), cfg, env.world_size)
        self.micro = t.batch_size // (env.world_size * t.grad_accum)
        self.ema = EMA(self.engine.module, t.ema_decay, t.zero_stage, self._masters()) if t.ema_decay > 0 else None
        self.step, self.skipped, self.last_checkpoint, self.best_eval = 0, 0, None, math.inf
        self._grad_finite = torch.ones((), device=env.device)
        # Without ZeRO in fp32, the reduced gradients sit whole in p.grad after backward and one fused norm
        # checks them (measured 0.03 s a step cheaper on the demo than a hook per parameter). ZeRO and the
        # bf16 optimiser move gradients into their own buffers as they are produced: check each one then.
        self._check_reduced_grads = t.zero_stage == 0 and t.precision == "fp32"
        self._inject_now, self._reduced_norm = False, None
        if t.inject_nan_steps and t.inject_nan_into == "grad":  # registered first: the guard sees its NaN
            next(self.engine.module.parameters()).register_hook(self._inject_grad_nan)
        if not self._check_reduced_grads:
            for p in self.engine.module.parameters():
                p.register_hook(self._watch_grad)
        self._stop_signal: Optional[int] = None
        self.saving: Optional[Path] = None
        self._resume(resume)
        self.metrics = TrainingMetrics(
            cfg.metrics, env.rank, env.local_rank,
            info={"config": cfg.name, "world_size": env.world_size, "zero_stage": t.zero_stage, "precision": t.precision},
            cuda_device=env.device.index if env.device.type == "cuda" else None)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            records.truncate(self.out / "metrics.jsonl", self.step)  # the steps after it are replayed
            log.info("nvp-dist %s: %d ranks (%s), %s parameters, global batch %d = %d x %d ranks x %d accum, "
                     "ZeRO %d, %s, checkpointing %s", cfg.name, env.world_size, env.backend,
                     f"{n_params:,}", t.batch_size, self.micro, env.world_size,
                     t.grad_accum, t.zero_stage, t.precision, t.activation_checkpointing)

    # --- the loop -------------------------------------------------------------------------------------
    def train(self) -> dict:
        t, env = self.cfg.train, self.env
        if threading.current_thread() is threading.main_thread():  # Ray Train runs us in a worker thread
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        stream = train_batches(self.cfg.data, batch_size=self.micro, rank=env.rank, world_size=env.world_size,
                               seed=t.seed, start_batch=self.step * t.grad_accum)
        consecutive, result = 0, {}
        while self.step < t.steps:
            started = time.perf_counter()
            loss, wait, skip = self._one_step(stream)
            if skip:
                self.metrics.skipped_step()
                self.skipped += 1
                consecutive += 1
                log.warning("step %d: non-finite loss or gradient on some rank; step skipped on every rank "
                            "(%d skipped in all, %d in a row)", self.step + 1, self.skipped, consecutive)
                if consecutive >= t.max_consecutive_skips:
                    raise TrainingDiverged(
                        f"{consecutive} consecutive non-finite steps up to step {self.step + 1}; last good "
                        f"checkpoint: {self.last_checkpoint or 'none'}")
            else:
                consecutive = 0
                if self.ema is not None:
                    self.ema.update(self.engine.module, self.step, self._masters())
            self.step += 1
            step_time = time.perf_counter() - started
            if not skip:
                self.metrics.step(self.step, loss, loss, self.micro * t.grad_accum, step_time, wait,
                                  self._global_grad_norm(), self.scheduler.get_last_lr()[0])
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_train(loss, step_time, wait)
            if self.step % t.eval_every == 0 or self.step == t.steps:
                result = self.evaluate_and_sample()
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.save()
            if result.get("step") == self.step and self.on_eval is not None:
                self.on_eval({**result, "checkpoint": self.last_checkpoint})
            if self._stop_requested():
                self.save()
                # Only some ranks may have been signalled themselves; the others learnt it from the reduction.
                log.warning("stopped by a termination signal at step %d after saving %s", self.step,
                            self.last_checkpoint)
                raise SystemExit(EXIT_STOPPED)
        if not result:  # resumed a run that had already finished: report it anyway, and record it unless
            # it is recorded already (a stop signal during the final evaluation abandoned it unrecorded)
            result = self.evaluate_and_sample(
                record=not records.has_event(self.out / "metrics.jsonl", "eval", self.step))
        self._finish()
        return result

    def _one_step(self, stream):
        """One optimiser step over grad_accum micro-batches; returns (mean loss, data wait, skipped)."""
        t, env = self.cfg.train, self.env
        losses, wait = [], 0.0
        finite = torch.ones((), device=env.device)
        self._grad_finite.fill_(1)
        for micro in range(t.grad_accum):
            waited = time.perf_counter()
            batch = next(stream)
            wait += time.perf_counter() - waited
            if batch.bad:
                self.metrics.bad_samples(batch.bad)
            x = batch.images.to(env.device, non_blocking=True)
            cond = batch.cond.to(env.device) if batch.cond is not None else None
            g = noise_generator(env.device, t.seed, 0, env.rank, self.step, micro)
            y, logdet_pre = to_logit(dequantize(x, generator=g), self.cfg.model.alpha)
            zs, logdet = self.engine(y, cond)
            loss = bits_from_latents(zs, logdet, logdet_pre, x[0].numel()).mean()
            self._inject_now = self.step + 1 in t.inject_nan_steps and t.inject_nan_rank in (-1, env.rank)
            if self._inject_now and t.inject_nan_into == "loss":
                loss = loss * float("nan")
            finite.mul_(torch.isfinite(loss.detach()))
            # Backward runs even on a non-finite loss: every rank must join ZeRO's gradient collectives,
            # and DeepSpeed's step expects gradients. The guard below discards the update instead.
            self.engine.backward(loss)
            losses.append(loss.item())
            if micro == t.grad_accum - 1:  # decide at the boundary, on every rank alike, before Adam runs
                if self._check_reduced_grads:
                    self._reduced_norm = grad_norm(self.engine.module)
                    grad_ok = self._reduced_norm.isfinite().float()
                else:
                    grad_ok = self._grad_finite
                local_ok = finite * grad_ok
                ok = reduce_tensor(local_ok.clone(), torch.distributed.ReduceOp.MIN)
                self.optimizer.skip_next = ok.item() == 0
                if self.optimizer.skip_next and local_ok.item() == 0:  # this rank saw it (the alert's count)
                    self.metrics.nonfinite_step()
            self.engine.step()
        if not t.sync_bn:
            average_buffers(self.engine.module)
        skipped, self.optimizer.skip_next = self.optimizer.skip_next, False
        return sum(losses) / len(losses), wait, skipped

    def _inject_grad_nan(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if self._inject_now else grad

    def _watch_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # Runs as each parameter's gradient is produced, before DeepSpeed reduces or partitions it.
        self._grad_finite.mul_(torch.isfinite(grad).all())
        return grad

    # --- evaluation, checkpoints ------------------------------------------------------------------------
    def inference_model(self) -> RealNVP:
        """A plain float32 copy with whole weights (Polyak averages when kept), on this rank's device."""
        weights = self.ema.state_dict() if self.ema is not None else self._full_state_dict()
        model = RealNVP(self.cfg.model)
        model.load_state_dict(weights)
        return model.to(self.env.device).eval()

    def _masters(self):
        """The optimiser's float32 masters by name under bf16 (None in fp32). Collective under ZeRO 1-3."""
        return fp32_masters(self.engine.module, self.engine.optimizer)

    def _full_state_dict(self):
        return full_state_dict(self.engine.module, self.cfg.train.zero_stage, self._masters())

    def evaluate_and_sample(self, record: bool = True) -> dict:
        t = self.cfg.train
        model = self.inference_model()
        result = evaluate(model, self.cfg, self.env, max_batches=t.eval_batches,
                          stop=lambda: self._stop_signal is not None, step=self.step)
        if result.get("interrupted"):
            log.warning("evaluation at step %d abandoned: stopping on a termination signal", self.step)
            return {}
        result["step"] = self.step
        self.metrics.eval(result["bits_per_dim"], self.step)
        self.best_eval = min(self.best_eval, result["bits_per_dim"])
        if self.env.is_main:
            grid = write_sample_grid(model, self.out / "samples" / f"{self.cfg.name}-step{self.step:08d}.png",
                                     t.samples_per_grid, seed=t.seed + self.step, cond=self._sample_cond(t.samples_per_grid))
            result["samples"] = str(grid)
            log.info("eval step %d: %s bits/dim on %d %s images (%s)", self.step, f"{result['bits_per_dim']:.4f}",
                     result["images"], self.cfg.data.eval_split, grid)
            if record:
                # split and data: `figures page` takes the number only for the same images
                self._record({"event": "eval", "split": self.cfg.data.eval_split, "data": str(self.cfg.data.path),
                              **result})
        return result

    def _sample_cond(self, n: int) -> Optional[torch.Tensor]:
        if not self.cfg.model.cond_dim:
            return None
        # Cycle through the conditioning values one at a time (classes; single attributes).
        return torch.eye(self.cfg.model.cond_dim, device=self.env.device)[torch.arange(n) % self.cfg.model.cond_dim]

    def save(self) -> None:
        """Collective: every rank writes its shards, then rank 0 seals the checkpoint."""
        if self.last_checkpoint and self.last_checkpoint.endswith(ckpt.tag_for(self.step)):
            return
        started = time.perf_counter()
        tmp = ckpt.tag_for(self.step) + ".tmp"
        self.saving = self.ckpt_root / tmp  # named by the failure report if a write fails
        if self.env.is_main and (self.ckpt_root / tmp).exists():
            import shutil
            shutil.rmtree(self.ckpt_root / tmp)  # left by a crash mid-save
        barrier()
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tmp, save_latest=False)
        torch.save(ckpt.rng_state(), self.ckpt_root / tmp / f"rng_rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save({
                "format_version": ckpt.FORMAT_VERSION, "step": self.step, "config": to_yaml(self.cfg),
                "data_batches": self.step * self.cfg.train.grad_accum, "skipped_steps": self.skipped,
                "best_eval": self.best_eval, "ema": self.ema.state_dict() if self.ema is not None else None,
            }, self.ckpt_root / tmp / "nvp_state.pt")
        barrier()
        if self.env.is_main:
            final = ckpt.finalize(self.ckpt_root, self.step, self.cfg.train.keep_checkpoints)
            log.info("checkpoint %s (%.1f s)", final, time.perf_counter() - started)
        barrier()
        self.last_checkpoint = str(self.ckpt_root / ckpt.tag_for(self.step))
        self.metrics.checkpoint(time.perf_counter() - started, self.step)
        self.saving = None

    def _resume(self, resume: str) -> None:
        if self.env.is_main:
            ckpt.recover(self.ckpt_root)
        barrier()
        if resume == "none":
            if ckpt.checkpoint_tags(self.ckpt_root):
                raise ConfigError(f"{self.ckpt_root} already holds checkpoints: pass --resume auto to continue "
                                  "that run, or choose another train.out_dir")
            return
        if resume == "auto":
            tag = broadcast_object(ckpt.newest_valid(self.ckpt_root) if self.env.is_main else None)
            if tag is None:
                log.info("no checkpoint under %s: starting fresh", self.ckpt_root)
                return
            tag_dir = self.ckpt_root / tag
        else:
            tag_dir = Path(resume)
            problem = ckpt.verify(tag_dir)
            if problem is not None:
                raise ConfigError(f"--resume {resume}: {problem}")
        safe_load.check_deepspeed_files(tag_dir)  # DeepSpeed unpickles them with the full unpickler
        path, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
        state = ckpt.read_nvp_state(tag_dir)
        self.step, self.skipped, self.best_eval = state["step"], state["skipped_steps"], state["best_eval"]
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        rng = tag_dir / f"rng_rank{self.env.rank}.pt"
        if rng.is_file():
            ckpt.set_rng_state(ckpt.read_rng_state(rng))
        self.last_checkpoint = str(tag_dir)
        log.info("resumed from %s at step %d", tag_dir, self.step)

    # --- signals, logging, the end ---------------------------------------------------------------------
    def close(self) -> None:
        self.metrics.close()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    @property
    def stop_requested(self) -> bool:
        return self._stop_signal is not None

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current step (abandoning an evaluation), checkpoint, and raise SystemExit(143):
        what SIGTERM does, for callers whose signals reach another thread (Ray Train workers)."""
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self._stop_signal is not None), device=self.env.device)
        return reduce_tensor(flag, torch.distributed.ReduceOp.MAX).item() > 0

    def _log_train(self, loss: float, step_time: float, wait: float) -> None:
        mean = reduce_tensor(torch.tensor([loss, 1.0], dtype=torch.float64, device=self.env.device))
        grad_norm = self._global_grad_norm()
        # The largest rank's, not rank 0's: under ZeRO the ranks hold different shards, and the largest is
        # the one that runs out of memory first.
        peak = reduce_tensor(peak_memory_mib(self.env.device), torch.distributed.ReduceOp.MAX).tolist()
        record = {
            "event": "train", "step": self.step, "train_bits_per_dim": (mean[0] / mean[1]).item(),
            "images_per_s": self.cfg.train.batch_size / step_time, "step_time_s": step_time, "data_wait_s": wait,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0], "skipped_steps": self.skipped, "peak_rss_mib": peak[0],
            **({"peak_cuda_allocated_mib": peak[1]} if self.env.device.type == "cuda" else {}),
        }
        if self.env.is_main:
            log.info("step %d: train %.4f bits/dim, %.1f images/s, step %.3f s (data %.3f s), grad norm %s, lr %.2e",
                     self.step, record["train_bits_per_dim"], record["images_per_s"], step_time, wait,
                     "n/a" if grad_norm is None else f"{grad_norm:.3g}", record["lr"])
            self._record(record)

    def _global_grad_norm(self) -> Optional[float]:
        # DeepSpeed reports it under ZeRO and bf16; without ZeRO the guard computed it from the reduced gradients.
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._reduced_norm
        return None if norm is None else float(norm)

    def _record(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")  # wall clock: rates over spans

    def _finish(self) -> None:
        weights = self._full_state_dict()
        digest = hashlib.sha256()
        for k in sorted(weights):
            digest.update(k.encode())
            digest.update(weights[k].numpy().tobytes())
        (self.out / f"weights_rank{self.env.rank}.sha256").write_text(digest.hexdigest() + "\n")
        if self.env.is_main:
            from nvp_dist.train.export import export_fp32

            export_fp32(Path(self.last_checkpoint), self.out / "model_fp32.pt")
            log.info("exported %s", self.out / "model_fp32.pt")
        barrier()


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all of p.grad in one fused call; NaN or inf when any gradient element is."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _setup_logging(env: DistEnv) -> None:
    # Rank 0 tells the story; other ranks speak only of trouble.
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

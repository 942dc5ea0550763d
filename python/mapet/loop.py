"""The optimisation loop every training run shares (:class:`_Loop`), and its metrics log.

Every loop (:func:`mapet.train.pretrain`, :func:`mapet.train.finetune`) shares one engine: AdamW with warm-up + cosine learning rate,
optional gradient accumulation and clipping, logging of loss / lr / images per second / ETA
through ``logging`` (and a tqdm bar with loss and img/s where a person watches: see
:mod:`mapet.progress`), and
atomic checkpoints (weights, optimizer moments, sampler and loader state, step, epoch)
after every epoch and every ``checkpoint_every`` optimizer steps. Started again with the same
``output_dir``, a run resumes from ``last.safetensors`` and continues exactly as if it had
never stopped (bitwise, for a fixed thread count). ``<output_dir>/log.csv`` gets one row per
optimizer step (:class:`MetricsLog`; TensorBoard event files too with ``tensorboard=True``).

Under ``mpiexec -n N`` the same loops run data-parallel (:mod:`mapet.distributed`): the
loader is sharded so that ``batch_size`` is per rank (global batch N × batch_size), the ranks
check they run the same configuration, start from rank 0's parameters, average their
gradients weighted by sample counts before every optimizer step, and only rank 0 logs,
checkpoints and draws a progress bar.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import distributed
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .data import DataLoader
from .progress import bar as progress_bar
from .schedules import cosine_lr

log = logging.getLogger("mapet.train")  # the loops' log lines keep their logger name


class MetricsLog:
    """``<dir>/log.csv``: one row per optimizer step (step, epoch, loss, lr, images/s), and the same
    scalars as TensorBoard event files in ``<dir>/tensorboard`` when asked (needs ``tensorboardX``
    or ``torch``). A resumed run first drops the rows after its checkpoint's step, so the file
    always describes one uninterrupted run.
    """

    HEADER = "step,epoch,loss,lr,images_per_s"

    def __init__(self, directory: str, resumed_step: int = 0, tensorboard: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "log.csv")
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.read().splitlines()
            rows = [r for r in lines[1:] if r and r.split(",")[0].isdigit() and int(r.split(",")[0]) <= resumed_step]
        with open(self.path, "w") as f:
            f.write("\n".join([self.HEADER] + rows) + "\n")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ImportError("tensorboard: writing TensorBoard event files needs tensorboardX "
                                      "(pip install tensorboardX) or torch") from None
            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=resumed_step + 1)

    def write(self, step: int, epoch: int, loss: float, lr: float, rate: float) -> None:
        self._file.write(f"{step},{epoch},{loss:.9g},{lr:.9g},{rate:.4g}\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in (("loss", loss), ("lr", lr), ("images_per_s", rate)):
                self._tb.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class _Loop:
    """The optimisation loop shared by every method.

    ``step_fn(batch) -> (loss, n_samples)`` runs forward and backward for one micro-batch and
    adds into the model's gradients; the loop averages accumulated micro-batches, clips (in the
    optimizer), steps with the scheduled learning rate and checkpoints.
    """

    def __init__(self, model, optimizer, loader: DataLoader, step_fn: Callable, *, epochs: int,
                 lr: float, warmup_epochs: float = 0.0, min_lr: float = 1e-6, warmup_start_lr: float = 1e-6,
                 accum_steps: int = 1, output_dir: Optional[str] = None, checkpoint_every: int = 0,
                 states: Optional[Dict[str, Any]] = None, log_every: int = 10, progress: Optional[bool] = None,
                 desc: str = "train", config: Optional[Dict[str, Any]] = None, seed: int = 0,
                 precision: Optional[str] = None, epoch_end: Optional[Callable[[int], None]] = None,
                 tensorboard: bool = False):
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        self.model, self.optimizer, self.loader, self.step_fn = model, optimizer, loader, step_fn
        self.epochs, self.lr, self.min_lr, self.warmup_start_lr = int(epochs), float(lr), float(min_lr), float(warmup_start_lr)
        self.accum = int(accum_steps)
        self.ctx = distributed.context()
        if self.ctx.distributed:
            loader.shard(self.ctx.rank, self.ctx.world_size)
        self.steps_per_epoch = -(-len(loader) // self.accum)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup_steps = min(int(round(warmup_epochs * self.steps_per_epoch)), self.total_steps)
        self.output_dir, self.checkpoint_every = output_dir, int(checkpoint_every)
        self.states = dict(states or {})
        self.log_every, self.progress, self.desc = max(1, int(log_every)), progress, desc
        self.config = dict(config or {})
        self.tensorboard = bool(tensorboard)
        self.epoch_end = epoch_end  # called with the epoch number after each full epoch, before its checkpoint
        # The model's matrix-product precision is part of the run: stored in checkpoints, and a
        # resumed run keeps the stored one unless `precision` asks for another.
        self.requested_precision = precision
        if precision is not None:
            model.precision = precision
        if hasattr(model, "precision"):
            self.config["precision"] = model.precision
        self.step = 0
        self.micro = 0  # micro-batches run so far: seeds the model's drop-path stream
        self.seed = int(seed)
        self.history: Dict[str, List[float]] = {"loss": [], "lr": []}
        self.comm_seconds = 0.0  # time in gradient/loss all-reduces (distributed runs)
        self.hparams = {"epochs": self.epochs, "lr": self.lr, "min_lr": self.min_lr,
                        "warmup_start_lr": self.warmup_start_lr, "warmup_steps": self.warmup_steps,
                        "accum_steps": self.accum, "batch_size": loader.batch_size, "samples": len(loader.dataset),
                        "seed": self.seed, "world_size": self.ctx.world_size}

    # -------------------------------------------------------------- checkpoints

    def _save(self) -> None:
        if not self.output_dir or not self.ctx.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)  # a directory: resume looks for <dir>/last.safetensors
        opt = dict(self.optimizer.state_dict())
        groups = {"model": self.model.state_dict(),
                  "optimizer.exp_avg": opt.pop("exp_avg"), "optimizer.exp_avg_sq": opt.pop("exp_avg_sq")}
        state = {"step": self.step, "micro": self.micro, "epoch": self.loader.epoch,
                 "loader": self.loader.state_dict(), "optimizer": opt, "history": self.history,
                 "config": self.config, "states": {k: s.state_dict() for k, s in self.states.items()}}
        save_checkpoint(self.output_dir, groups, state)

    def _resume(self) -> bool:
        path = find_checkpoint(self.output_dir) if self.output_dir else None
        if path is None:
            return False
        groups, state = load_checkpoint(path)
        self.model.load_state_dict(groups["model"], strict=True)
        opt = dict(state["optimizer"])
        opt["exp_avg"], opt["exp_avg_sq"] = groups["optimizer.exp_avg"], groups["optimizer.exp_avg_sq"]
        self.optimizer.load_state_dict(opt)
        self.loader.load_state_dict(state["loader"])
        self.micro = int(state["micro"])
        for k, s in self.states.items():
            s.load_state_dict(state["states"][k])
        self.step, self.history = int(state["step"]), state["history"]
        stored = state.get("config", {}).get("precision")
        if stored is not None and self.requested_precision is None and hasattr(self.model, "precision"):
            self.model.precision = stored
            self.config["precision"] = stored
        log.info("%s: resumed from %s at step %d/%d", self.desc, path, self.step, self.total_steps)
        return True

    def _synchronize(self) -> None:
        """Distributed start: same config and code everywhere, same resumed state, rank 0's weights."""
        ctx = self.ctx
        distributed.check_same_everywhere(ctx, {"config": self.config, "hparams": self.hparams},
                                          "the run's configuration or the mapet build")
        distributed.check_same_everywhere(
            ctx, {"step": self.step, "micro": self.micro, "loader": self.loader.state_dict()},
            "the resumed state (is the checkpoint directory on a file system every rank sees?)")
        distributed.broadcast_parameters(ctx, self.model.flat_params)
        moments = [getattr(self.optimizer, a) for a in ("_m", "_v") if hasattr(self.optimizer, a)]
        distributed.check_equal(ctx, "optimizer moments", *moments)

    def _align_streams(self):
        """Distributed runs: point every per-sample random stream (a sampler state with
        ``samples_drawn``) at this rank's offset inside the current global batch, so the ranks
        together draw exactly what one process would; returns (state, global end) pairs."""
        offset, length = self.loader.shard_span(self.loader.position - 1)
        out = []
        for state in self.states.values():
            st = state.state_dict()
            if "samples_drawn" in st:
                start = int(st["samples_drawn"])
                state.load_state_dict(dict(st, samples_drawn=start + offset))
                out.append((state, start + length))
        return out

    # -------------------------------------------------------------- the loop

    def run(self, stop_after: Optional[int] = None) -> Dict[str, List[float]]:
        """Train to the end (or until ``stop_after`` optimizer steps have been taken in total)."""
        self._resume()
        if self.ctx.distributed:
            self._synchronize()
        bar = progress_bar(self.total_steps, self.desc, initial=self.step, unit="step", progress=self.progress)
        metrics = (MetricsLog(self.output_dir, self.step, tensorboard=self.tensorboard)
                   if self.output_dir and self.ctx.is_main else None)
        t0, done0 = time.perf_counter(), self.step
        t_step, seen_step = t0, 0
        seen = 0
        try:
            pending, losses, local = 0, [], 0  # micro-batches, their losses and samples since the last step
            self.optimizer.zero_grad()
            while self.step < self.total_steps:
                epoch = self.loader.epoch
                for batch in self.loader:
                    # Drop path draws from a stream fixed by (seed, micro-batch number): a resumed
                    # run continues the same random sequence without storing generator state.
                    # rank r of W draws stream micro·W + r: one process (W = 1) keeps stream = micro
                    self.model.reseed(self.seed, self.micro * self.ctx.world_size + self.ctx.rank)
                    self.micro += 1
                    pending += 1
                    streams = self._align_streams() if self.ctx.distributed else None
                    if batch is not None:  # None: this rank's part of the last global batch is empty
                        loss, n = self.step_fn(batch)  # a non-finite loss raises in the engine, grads untouched
                        losses.append(loss)
                        local += n
                        seen += n * self.ctx.world_size
                    if streams is not None:
                        for state, end in streams:
                            state.load_state_dict(dict(state.state_dict(), samples_drawn=end))
                    end_of_epoch = self.loader.position >= len(self.loader)
                    if pending < self.accum and not end_of_epoch:
                        continue
                    self._optimizer_step(losses, local)
                    pending, losses, local = 0, [], 0
                    if metrics is not None:
                        now = time.perf_counter()
                        metrics.write(self.step, epoch, self.history["loss"][-1], self.history["lr"][-1],
                                      (seen - seen_step) / max(now - t_step, 1e-9))
                        t_step, seen_step = now, seen
                    if bar is not None:
                        bar.set_postfix(loss=f"{self.history['loss'][-1]:.4f}",
                                        img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
                        bar.update(1)
                    if self.step % self.log_every == 0 or self.step == self.total_steps:
                        elapsed = time.perf_counter() - t0
                        rate = seen / max(elapsed, 1e-9)
                        eta = elapsed / max(self.step - done0, 1) * (self.total_steps - self.step)
                        log.info("%s step %d/%d epoch %d loss %.4f lr %.3g %.1f img/s ETA %.0fs", self.desc,
                                 self.step, self.total_steps, epoch, self.history["loss"][-1],
                                 self.history["lr"][-1], rate, eta)
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self._save()
                    if stop_after is not None and self.step >= stop_after:
                        self._save()
                        return self.history
                    if self.step >= self.total_steps:
                        break
                finished = ((self.loader.epoch, self.loader.position) == (epoch + 1, 0)
                            or (self.loader.epoch == epoch and self.loader.position >= len(self.loader)))
                if self.epoch_end is not None and finished:
                    self.epoch_end(epoch)
                self._save()
            return self.history
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()

    def _optimizer_step(self, losses: List[float], local: int) -> None:
        """Average the accumulated micro-batch gradients (over ranks too), step, record.

        ``losses`` are this rank's non-empty micro-batch mean losses, ``local`` their samples.
        Each rank's gradient is the mean of its micro-batch means; across ranks it is weighted
        by ``local`` (exactly the combined-batch gradient when micro-batches are equal-sized).
        """
        grads = self.model.flat_grads
        if len(losses) > 1:
            grads *= np.float32(1.0 / len(losses))
        loss = float(np.mean(losses)) if losses else 0.0
        if self.ctx.distributed:
            t0 = time.perf_counter()
            stats = self.ctx.allreduce_(np.array([local, loss * local], dtype=np.float64))
            total = int(round(stats[0]))
            distributed.average_gradients(self.ctx, grads, local, total)
            loss = float(stats[1] / max(total, 1))
            self.comm_seconds += time.perf_counter() - t0
        lr = cosine_lr(self.step, self.total_steps, self.lr, self.warmup_steps, self.warmup_start_lr, self.min_lr)
        self.optimizer.step(lr=lr)
        self.optimizer.zero_grad()
        self.step += 1
        self.history["loss"].append(loss)
        self.history["lr"].append(lr)


def _make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), clip_grad: Optional[float] = None,
                    layer_decay: Optional[float] = None):
    from .optim import AdamW
    if layer_decay == 1.0:
        layer_decay = None
    return AdamW(model, lr=lr, betas=betas, weight_decay=weight_decay, layer_decay=layer_decay, clip_grad=clip_grad)

"""Training loops in Python over the Swift steps: pre-training, fine-tuning, linear probing.

Every loop shares one engine (:class:`_Loop`): AdamW with warm-up + cosine learning rate,
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

import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import distributed
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .data import ArrayDataset, DataLoader
from .data.datasets import DatasetView
from .progress import bar as progress_bar
from .schedules import cosine_lr

log = logging.getLogger(__name__)

PRETRAIN_METHODS = ("mapet", "pim", "mim", "ccvit", "dtm")


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
                    loss, n = self.step_fn(batch)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"{self.desc}: loss is {loss} at step {self.step}; "
                                                 "lower the learning rate or check the inputs")
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
                    if bar is not None:
                        bar.close()
                    if metrics is not None:
                        metrics.close()
                    return self.history
                if self.step >= self.total_steps:
                    break
            finished = ((self.loader.epoch, self.loader.position) == (epoch + 1, 0)
                        or (self.loader.epoch == epoch and self.loader.position >= len(self.loader)))
            if self.epoch_end is not None and finished:
                self.epoch_end(epoch)
            self._save()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        return self.history

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


# ------------------------------------------------------------------ helpers

def _as_dataset(data, labels=None):
    """(images, labels) tuple, an array, or a dataset object → a dataset."""
    if isinstance(data, tuple):
        return ArrayDataset(*data)
    if isinstance(data, np.ndarray):
        return ArrayDataset(data, labels)
    return data


class _ImagesWithTokens:
    """Images [n, C, H, W] with their visual tokens [n, num_patches] (or, ``per_patch=False``, any
    per-image rows such as stored teacher features): items (image, tokens)."""

    def __init__(self, images: np.ndarray, tokens: Any, n_patches: int, per_patch: bool = True):
        if not per_patch:
            self.images, self.tokens = images, tokens
            return
        tokens = np.asarray(tokens)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens: expected an integer array, got dtype {tokens.dtype}")
        if tokens.shape != (images.shape[0], n_patches):
            raise ValueError(f"tokens: expected shape ({images.shape[0]}, {n_patches}) (one token per patch of "
                             f"every image), got {tokens.shape}")
        self.images, self.tokens = images, tokens

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple:
        return self.images[i], self.tokens[i]

    def get_batch(self, indices: np.ndarray) -> tuple:
        return self.images[indices], np.ascontiguousarray(self.tokens[indices])


class _WithRows(DatasetView):
    """A dataset whose items gain one row of ``rows`` (e.g. precomputed teacher features) last."""

    def __init__(self, dataset: Any, rows: Any) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return tuple(self.dataset[i]) + (np.asarray(self.rows[i]),)

    def get_batch(self, indices: np.ndarray) -> tuple:
        return tuple(self.dataset.get_batch(indices)) + (np.asarray(self.rows[np.asarray(indices)]),)


def _first_images(data: Any) -> np.ndarray:
    """The first image of arrays or a dataset, as a batch of one [1, C, H, W] float32."""
    if isinstance(data, (np.ndarray, tuple)):
        return _images_of(data)[:1]
    return np.ascontiguousarray(np.asarray(data[0][0], np.float32)[None])


class _StepSeeds:
    """One derived seed per training step from (seed, step): a resumable stream for DTM's
    per-step morphing schedules. Every rank of a distributed run draws the same seed for the
    same global step, as one process would for the whole batch."""

    def __init__(self, seed: int) -> None:
        self.seed, self.steps_drawn = int(seed), 0

    def next(self) -> int:
        s = np.random.SeedSequence([self.seed & ((1 << 64) - 1), 0xCC, self.steps_drawn]).generate_state(1, np.uint64)[0]
        self.steps_drawn += 1
        return int(s) >> 1  # a non-negative int64

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "steps_drawn": self.steps_drawn}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"step seeds: checkpoint seed {state['seed']} differs from this run's seed {self.seed}")
        self.steps_drawn = int(state["steps_drawn"])


class _SampleStreams:
    """A seed and a count of samples drawn: image i of a batch uses random stream
    ``samples_drawn + i`` (CCViT's choice of replaced patches). Distributed runs point
    ``samples_drawn`` at the rank's offset in the global batch (``_Loop._align_streams``), so the
    ranks together draw what one process would."""

    def __init__(self, seed: int) -> None:
        self.seed, self.samples_drawn = int(seed), 0

    def take(self, count: int) -> int:
        first, self.samples_drawn = self.samples_drawn, self.samples_drawn + int(count)
        return first

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "samples_drawn": self.samples_drawn}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sample streams: checkpoint seed {state['seed']} differs from this run's seed {self.seed}")
        self.samples_drawn = int(state["samples_drawn"])


def _centroids_of(tokenizer: Any) -> np.ndarray:
    """The centroid pixels [K, C·P·P] of a PixelTokenizer, a path to one, or an array."""
    if tokenizer is None:
        raise ValueError("pretrain(method='ccvit'): needs tokenizer= (the PixelTokenizer, its file, or its "
                         "centroids [K, C·P·P]) to replace patches by their centroid's pixels")
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from .tokenizers import PixelTokenizer
        tokenizer = PixelTokenizer.load(tokenizer)
    centroids = getattr(tokenizer, "centroids", tokenizer)
    c = np.asarray(centroids, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"tokenizer: expected centroids [K, C·P·P], got shape {c.shape}")
    return c


def teacher_features(teacher: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function images → teacher features [B, n(+1), d] for DTM.

    Args:
        teacher: a callable (images → features), a model with ``forward_features`` (e.g. a
            ``mapet.VisionTransformer``), or the path of a mapet model file: a ViT, or a
            pre-training model (MaPeT, BEiT, …) whose trunk weights are loaded into a ViT of the
            same shape. Its features are those of the final norm, class token first (dropped by
            :meth:`mapet.DTM.train_step`). A CLIP ViT tower (``mapet.clip``) or CLIP checkpoint file
            gives its ``ln_post`` tokens through ``proj`` on CLIP-preprocessed images (SPEC §5).
    """
    from .clip.kclip import clip_teacher
    clip = clip_teacher(teacher)
    if clip is not None:
        return clip
    if isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
        from .models import VisionTransformer, load, load_pretrained
        model = load(teacher)
        if not isinstance(model, VisionTransformer):
            keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                    "qkv_bias", "init_values")
            vit = VisionTransformer(global_pool="token", drop_path_rate=0.0, **{k: model.config[k] for k in keys})
            report = load_pretrained(vit, model.state_dict())
            trunk_missing = [k for k in report["missing"] if not k.startswith("head.") and not k.startswith("fc_norm.")]
            if trunk_missing:
                raise ValueError(f"teacher: {teacher} does not hold a full ViT trunk (missing {trunk_missing})")
            model = vit
        teacher = model
    if hasattr(teacher, "forward_features"):
        return teacher.forward_features
    if callable(teacher):
        return teacher
    raise TypeError(f"teacher: expected a callable, a model with forward_features, or a model file path, "
                    f"got {type(teacher).__name__}")


def _make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), clip_grad: Optional[float] = None,
                    layer_decay: Optional[float] = None):
    from .optim import AdamW
    if layer_decay == 1.0:
        layer_decay = None
    return AdamW(model, lr=lr, betas=betas, weight_decay=weight_decay, layer_decay=layer_decay, clip_grad=clip_grad)


def _check_method(method: str) -> str:
    m = method.lower()
    if m == "beit":
        m = "mim"
    if m not in PRETRAIN_METHODS:
        raise ValueError(f"method must be one of {PRETRAIN_METHODS}, got {method!r}")
    return m


# ------------------------------------------------------------------ pre-training

def pretrain(method: str = "mapet", *, model: Any = "tiny", data: Any, tokens: Optional[np.ndarray] = None,
             epochs: int = 10, batch_size: int = 64, lr: float = 1.5e-3, weight_decay: float = 0.05,
             warmup_epochs: float = 1.0, min_lr: float = 1e-5, warmup_start_lr: float = 1e-6, workers: int = 0,
             tensorboard: bool = False,
             clip_grad: Optional[float] = 3.0, accum_steps: int = 1, least_number: Optional[int] = None,
             num_masking_patches: Optional[int] = None, seed: int = 0, output_dir: Optional[str] = None,
             checkpoint_every: int = 0, log_every: int = 10, progress: Optional[bool] = None,
             stop_after: Optional[int] = None, tokenizer: Any = None, num_replace: Optional[int] = None,
             token_weight: float = 1.0, pixel_weight: float = 1.0, teacher: Any = None,
             precision: Optional[str] = None,
             **model_overrides) -> Tuple[Any, Dict[str, List[float]]]:
    """Pre-train a ViT with MaPeT, PIM, MIM (BEiT), CCViT or DTM.

    Args:
        method: "mapet", "pim", "mim" (alias "beit"), "ccvit" or "dtm".
        model: a model built by ``mapet.create_model`` for this method, or a size
            ("tiny" | "small" | "base") to build ``<method>_<size>_patch16_224`` with
            ``model_overrides`` (e.g. ``img_size=32, patch_size=4, depth=4``).
        data: images [n, 3, H, W] float32 in [0, 1], an (images, labels) tuple, or a dataset.
        tokens: visual tokens [n, num_patches] (any integer dtype), aligned with ``data``; when
            ``data`` is a dataset yielding (image, label, tokens) leave it None.
        epochs, batch_size, lr, weight_decay, warmup_epochs, min_lr, warmup_start_lr: the recipe
            (AdamW, linear warm-up then cosine; lr per optimizer step).
        workers: threads decoding images of a streaming dataset (e.g. ``ImageFolder``); results
            do not depend on it.
        tensorboard: with ``output_dir``, also write TensorBoard event files (``log.csv`` is
            always written there: step, epoch, loss, lr, images/s).
        clip_grad: global gradient-norm clip (None: off).
        accum_steps: micro-batches per optimizer step (effective batch = batch_size × accum_steps).
        least_number: MaPeT/PIM context size (default: the model's); num_masking_patches: MIM,
            CCViT and DTM block-mask size (default: 75/196 of the patches, rounded).
        seed: seeds the loader, the permutation sampler / mask generator / CCViT replacement /
            DTM schedules and the model's RNG.
        output_dir: where checkpoints go; a run with an existing ``last.safetensors`` resumes.
        stop_after: stop after this many optimizer steps in total (checkpointing first).
        progress: a tqdm bar with loss and img/s: None draws it in a terminal or notebook (not in
            CI, not on MPI ranks ≠ 0; :mod:`mapet.progress`), True always, False never.
        tokenizer: CCViT: the ``PixelTokenizer`` that made ``tokens`` (or its file, or its
            centroids [K, C·P·P]); the replaced patches take their centroid's pixels. With a
            ``PixelTokenizer`` and images in memory, ``tokens`` may be left out: they are encoded once.
        num_replace: CCViT: visible patches replaced per image (default 20/196 of the patches).
        token_weight, pixel_weight: CCViT loss weights (1 : 1).
        teacher: DTM: the frozen teacher (see :func:`teacher_features`), run on every batch; or
            its features precomputed once, an array [len(data), num_patches (+1), d] aligned with
            ``data`` (memory-mapped arrays work). ``tokens`` is unused. A model given by size gets
            ``output_dim`` from the teacher's feature dimension.
        precision: "fp32" or "bf16" for the model's matrix products (``model.precision``); None
            keeps the model's, or on resume the precision stored in the checkpoint.

    Returns:
        (model, history) with history {"loss": [...], "lr": [...]} per optimizer step.
    """
    from .models import create_model
    from .sampling import BlockMaskGenerator, PermutationSampler

    method = _check_method(method)
    stored = method == "dtm" and isinstance(teacher, np.ndarray)  # precomputed features, one row per image
    features = teacher_features(teacher) if method == "dtm" and not stored else None
    if method == "dtm" and isinstance(model, str) and "output_dim" not in model_overrides:
        if stored:
            model_overrides["output_dim"] = int(teacher.shape[-1])
        else:
            probe = _first_images(data)
            model_overrides["output_dim"] = int(np.asarray(features(np.asarray(probe, np.float32))).shape[-1])
    if isinstance(model, str):
        name = model if "_" in model else f"{'beit' if method == 'mim' else method}_{model}_patch16_224"
        model = create_model(name, **model_overrides)
    expected = {"mapet": "mapet", "pim": "pim", "mim": "beit", "ccvit": "ccvit", "dtm": "dtm"}[method]
    if getattr(model, "_kind", None) != expected:
        raise ValueError(f"model: method {method!r} needs a {expected}_* model, got {type(model).__name__}"
                         f" ({getattr(model, '_kind', 'not a pre-training model')})")
    cfg = model.config
    grid = cfg["img_size"] // cfg["patch_size"]
    n_patches = grid * grid
    if stored:
        count = len(data[0]) if isinstance(data, tuple) else len(data)
        if teacher.ndim != 3 or teacher.shape[0] != count or teacher.shape[1] not in (n_patches, n_patches + 1):
            raise ValueError(f"teacher: precomputed features must be [{count}, {n_patches} (or {n_patches + 1} "
                             f"with a class token), d] (one row per image of data), got {teacher.shape}")
        if isinstance(data, (np.ndarray, tuple)):
            dataset = _ImagesWithTokens(_images_of(data), teacher, n_patches, per_patch=False)
        else:  # a streaming dataset: each item gains its feature rows
            dataset = _WithRows(data, teacher)
    elif tokens is not None:
        dataset = _ImagesWithTokens(_images_of(data), tokens, n_patches)
    elif method == "ccvit" and hasattr(tokenizer, "encode") and isinstance(data, (np.ndarray, tuple)):
        images = _images_of(data)  # centroid ids of the clean patches, computed once
        dataset = _ImagesWithTokens(images, tokenizer.encode(images), n_patches)
    else:
        dataset = _as_dataset(data)
    loader = DataLoader(dataset, batch_size, shuffle=True, seed=seed, prefetch=1, workers=workers)
    states: Dict[str, Any] = {}
    if method in ("mapet", "pim"):
        sampler = PermutationSampler(n_patches, least_number=least_number or cfg["least_number"], seed=seed)
        states["sampler"] = sampler

        def step_fn(batch):
            images, toks = batch[0], batch[-1]
            perm = sampler.sample(images.shape[0])
            return model.train_step(images, toks, perm), images.shape[0]
    else:  # mim, ccvit, dtm: BEiT block masks
        count = num_masking_patches or int(round(n_patches * 75 / 196))
        masks = BlockMaskGenerator(grid, count, min_num_patches=min(16, count), seed=seed)
        states["masks"] = masks
    if method == "mim":
        def step_fn(batch):
            images, toks = batch[0], batch[-1]
            return model.train_step(images, toks, masks.sample(images.shape[0])), images.shape[0]
    elif method == "ccvit":
        from .objectives import ccvit_corrupt, ccvit_pixel_targets
        centroids = _centroids_of(tokenizer)
        patch = cfg["patch_size"]
        if centroids.shape[1] != cfg["in_chans"] * patch * patch or centroids.shape[0] != cfg["num_tokens"]:
            raise ValueError(f"tokenizer: {centroids.shape[0]} centroids of {centroids.shape[1]} values; the model "
                             f"needs {cfg['num_tokens']} of {cfg['in_chans'] * patch * patch} (in_chans·patch²)")
        replace = int(round(n_patches * 20 / 196)) if num_replace is None else int(num_replace)
        streams = _SampleStreams(seed)
        states["replace"] = streams

        def step_fn(batch):
            images, toks = np.asarray(batch[0], np.float32), batch[-1]
            mask = masks.sample(images.shape[0])
            corrupted, replaced = ccvit_corrupt(images, mask, toks, centroids, replace, seed=streams.seed,
                                                first_sample=streams.take(images.shape[0]), patch_size=patch)
            targets = ccvit_pixel_targets(images, patch)
            return model.train_step(corrupted, toks, targets, mask, replaced, token_weight=token_weight,
                                    pixel_weight=pixel_weight), images.shape[0]
    elif method == "dtm":
        from .objectives import DTMSchedule
        seeds = _StepSeeds(seed)
        states["schedules"] = seeds

        def step_fn(batch):
            images = np.asarray(batch[0], np.float32)
            target = np.asarray(batch[-1] if stored else features(images), np.float32)
            schedules = DTMSchedule(seeds.next()).draw(n_patches)
            return model.train_step(images, target, masks.sample(images.shape[0]), schedules=schedules), images.shape[0]
    optimizer = _make_optimizer(model, lr, weight_decay, clip_grad=clip_grad)
    loop = _Loop(model, optimizer, loader, step_fn, epochs=epochs, lr=lr, warmup_epochs=warmup_epochs,
                 min_lr=min_lr, warmup_start_lr=warmup_start_lr, accum_steps=accum_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, states=states, log_every=log_every, progress=progress,
                 desc=f"pretrain[{method}]", config={"method": method, "model": cfg}, seed=seed,
                 precision=precision, tensorboard=tensorboard)
    history = loop.run(stop_after=stop_after)
    return model, history


# ------------------------------------------------------------------ transfer

def finetune(model: Any, train: Any, *, val: Any = None, num_classes: Optional[int] = None,
             pretrained: Any = None, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
             weight_decay: float = 0.05, layer_decay: Optional[float] = 0.75, warmup_epochs: float = 1.0,
             min_lr: float = 1e-6, warmup_start_lr: float = 1e-6, label_smoothing: float = 0.1,
             clip_grad: Optional[float] = None, accum_steps: int = 1, seed: int = 0,
             output_dir: Optional[str] = None, checkpoint_every: int = 0, log_every: int = 10,
             progress: Optional[bool] = None, stop_after: Optional[int] = None, precision: Optional[str] = None,
             workers: int = 0, validate_every_epoch: bool = False, tensorboard: bool = False,
             mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
             **model_overrides) -> Tuple[Any, Dict[str, List[float]]]:
    """Fine-tune a ViT classifier end to end (optionally from a pre-training checkpoint).

    Args:
        model: a ``mapet.create_model`` classifier, or a name such as ``"vit_tiny_patch16_224"``.
        train: (images, labels) or a dataset of (image, label).
        val: optional held-out (images, labels) or labelled dataset, evaluated after training
            (``history["val_top1"]``), or after every epoch with ``validate_every_epoch``: then
            ``history["val_top1"]`` has one entry per epoch, ``history["best_val_top1"]`` the best,
            and ``<output_dir>/best.safetensors`` (a ``mapet.load``-able model file) its weights.
        num_classes: classes (default: max label + 1 of ``train`` when given as arrays).
        pretrained: path or state_dict of a pre-trained model (matching keys are copied).
        layer_decay: BEiT layer-wise lr decay (None or 1.0: off); label_smoothing: CE smoothing.
        precision: "fp32" or "bf16" for the model's matrix products, training and the ``val``
            evaluation; None keeps the model's (on resume: the checkpoint's).
        workers: threads decoding images of a streaming dataset (``ImageFolder``).
        tensorboard: also write TensorBoard event files beside ``<output_dir>/log.csv``.
        mixup, cutmix, mixup_prob, mixup_switch_prob: per-batch Mixup / CutMix (timm's names;
            the BEiT/MaPeT recipe is 0.8, 1.0, 1.0, 0.5 = ``mapet.data.mixup.RECIPE``; 0, 0: off).
            Mixed batches train on soft targets with ``label_smoothing`` folded in; the draws
            follow (seed, epoch, batch), so resumed runs mix identically (:class:`mapet.data.mixup.Mixup`).
        Other arguments as in :func:`pretrain`.

    Returns:
        (model, history).
    """
    from .models import create_model

    dataset = _as_dataset(train)
    if isinstance(model, str):
        if num_classes is None:
            num_classes = int(np.max(_labels_of(dataset))) + 1
        model = create_model(model, num_classes=num_classes, pretrained=pretrained, **model_overrides)
    loader = DataLoader(dataset, batch_size, shuffle=True, seed=seed, prefetch=1, workers=workers)
    from .data.mixup import make_mixup
    mixer = make_mixup(int(model.config["num_classes"]), mixup, cutmix, mixup_prob, mixup_switch_prob,
                       label_smoothing, seed)

    def step_fn(batch):
        images, labels = batch[0], batch[1]
        if mixer is not None:  # the loader has counted this batch: it is position - 1 of its epoch
            images, targets = mixer(images, labels, loader.epoch, loader.position - 1)
            return model.train_step(images, targets), images.shape[0]
        return model.train_step(images, labels, label_smoothing=label_smoothing), images.shape[0]

    optimizer = _make_optimizer(model, lr, weight_decay, clip_grad=clip_grad, layer_decay=layer_decay)
    loop: Optional[_Loop] = None

    def validate(epoch: int) -> None:
        # history lives in the checkpoint, so a resumed run keeps the earlier epochs' scores
        top1 = evaluate(model, val, workers=workers)["top1"]
        scores = loop.history.setdefault("val_top1", [])
        best = max(scores) if scores else -1.0
        scores.append(top1)
        log.info("finetune epoch %d: val top-1 %.4f (best %.4f)", epoch, top1, max(best, top1))
        if top1 > best and output_dir and distributed.context().is_main:
            model.save(os.path.join(output_dir, "best.safetensors"))

    every = validate_every_epoch and val is not None
    loop = _Loop(model, optimizer, loader, step_fn, epochs=epochs, lr=lr, warmup_epochs=warmup_epochs,
                 min_lr=min_lr, warmup_start_lr=warmup_start_lr, accum_steps=accum_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, log_every=log_every, progress=progress, desc="finetune",
                 config=dict({"model": model.config}, **({"mixup": mixer.config} if mixer else {})),
                 seed=seed, precision=precision,
                 epoch_end=validate if every else None, tensorboard=tensorboard)
    history = loop.run(stop_after=stop_after)
    if every:
        history["best_val_top1"] = max(history["val_top1"]) if history.get("val_top1") else None
    elif val is not None:
        history["val_top1"] = [evaluate(model, val, workers=workers)["top1"]]
    return model, history


def _ordered_batches(data: Any, batch_size: int, workers: int = 0, rows: Optional[slice] = None):
    """(images, labels or None) in dataset order, ``batch_size`` at a time: arrays are sliced,
    datasets are streamed through a :class:`DataLoader` (bounded memory)."""
    if isinstance(data, (np.ndarray, tuple)):
        images = _images_of(data)
        labels = _labels_of(data) if isinstance(data, tuple) else None
        if rows is not None:
            images, labels = images[rows], (labels[rows] if labels is not None else None)
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size], (labels[i:i + batch_size] if labels is not None else None)
        return
    dataset = data
    if rows is not None:
        from .data import Subset
        dataset = Subset(data, np.arange(len(data))[rows])
    if len(dataset) == 0:
        return
    loader = DataLoader(dataset, batch_size, shuffle=False, prefetch=1, workers=workers)
    try:
        for batch in loader:
            yield np.asarray(batch[0], np.float32), (np.asarray(batch[1]) if len(batch) > 1 else None)
    finally:
        loader.close()


def _count(data: Any) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def extract_features(model: Any, data: Any, batch_size: int = 256, pool: str = "avg", workers: int = 0) -> np.ndarray:
    """Frozen features for linear probing: the final-layer patch tokens averaged ("avg") or
    the class token ("token"), [n, C] float32. ``data``: images, (images, labels) or a dataset
    (streamed: only the [n, C] features are held)."""
    out = []
    for images, _ in _ordered_batches(data, batch_size, workers):
        f = model.forward_features(images)
        out.append(f[:, 1:].mean(axis=1) if pool == "avg" else f[:, 0])
    return np.concatenate(out).astype(np.float32)


@contextlib.contextmanager
def _running_at(model: Any, precision: Optional[str]):
    """Run ``model`` at ``precision`` inside the block (None: unchanged), then restore its own."""
    if precision is None:
        yield
        return
    own = model.precision
    model.precision = precision
    try:
        yield
    finally:
        model.precision = own


def _images_of(data):
    if isinstance(data, tuple):
        return np.ascontiguousarray(data[0], dtype=np.float32)
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype=np.float32)
    return np.ascontiguousarray(data.images, dtype=np.float32)


def _labels_of(data):
    if isinstance(data, tuple):
        return np.asarray(data[1]).astype(np.int64)
    from .data import dataset_targets
    return dataset_targets(data)


def linear_probe(model: Any, train: Any, val: Any = None, *, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 0.0, batch_size: int = 256, pool: str = "avg",
                 seed: int = 0, precision: Optional[str] = None, workers: int = 0) -> Dict[str, float]:
    """Linear probing: a linear classifier on frozen, standardised features (as MAE/BEiT:
    a parameter-free BatchNorm on the features, then a linear layer trained with SGD+momentum
    and a cosine schedule on softmax cross-entropy).

    Args:
        model: any mapet model with ``forward_features`` (pre-trained or not).
        train, val: (images, labels) or labelled datasets (streamed once into features).
        epochs, lr, weight_decay, batch_size: the probe's recipe.
        pool: "avg" (mean of patch tokens) or "token" (class token).
        precision: "fp32" or "bf16" for the backbone's matrix products while features are
            extracted (the model's own setting is restored); None: the model's.

    Returns:
        {"train_top1", "val_top1"} (val only when given).
    """
    from .ops import matmul

    with _running_at(model, precision):
        ftr = extract_features(model, train, pool=pool, workers=workers)
        fva = extract_features(model, val, pool=pool, workers=workers) if val is not None else None
    ytr = _labels_of(train)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    ftr = (ftr - mean) / std
    k = int(ytr.max()) + 1
    d = ftr.shape[1]
    rng = np.random.default_rng(seed)
    w = np.zeros((k, d), np.float32)
    b = np.zeros(k, np.float32)
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    steps_per_epoch = -(-len(ytr) // batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(ytr))
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            x, y = ftr[idx], ytr[idx]
            logits = matmul(x, w, trans_b=True) + b
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            p /= len(y)
            gw = matmul(p, x, trans_a=True) + weight_decay * w
            gb = p.sum(0)
            cur = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            mw = 0.9 * mw + gw
            mb = 0.9 * mb + gb
            w -= cur * mw
            b -= cur * mb
            step += 1

    def top1(f, y):
        return float(np.mean(np.argmax(matmul(f, w, trans_b=True) + b, axis=1) == y))

    result = {"train_top1": top1(ftr, ytr)}
    if val is not None:
        fva = (fva - mean) / std
        result["val_top1"] = top1(fva, _labels_of(val))
    return result


def evaluate(model: Any, data: Any, batch_size: int = 256, workers: int = 0,
             confusion: bool = False, precision: Optional[str] = None) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy and mean cross-entropy of a classifier.

    Args:
        model: a classifier (``model(images)`` → logits [B, classes]).
        data: (images, labels) or a labelled dataset (streamed in order, bounded memory).
        batch_size, workers: evaluation batch and decoding threads.
        confusion: also return ``per_class`` (accuracy of each true class; NaN for a class without
            images) and ``confusion`` (int64 [classes, classes], rows = true class, columns = predicted).
        precision: "fp32" / "bf16" runs the model's matrix products at that precision for this
            call (its own setting is restored); None: the model's.

    Returns:
        {"top1", "top5", "loss"} (+ "per_class", "confusion"); top-5 is top-k with k = min(5, classes).

    Under ``mpiexec`` every rank evaluates a contiguous share of the rows and the counts are
    summed, so every rank returns the same metrics of the whole set."""
    n = _count(data)
    ctx = distributed.context()
    share = distributed.contiguous_shard(n, ctx) if ctx.distributed else None
    classes = int(model.config["num_classes"]) if hasattr(model, "config") and "num_classes" in model.config else None
    correct, correct5, loss = 0, 0, 0.0
    matrix = np.zeros((classes, classes), np.int64) if classes else None
    with _running_at(model, precision):
        for images, y in _ordered_batches(data, batch_size, workers, rows=share):
            if y is None:
                raise ValueError("evaluate: data must carry labels ((images, labels) or a labelled dataset)")
            logits = np.asarray(model(images), dtype=np.float64)
            y = np.asarray(y, np.int64)
            if matrix is None:
                classes = logits.shape[1]
                matrix = np.zeros((classes, classes), np.int64)
            if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
                raise ValueError(f"evaluate: labels must lie in [0, {logits.shape[1]}) (the model's classes), "
                                 f"got {int(y.min())}..{int(y.max())}")
            pred = np.argmax(logits, 1)
            correct += int(np.sum(pred == y))
            k = min(5, logits.shape[1])
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            correct5 += int(np.sum(np.any(top == y[:, None], axis=1)))
            np.add.at(matrix, (y, pred), 1)
            z = logits - logits.max(1, keepdims=True)
            loss += float(np.sum(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))
    if ctx.distributed:
        correct, correct5, loss = ctx.allreduce_(np.array([correct, correct5, loss], dtype=np.float64))
        correct, correct5 = int(round(correct)), int(round(correct5))
        if matrix is not None:
            matrix = np.rint(ctx.allreduce_(matrix.astype(np.float64))).astype(np.int64)
    out: Dict[str, Any] = {"top1": correct / n, "top5": correct5 / n, "loss": loss / n}
    if confusion:
        totals = matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["per_class"] = (np.diag(matrix) / totals).tolist()
        out["confusion"] = matrix
    return out

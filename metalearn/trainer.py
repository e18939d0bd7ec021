"""The meta-training loop: sample -> step -> log -> evaluate -> checkpoint. It names no algorithm."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from metalearn import distributed
from metalearn.algorithms.base import GradientLearner, MetaLearner, SelfUpdating, TaskScores
from metalearn.checkpoint import (
    RESUME_KEYS,
    CheckpointError,
    config_changes,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from metalearn.checks import positive_int
from metalearn.metrics import (
    TensorBoardLogger,
    eval_metrics,
    lr_metrics,
    query_metric,
    speed_metrics,
    step_metrics,
    tag,
)
from metalearn.runtime import autocast, resolve_allocator, resolve_device, resolve_precision, stop_on_signal
from metalearn.stats import INTERVAL
from metalearn.tasks import Split, TaskSampler, fixed_batches

log = logging.getLogger(__name__)
LoggerFactory = Callable[..., TensorBoardLogger]


class NonFiniteLossError(RuntimeError):
    """The meta-loss or meta-gradient became NaN or infinite."""


def evaluate_tasks(algorithm: MetaLearner[Any], tasks: TaskSampler, split: Split, n_tasks: int, seed: int,
                   batch_size: int, device: torch.device, precision: torch.dtype = torch.float32) -> TaskScores:
    """Per-task scores of `algorithm` on the fixed task set (`split`, `n_tasks`, `seed`), in eval mode,
    computed in `precision` (see `runtime.resolve_precision`)."""
    was_training = algorithm.training
    algorithm.eval()
    try:
        parts = []
        for batch in fixed_batches(tasks, split, n_tasks, seed, batch_size):
            with autocast(device, precision):
                parts.append(algorithm.evaluate(batch.to(device)))
    finally:
        algorithm.train(was_training)
    return TaskScores.cat(parts)


class Trainer:
    """Meta-trains an algorithm on a task distribution and evaluates it on fixed task sets.

    Args:
        algorithm: the meta-learner (owns the model and all meta-parameters).
        tasks: the task distribution.
        optimizer: the meta-optimizer over `algorithm.parameters()`.
        logger: builds the TensorBoard logger; receives `purge_step` when resuming.
        output_dir: the run directory (checkpoints, results, pictures, event files).
        scheduler: optional learning-rate schedule, stepped once per meta-step.
        max_steps: meta-training steps.
        meta_batch_size: tasks per meta-step.
        eval_every: validate (and maybe write `best.pt`) every this many steps and at the end.
        log_every: write training scalars every this many steps.
        checkpoint_every: write `last.pt` every this many steps and at the end.
        val_tasks / test_tasks: sizes of the fixed validation and test task sets.
        val_seed / test_seed: seeds of those sets, independent of the run's seed.
        eval_batch_size: tasks per evaluation batch.
        grad_clip: clip the meta-gradient norm to this value (None: no clipping).
        device: auto, cpu or cuda[:N].
        precision: float32, bfloat16 (autocast) or auto (bfloat16 for convolutional models on CPUs with
            native bfloat16, float32 elsewhere); see `runtime.resolve_precision`.
        compile: compile the algorithm's per-task computation with torch.compile: true, false or auto
            (where it is measured to be faster; see the algorithm's `use_compile`).
        allocator: host memory management for the process: auto, retain or system; see
            `runtime.resolve_allocator`.
        seed: seed of the training-task generator.
        resume: continue from `output_dir/checkpoints/last.pt` if it exists.
        ckpt_path: continue from this checkpoint instead.
        run_config: the resolved configuration, stored in checkpoints and shown in the HParams tab.
        progress: show a progress bar.
    """

    def __init__(
        self, algorithm: MetaLearner[Any], tasks: TaskSampler, optimizer: torch.optim.Optimizer,
        logger: LoggerFactory, output_dir: Path, *, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_steps: int = 10_000, meta_batch_size: int = 25, eval_every: int = 1000, log_every: int = 50,
        checkpoint_every: int = 1000, val_tasks: int = 100, test_tasks: int = 600, val_seed: int = 1,
        test_seed: int = 2, eval_batch_size: int = 100, grad_clip: float | None = None, device: str = "auto",
        precision: str = "auto", compile: bool | str = "auto", allocator: str = "auto", seed: int = 0,
        resume: bool = False,
        ckpt_path: Path | None = None, run_config: dict[str, Any] | None = None, progress: bool = True,
    ) -> None:
        for name in ("max_steps", "meta_batch_size", "eval_every", "log_every", "checkpoint_every", "val_tasks",
                     "test_tasks", "eval_batch_size"):
            positive_int(name, locals()[name])
        self.device = resolve_device(device)
        distributed.init_process_group()  # under torchrun: the meta-batch is split across the processes
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if meta_batch_size % self.world:
            raise ValueError(f"meta_batch_size={meta_batch_size}: must be divisible by the number of processes "
                             f"({self.world})")
        if isinstance(algorithm, SelfUpdating) and self.world > 1:
            raise ValueError(f"{type(algorithm).__name__} updates its meta-parameters itself; it cannot be split "
                             "across processes")
        if isinstance(algorithm, SelfUpdating) and grad_clip is not None:
            raise ValueError(f"grad_clip={grad_clip}: {type(algorithm).__name__} updates its meta-parameters "
                             "itself, without clipping; set it to null")
        if not isinstance(algorithm, (GradientLearner, SelfUpdating)):
            raise TypeError(f"{type(algorithm).__name__} is neither a GradientLearner nor SelfUpdating "
                            "(metalearn.algorithms.base)")
        self.algorithm = algorithm.to(self.device)
        self.precision = resolve_precision(precision, self.device, algorithm.model)
        self.compiled = algorithm.use_compile(compile, self.device)
        self.allocator = resolve_allocator(allocator, self.device)
        self.tasks, self.optimizer, self.scheduler, self.make_logger = tasks, optimizer, scheduler, logger
        self.output_dir, self.ckpt_dir = output_dir, output_dir / "checkpoints"
        self.max_steps, self.meta_batch_size, self.grad_clip = max_steps, meta_batch_size, grad_clip
        self.eval_every, self.log_every, self.checkpoint_every = eval_every, log_every, checkpoint_every
        self.eval_sets = {"val": (val_tasks, val_seed), "test": (test_tasks, test_seed)}
        self.eval_batch_size, self.progress, self.config = eval_batch_size, progress, run_config or {}
        self.metric = query_metric(tasks.objective.metric)
        self.higher_is_better = tasks.objective.higher_is_better
        self.generator = torch.Generator().manual_seed(seed)
        self.step, self.best_step, self.best_metric, self.elapsed = 0, 0, math.nan, 0.0
        self._t0 = time.perf_counter()  # wall-clock origin, shifted back by the time already trained
        self.ckpt_path, self.resume, self._restored = ckpt_path, resume, False

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training stopped."""
        return {
            "step": self.step, "best_step": self.best_step, "best_metric": self.best_metric, "elapsed": self.elapsed,
            "algorithm": self.algorithm.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "rng": {"sampler": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "metric": self.metric, "higher_is_better": self.higher_is_better, "config": self.config,
        }

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        """Continue from `state`, a checkpoint read from `source` (named in errors)."""
        load_weights(self.algorithm, state["algorithm"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["rng"]["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.best_step, self.best_metric = state["step"], state["best_step"], state["best_metric"]
        self.elapsed = state["elapsed"]

    def save(self, name: str) -> Path:
        """Write the current state to `checkpoints/<name>` atomically (rank 0 only: all ranks are alike)."""
        self.elapsed = time.perf_counter() - self._t0
        path = self.ckpt_dir / name
        if self.rank == 0:
            save_checkpoint(self.state(), path)
        return path

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, split: Split) -> dict[str, float]:
        """Scores on the fixed task set of `split`: mean and 95% CI over tasks, before/after adaptation."""
        n_tasks, seed = self.eval_sets[split]
        scores = evaluate_tasks(self.algorithm, self.tasks, split, n_tasks, seed, self.eval_batch_size, self.device,
                                self.precision)
        return eval_metrics(scores, split, self.tasks.objective.metric)

    def _improved(self, value: float) -> bool:
        if math.isnan(self.best_metric):
            return True
        return value > self.best_metric if self.higher_is_better else value < self.best_metric

    # -- training ---------------------------------------------------------------------------------
    def _train_step(self) -> tuple[dict[str, float], float]:
        batch = self.algorithm.draw(self.tasks, self.meta_batch_size, self.generator)
        if self.world > 1:  # every rank drew the same meta-batch; each takes its share
            batch = distributed.shard(batch, self.rank, self.world)
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.set_progress(self.step, self.max_steps)
        self.algorithm.measure_pre_adaptation = (self.step + 1) % self.log_every == 0  # only logged steps
        updated = isinstance(self.algorithm, SelfUpdating)
        with autocast(self.device, self.precision):
            if isinstance(self.algorithm, SelfUpdating):  # it updates itself (a TRPO step, several optimizer steps)
                result, norm = self.algorithm.update(batch, self.optimizer)
            else:
                result = cast(GradientLearner[Any], self.algorithm).meta_train_step(batch)
        scalars = step_metrics(result, self.tasks.objective.metric)
        if self.world > 1:
            distributed.average_gradients(self.algorithm)
            scalars = distributed.mean_of(scalars)
        meta_loss = scalars[tag("train", "meta_loss")]
        if not updated:
            params: Iterable[torch.Tensor] = [p for p in self.algorithm.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf).item()
        if not (math.isfinite(meta_loss) and math.isfinite(norm)):
            last = self.ckpt_dir / "last.pt"
            kept = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint written yet"
            when = "after the learner updated its weights" if updated else "before updating the weights"
            raise NonFiniteLossError(
                f"step {self.step + 1}: meta-loss {meta_loss} and meta-gradient norm {norm} are not both "
                f"finite; stopped {when} ({kept}). "
                "Lower optimizer.lr or algorithm.inner_lr, or set trainer.grad_clip.")
        if not updated:
            self.optimizer.step()
        if self.scheduler:
            self.scheduler.step()
        return scalars, norm

    def restore(self) -> None:
        """Load `ckpt_path`, or `last.pt` of this run when resuming, if there is one (once; `fit` calls it
        if the caller did not). A checkpoint whose run had other settings than `run_config`, apart from
        those that may change on resume (`checkpoint.RESUME_KEYS`), is refused with a CheckpointError."""
        if self._restored:
            return
        self._restored = True
        source = self.ckpt_path or (self.ckpt_dir / "last.pt" if self.resume else None)
        if source is not None and (self.ckpt_path is not None or source.is_file()):
            state = load_checkpoint(source, self.device)
            changed = config_changes(state["config"], self.config) if state.get("config") and self.config else []
            if changed:
                may_change = ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in RESUME_KEYS)
                raise CheckpointError(
                    f"{source}: the run was made with other settings ({'; '.join(changed)}); a run continues "
                    f"only with its own settings, apart from {may_change}: to train with these settings, "
                    "start a new run (without trainer.resume=true or ckpt_path)")
            self.load_state(state, source)
            log.info("Resumed from %s at step %d", source, self.step)
        elif self.resume:
            log.info("trainer.resume=true but %s does not exist yet: starting a new run", source)

    def _validate(self, logger: TensorBoardLogger) -> float:
        """Evaluate on the validation set, log it, and keep `best.pt` if it improved."""
        metrics = self.evaluate("val")
        logger.log_scalars(metrics, self.step)
        value = metrics[tag("val", self.metric)]
        log.info("step %d: val/%s %.4f ± %.4f", self.step, self.metric, value,
                 metrics[tag("val", f"{self.metric}_ci95")])
        if self._improved(value):
            self.best_metric, self.best_step = value, self.step
            self.save("best.pt")
        return value

    def fit(self) -> dict[str, Any]:
        """Train to `max_steps` (continuing a checkpoint if asked), then test the best checkpoint."""
        self.restore()
        if self.rank != 0:  # one process logs, validates, checkpoints and tests: rank 0
            return self._follow()
        logger = self.make_logger(purge_step=self.step + 1 if self.step else None)
        if self.step == 0:
            logger.start_hparams(self.config, [tag("val", f"best_{self.metric}"), tag("test", self.metric)])
        bar = tqdm(total=self.max_steps, initial=self.step, desc="meta-train", unit="step",
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        running, tick, tick_step = math.nan, time.perf_counter(), self.step
        self._t0 = time.perf_counter() - self.elapsed
        stop = False  # stays False if there is no step left to take
        with stop_on_signal() as signals, logging_redirect_tqdm():
            for scalars, norm, stop in self._steps(signals):
                bar.update(1)
                loss = scalars[tag("train", "meta_loss")]
                running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss  # smoothed for the bar
                if self.step % self.log_every == 0:
                    rate = (self.step - tick_step) / (time.perf_counter() - tick)
                    tick, tick_step = time.perf_counter(), self.step
                    logger.log_scalars({**scalars, **lr_metrics(self.optimizer), **speed_metrics(rate, norm)},
                                       self.step)
                    bar.set_postfix(meta_loss=f"{running:.4f}")
                if self.step % self.eval_every == 0 or self.step == self.max_steps:
                    self._validate(logger)
                if self.step % self.checkpoint_every == 0 or self.step == self.max_steps or stop:
                    self.save("last.pt")
        bar.close()
        if stop:
            logger.close()
            cause = f"by signal {signals[0]}" if signals else "with the other processes"
            raise KeyboardInterrupt(f"stopped {cause} at step {self.step}; "
                                    f"resume with trainer.resume=true (checkpoint {self.ckpt_dir / 'last.pt'})")
        if not (self.ckpt_dir / "best.pt").is_file():  # resumed at or past max_steps before any evaluation
            self._validate(logger)
        return self._finish(logger)

    def _steps(self, signals: list[int]) -> Iterator[tuple[dict[str, float], float, bool]]:
        """Train up to `max_steps`, yielding each step's scalars, gradient norm and whether to stop now: a
        signal to any process stops every process after the same step (checked with all of them)."""
        while self.step < self.max_steps:
            scalars, norm = self._train_step()
            self.step += 1
            stop = distributed.any_rank(bool(signals))
            yield scalars, norm, stop
            if stop:
                return

    def _follow(self) -> dict[str, Any]:
        """A process other than rank 0: the same training steps, in step with rank 0; no outputs."""
        with stop_on_signal() as signals:
            stop = any(stop for *_, stop in self._steps(signals))
        if stop:
            raise KeyboardInterrupt(f"stopped at step {self.step} with the other processes")
        return {}

    def _finish(self, logger: TensorBoardLogger) -> dict[str, Any]:
        """Test the best checkpoint, draw what was learned, and write `results.json`."""
        best = load_checkpoint(self.ckpt_dir / "best.pt", self.device)
        load_weights(self.algorithm, best["algorithm"], self.ckpt_dir / "best.pt")
        val, test = self.evaluate("val"), self.evaluate("test")
        logger.log_scalars({tag("val", f"best_{self.metric}"): val[tag("val", self.metric)], **test}, self.step)
        self.algorithm.eval()
        figure = self.algorithm.illustrate(self.tasks, torch.Generator().manual_seed(self.eval_sets["test"][1]))
        if figure is not None:
            figure.savefig(self.output_dir / "adaptation.png", dpi=100)
            logger.log_figure(tag("test", "adaptation"), figure, self.step)
        logger.end_hparams()
        logger.close()
        results = {
            "metric": self.metric, "higher_is_better": self.higher_is_better, "step": self.step,
            "best_step": self.best_step, "wall_time_s": round(self.elapsed, 1), "device": str(self.device),
            "precision": str(self.precision).removeprefix("torch."), "compiled": self.compiled,
            "allocator": self.allocator, "interval": INTERVAL,
            "val": {k.split("/", 1)[1]: v for k, v in val.items()},
            "test": {k.split("/", 1)[1]: v for k, v in test.items()},
        }
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

"""The `metalearn` command: compose the configured objects in order, train, test, report.

With the other two commands (`evaluate.py`, `report.py`) it is the only code that knows about Hydra
and OmegaConf; everything it builds takes plain, typed constructor arguments.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalearn import distributed
from metalearn.algorithms.base import MetaAlgorithm
from metalearn.checkpoint import CheckpointError, checkpoint_in, run_dir_of
from metalearn.cli import did_you_mean, failed_jobs, one_line
from metalearn.metrics import query_metric
from metalearn.rundir import HeldLog, RunDirError, RunLock, claim, create_fresh, discard_if_empty, next_resume_dir
from metalearn.tasks import TrainingBatches
from metalearn.trainer import NonFiniteLossError

log = logging.getLogger(__name__)

def _config_dir() -> str:
    """`conf/` ships inside the wheel as `metalearn/conf`; in a source checkout it sits beside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"metalearn's configuration directory is missing (looked in {here / 'conf'})")


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A configuration value cannot be used; the message names the key and the value."""


class OutputSizeError(ConfigError):
    """The model's output size does not match what the dataset's tasks need."""

    def __init__(self, message: str, outputs: int, needed: int) -> None:
        super().__init__(message)
        self.outputs, self.needed = outputs, needed


@functools.cache
def _run_dir(base: str, stamp: str, resume: bool, ckpt_path: str | None) -> str:
    """Hydra's run directory: the checkpoint's run when continuing one, else a new directory, created
    here exclusively (`<stamp>`, or `<stamp>_1`, ... when another run took it in the same second).

    With `trainer.resume=true` the latest run under `base` that has `checkpoints/last.pt` is continued
    in place (`train` then refuses it if its settings differ). Cached so that every resolution within a
    process agrees.
    """
    if ckpt_path:
        path = Path(ckpt_path)
        if path.exists():
            return str(run_dir_of(path))
    root = Path(base)
    if resume and root.is_dir():
        runs = sorted(d for d in root.iterdir() if (d / "checkpoints" / "last.pt").is_file())
        if runs:
            return str(runs[-1])
    if distributed.env_rank() != 0:  # the processes of a torchrun job share rank 0's directory
        return distributed.agree("")
    try:
        fresh = create_fresh(root, stamp)
    except OSError as ex:
        raise ConfigError(f"paths.output_root: cannot create a run directory in {root} ({ex.strerror}: "
                          f"{ex.filename}); set paths.output_root or hydra.run.dir to a writable folder") from ex
    return distributed.agree(str(fresh))


def _run_name() -> str:
    """A run's name (its folder under `outputs/runs/` and its label in reports): the experiment's, unless
    the command chose an algorithm or a dataset without naming an experiment; then `<algorithm>-<dataset>`
    (`metalearn algorithm=protonet dataset=omniglot` is `protonet-omniglot`, not the default experiment's)."""
    hydra_cfg = HydraConfig.get()
    chosen = {str(o).split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task}
    choices: Any = hydra_cfg.runtime.choices
    if "experiment" in chosen or not chosen & {"algorithm", "dataset"}:
        return str(choices.experiment)
    return f"{choices.algorithm}-{choices.dataset}"


def _sweep_dir(base: str, stamp: str) -> str:
    """A sweep's directory, created exclusively like a run's (`<stamp>_1` when another sweep started in the
    same second took `<stamp>`). Registered with OmegaConf's resolver cache, which Hydra copies from the
    sweep's config into each job's, so that every job, in this process or a launcher's worker, resolves
    the same directory instead of creating another."""
    try:
        return str(create_fresh(Path(base), stamp))
    except OSError as ex:
        raise ConfigError(f"paths.output_root: cannot create a sweep directory in {base} ({ex.strerror}: "
                          f"{ex.filename}); set paths.output_root or hydra.sweep.dir to a writable folder") from ex


OmegaConf.register_new_resolver("metalearn.run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("metalearn.sweep_dir", _sweep_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("metalearn.run_name", _run_name, replace=True)


def _build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`, turning a constructor's ValueError/TypeError into a ConfigError naming `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as ex:
        cause = ex.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise _config_error(key, cause) from ex
        raise


def _make(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build `node`'s target with the given objects wired in explicitly.

    The objects go to the constructor directly, never through `instantiate` (which would turn
    dataclasses and dicts into configs); a ValueError, TypeError or FileNotFoundError becomes a
    ConfigError naming `key`.
    """
    factory = _build(node, key, _partial_=True)
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as ex:
        raise _config_error(key, ex) from ex


def _config_error(key: str, ex: Exception) -> ConfigError:
    message = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
    # Argument checks phrase their messages as `name=value: ...`; prefix the config path to them.
    return ConfigError(f"{key}.{message}" if re.match(r"^[\w.\[\]]+=", message) else f"{key}: {message}")


def check_learning_rates(node: Any, path: str = "") -> None:
    """Every key named `lr` or `*_lr` anywhere in the config must be a finite number >= 0."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{path}.{key}" if path else str(key)
            if (key == "lr" or str(key).endswith("_lr")) and isinstance(value, (int, float)):
                if not value >= 0 or value == float("inf"):
                    raise ConfigError(f"{name}={value}: a learning rate must be a finite number >= 0")
            check_learning_rates(value, name)


def _check_model_fits(model: torch.nn.Module, tasks: Any, predicts_targets: bool = True) -> None:
    """Fail early, naming the key, if the model cannot take the task family's inputs or (for algorithms
    whose model predicts the targets, not an embedding) its output size does not match."""
    if callable(getattr(tasks, "check_model", None)):  # a family that is not episodes of examples (environments)
        try:
            tasks.check_model(model, predicts_targets)
        except ValueError as ex:
            raise ConfigError(f"model: {ex}") from ex
        return
    probe = tasks.sample(1, "val", torch.Generator().manual_seed(0))  # an episode whatever training draws
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe.support_x[0])
    except RuntimeError as ex:
        raise ConfigError(f"model: cannot take the dataset's inputs of shape {tuple(probe.support_x.shape[2:])} "
                          f"({str(ex).splitlines()[0]})") from ex
    finally:
        model.train()
    if predicts_targets and out.shape[-1] != tasks.output_size:
        raise OutputSizeError(f"model: outputs {out.shape[-1]} values per example but the dataset needs "
                              f"{tasks.output_size} (set model.out_features={tasks.output_size})",
                              out.shape[-1], tasks.output_size)


# What each kind of task is, the algorithms that learn from it, and the datasets that give it.
TASK_KINDS = {
    "examples": ("examples (episodes of a dataset)", "a few-shot algorithm (algorithm=maml, protonet, ...)",
                 "a dataset of examples (dataset=sinusoid, omniglot, ...)"),
    "environments": ("environments", "algorithm=maml_rl or rl2",
                     "an environment family (dataset=navigation2d, bandit, halfcheetah_vel, halfcheetah_dir)"),
    "optimizees": ("optimizee problems", "algorithm=l2o", "an optimizee family (dataset=quadratic)"),
}


def check_task_kind(node: DictConfig, tasks: Any) -> None:
    """The algorithm of config `node` learns from the kind of task the dataset gives (examples,
    environments, optimizee problems), or a ConfigError says what to use instead. Checked before the
    model and the algorithm are built, whose constructors would fail less clearly."""
    kind = get_class(node._target_)
    wants, gives = getattr(kind, "task_kind", "examples"), getattr(tasks, "task_kind", "examples")
    if wants != gives:
        raise ConfigError(f"algorithm: {kind.__name__} learns from {TASK_KINDS[wants][0]}, but the dataset "
                          f"({type(tasks).__name__}) gives {TASK_KINDS[gives][0]}: use {TASK_KINDS[gives][1]}, "
                          f"or {TASK_KINDS[wants][2]}")


def build_algorithm(node: DictConfig, model: torch.nn.Module, tasks: Any) -> tuple[MetaAlgorithm, Any]:
    """The algorithm of config `node` on `model`, set up for the task distribution, and the
    distribution as its training loop must see it (pairs or labelled minibatches for algorithms that
    train on those, see `TrainingBatches`); the model is checked against the data."""
    check_task_kind(node, tasks)
    algorithm = _make(node, "algorithm", model=model, objective=tasks.objective)
    if algorithm.train_batches != "episodes":
        try:
            tasks = TrainingBatches(tasks, algorithm.train_batches)
        except ValueError as ex:
            raise ConfigError(f"algorithm: {type(algorithm).__name__} {ex}") from ex
    _check_model_fits(model, tasks, algorithm.model_predicts_targets)  # before setup probes the model
    try:
        algorithm.setup(tasks)
    except (ValueError, TypeError) as ex:
        raise _config_error("algorithm", ex) from ex
    return algorithm, tasks


def build_learner(cfg: DictConfig) -> tuple[Any, MetaAlgorithm]:
    """The task distribution and the (untrained) algorithm on its model, from a run's config."""
    torch.manual_seed(cfg.seed)  # model initialisation; task sampling has its own generator
    tasks = _make(cfg.dataset, "dataset")
    check_task_kind(cfg.algorithm, tasks)
    model = _make(cfg.model, "model")
    algorithm, tasks = build_algorithm(cfg.algorithm, model, tasks)
    return tasks, algorithm


def _check_sweep_direction(metric: str, higher_is_better: bool) -> None:
    """In an optimising sweep (Optuna), the configured direction must be the validation metric's."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    direction = getattr(HydraConfig.get().sweeper, "direction", None)  # only optimising sweepers have one
    if direction is None or isinstance(direction, (list, ListConfig)):  # no optimiser, or several objectives
        return
    wanted = "maximize" if higher_is_better else "minimize"
    if str(getattr(direction, "name", direction)).lower() != wanted:
        raise ConfigError(f"hydra.sweeper.direction={getattr(direction, 'name', direction)}: the sweep optimises "
                          f"val/{metric}, which is better {'higher' if higher_is_better else 'lower'} "
                          f"(set hydra.sweeper.direction={wanted})")


def _claim(cfg: DictConfig, output_dir: Path) -> tuple[RunLock | None, bool]:
    """`rundir.claim` for this command: it continues the run in `output_dir` if it names that run's
    checkpoint, or resumes and the directory has one."""
    ckpt = checkpoint_in(Path(cfg.ckpt_path)) if cfg.ckpt_path else None
    continuing = (ckpt is not None and run_dir_of(ckpt).resolve() == output_dir.resolve()) or (
        bool(cfg.trainer.resume) and (output_dir / "checkpoints" / "last.pt").is_file())
    return claim(output_dir, continuing, lock=distributed.env_rank() == 0)


def _write_record(output_dir: Path, container: dict[str, Any], fresh: bool) -> None:
    """The run's resolved `config.yaml` and Hydra's files of this command: in `.hydra/` for a new run, in
    `.hydra/resume-<n>/` for a continued one (its original command stays as it was)."""
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    _write_hydra_files(output_dir / ".hydra" if fresh else next_resume_dir(output_dir), container)


def _write_hydra_files(folder: Path, container: dict[str, Any]) -> None:
    """What Hydra writes to `.hydra/` (config, hydra, overrides), when running under Hydra."""
    if not HydraConfig.initialized():
        return
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.instance().cfg
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(container))
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra_cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))  # type: ignore[union-attr]


def _check_seed(cfg: DictConfig) -> None:
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r}: must be an integer")


def train(cfg: DictConfig, held_log: HeldLog | None = None) -> dict[str, Any]:
    """Build dataset, model, algorithm, optimizer, schedule, logger and trainer from `cfg`; train; test.

    The run's record (`config.yaml`, `.hydra/`) is written only once everything is built and any
    checkpoint to continue is loaded and found to be this run's, so a command that fails or is refused
    leaves an existing run as it was. `held_log` (the CLI's) is released into the run log then.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock, fresh = _claim(cfg, output_dir)
    if held_log is not None:
        held_log.fresh = fresh
    trainer = None
    try:
        container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        _check_seed(cfg)
        check_learning_rates(container)
        ckpt_path = checkpoint_in(Path(cfg.ckpt_path)) if cfg.ckpt_path else None
        if ckpt_path is not None and not ckpt_path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")

        tasks, algorithm = build_learner(cfg)
        _check_sweep_direction(query_metric(tasks.objective.metric), tasks.objective.higher_is_better)
        optimizer = _make(cfg.optimizer, "optimizer", algorithm.parameters())
        scheduler = _make(cfg.scheduler, "scheduler", optimizer) if cfg.get("scheduler") else None
        trainer = _make(
            cfg.trainer, "trainer", algorithm=algorithm, tasks=tasks, optimizer=optimizer, scheduler=scheduler,
            logger=_build(cfg.logger, "logger"), output_dir=output_dir, seed=cfg.seed, ckpt_path=ckpt_path,
            run_config=container,
        )
        trainer.restore()
        if lock is not None:
            lock.announce()
            _write_record(output_dir, container, fresh)
        if held_log is not None:
            held_log.release(keep=True)
        if distributed.rank() != 0:  # the log is rank 0's
            logging.getLogger().setLevel(logging.WARNING)
        try:
            results = trainer.fit()
        except NonFiniteLossError as ex:
            # The trainer knows no config keys; name the current values of the settings it suggests.
            settings = ", ".join(f"{key}={OmegaConf.select(cfg, key)}" for key in ("algorithm.inner_lr", "optimizer.lr")
                                 if OmegaConf.select(cfg, key) is not None)
            raise NonFiniteLossError(f"{ex} (now {settings})" if settings else str(ex)) from ex
    except KeyboardInterrupt as ex:
        raise _interrupted(ex, trainer) from ex
    finally:
        distributed.leave()
        if lock is not None:
            lock.release()
    if not results:  # a process other than rank 0 of a distributed run
        return results
    name = query_metric(tasks.objective.metric)
    test, n = results["test"], int(results["test"]["tasks"])
    print(f"Run directory: {output_dir.resolve()}")
    print(f"test {name}: {test[name]:.4f} ± {test[name + '_ci95']:.4f} (95% CI over {n} tasks; "
          f"before adaptation {test[name + '_pre']:.4f}; best checkpoint from step {results['best_step']})")
    return results


def _interrupted(ex: KeyboardInterrupt, trainer: Any) -> KeyboardInterrupt:
    """The interruption as one line that says when it came and how to go on; the training loop's own
    message (it knows the step and the checkpoint) is kept as it is."""
    text = str(ex) or "stopped by Ctrl-C"
    if "resume with" in text:
        return KeyboardInterrupt(text)
    if trainer is None:
        return KeyboardInterrupt(f"{text} during set-up")
    last = trainer.ckpt_dir / "last.pt"
    when = f"while testing at step {trainer.step}" if trainer.step >= trainer.max_steps else "during set-up"
    hint = f"; resume with trainer.resume=true (checkpoint {last})" if last.is_file() else ""
    return KeyboardInterrupt(f"{text} {when}{hint}")


class JobFailed(RuntimeError):
    """A job of a multirun failed; its error is in the job's log and `failed.json`."""


EXPECTED = (ConfigError, CheckpointError, RunDirError, NonFiniteLossError)  # bad input: one line, no traceback


def _job_failed(cfg: DictConfig, ex: BaseException, held_log: HeldLog) -> JobFailed:
    """Record a multirun job's error in its directory (`failed.json`, `.hydra/`, the job's log) when the
    directory is the job's own, and say so on stderr; the returned exception marks the job failed for the
    sweeper while the other jobs go on."""
    output_dir = Path(cfg.paths.output_dir)
    message = str(ex).splitlines()[0] if str(ex) else ""
    hydra_cfg = HydraConfig.get()
    if held_log.fresh:  # never into another run's directory
        record = {"error": type(ex).__name__, "message": message,
                  "experiment": hydra_cfg.runtime.choices.get("experiment"),
                  "overrides": list(hydra_cfg.overrides.task), "traceback": "".join(traceback.format_exception(ex))}
        (output_dir / "failed.json").write_text(json.dumps(record, indent=2) + "\n")
        if not (output_dir / ".hydra").exists():
            _write_hydra_files(output_dir / ".hydra", OmegaConf.to_container(cfg))  # type: ignore[arg-type]
    log.error("job failed: %s: %s", type(ex).__name__, message, exc_info=None if isinstance(ex, EXPECTED) else ex)
    text = f"job {hydra_cfg.job.num} ({output_dir}) failed: {type(ex).__name__}: {message}"
    print(f"error: {text}", file=sys.stderr)
    return JobFailed(text)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    held_log = HeldLog(Path(cfg.paths.output_dir))
    try:
        results = train(cfg, held_log)
    except EXPECTED as ex:
        if multirun:
            raise _job_failed(cfg, ex, held_log) from ex
        print(f"error: {ex}", file=sys.stderr)
        if held_log.fresh:
            held_log.release(keep=False)
            discard_if_empty(Path(cfg.paths.output_dir))
        sys.exit(2)
    except KeyboardInterrupt as ex:
        print(f"interrupted: {ex}", file=sys.stderr)
        sys.exit(130)
    except Exception as ex:
        if multirun:  # any error ends this job only; a single run shows the traceback
            raise _job_failed(cfg, ex, held_log) from ex
        raise
    finally:
        held_log.release(keep=held_log.fresh)
    # Sweepers (e.g. Optuna) optimise the returned value: the best validation metric.
    return float(results["val"][results["metric"]]) if results else math.nan


def main() -> None:
    """Console entry point. Configuration errors become one line on stderr and exit status 2."""
    keep_traceback = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's printer
    try:
        _hydra_main()
    except JobFailed as ex:  # the sweep ran every job it could; report the failures
        print(f"error: sweep finished with failed jobs; {failed_jobs(str(ex))}", file=sys.stderr)
        sys.exit(1)
    except (HydraException, OmegaConfBaseException) as ex:
        if keep_traceback:
            raise
        print(f"error: {did_you_mean(ex) or one_line(ex, EXPECTED)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as ex:  # before or after the run itself (composition, Hydra's set-up)
        print(f"interrupted: {ex or 'stopped by Ctrl-C'} during set-up", file=sys.stderr)
        sys.exit(130)
    except OSError as ex:
        if keep_traceback or ex.filename is None:
            raise
        print(f"error: {ex.filename}: {ex.strerror} (the run directory must be writable: set hydra.run.dir or "
              "paths.output_root)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

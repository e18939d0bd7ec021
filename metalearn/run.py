"""A run's life: claim its directory, compose it, record it, train, test and report.

`train(cfg)` is what the `metalearn` command runs for each job, and what Python code calls with a composed
configuration. The run's record (`config.yaml`, `.hydra/`) is written only once everything is built and
any checkpoint to continue is loaded and found to be this run's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from metalearn import distributed, resolvers  # noqa: F401 (registers the configuration's resolvers)
from metalearn.checkpoint import checkpoint_in, run_dir_of
from metalearn.compose import ConfigError, build_learner, build_trainer, check_learning_rates, check_seed
from metalearn.metrics import query_metric
from metalearn.rundir import HeldLog, RunLock, claim, next_resume_dir
from metalearn.trainer import NonFiniteLossError

log = logging.getLogger(__name__)


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
    write_hydra_files(output_dir / ".hydra" if fresh else next_resume_dir(output_dir), container)


def write_hydra_files(folder: Path, container: dict[str, Any]) -> None:
    """What Hydra writes to `.hydra/` (config, hydra, overrides), when running under Hydra."""
    if not HydraConfig.initialized():
        return
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.instance().cfg
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(container))
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra_cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))  # type: ignore[union-attr]


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
        check_seed(cfg.seed)
        check_learning_rates(container)
        ckpt_path = checkpoint_in(Path(cfg.ckpt_path)) if cfg.ckpt_path else None
        if ckpt_path is not None and not ckpt_path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")

        tasks, algorithm = build_learner(cfg)
        _check_sweep_direction(query_metric(tasks.objective.metric), tasks.objective.higher_is_better)
        trainer = build_trainer(cfg, tasks, algorithm, output_dir, ckpt_path, container)
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

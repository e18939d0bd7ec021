"""Composition of a run from its configuration: the task family, the model, the learner, the optimizer,
the schedule, the logger and the trainer, with the checks that name the offending key.

It knows the configuration's shape (the `dataset`, `model`, `algorithm`, ... nodes, each built from its
`_target_` with Hydra's instantiate) but nothing of a Hydra application: the `metalearn` and
`metalearn-eval` commands call it, and so can Python code with a config composed any other way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from metalearn.algorithms.base import MetaLearner
from metalearn.tasks import TaskBatch, batch_type_of, probe


def _config_dir() -> Path:
    """`conf/` ships inside the wheel as `metalearn/conf`; in a source checkout it sits beside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"metalearn's configuration directory is missing (looked in {here / 'conf'})")


CONFIG_DIR = str(_config_dir())


def head_size(size: Any, *, _root_: DictConfig) -> Any:
    """`${metalearn.head:N}`, a model's `out_features`: N when the config's learner reads the model's
    outputs as predictions, null (no head: the model is an embedding network) when its class says
    otherwise (`model_predicts_targets`, e.g. every metric-based learner). The fact lives in the
    learner's class alone; an explicit `model.out_features=...` still wins."""
    target = OmegaConf.select(_root_, "algorithm._target_", default=None)
    if target is None:
        return size
    try:
        learner = get_class(str(target))
    except ImportError as ex:
        raise ConfigError(f"algorithm._target_={target!r}: cannot be imported ({ex})") from ex
    return size if getattr(learner, "model_predicts_targets", True) else None


OmegaConf.register_new_resolver("metalearn.head", head_size, replace=True)


class ConfigError(ValueError):
    """A configuration value cannot be used; the message names the key and the value."""


class OutputSizeError(ConfigError):
    """The model's output size does not match what the dataset's tasks need."""

    def __init__(self, message: str, outputs: int, needed: int) -> None:
        super().__init__(message)
        self.outputs, self.needed = outputs, needed


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`, turning a constructor's ValueError/TypeError into a ConfigError naming `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as ex:
        cause = ex.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise config_error(key, cause) from ex
        raise


def make(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build `node`'s target with the given objects wired in explicitly.

    The objects go to the constructor directly, never through `instantiate` (which would turn
    dataclasses and dicts into configs); a ValueError, TypeError or FileNotFoundError becomes a
    ConfigError naming `key`.
    """
    factory = build(node, key, _partial_=True)
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as ex:
        raise config_error(key, ex) from ex


def config_error(key: str, ex: Exception) -> ConfigError:
    """`ex` as a one-line ConfigError under the config path `key`."""
    message = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
    # Argument checks phrase their messages as `name=value: ...`; prefix the config path to them.
    return ConfigError(f"{key}.{message}" if re.match(r"^[\w.\[\]]+=", message) else f"{key}: {message}")


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r}: must be an integer")


def check_learning_rates(node: Any, path: str = "") -> None:
    """Every key named `lr` or `*_lr` anywhere in the config must be a finite number >= 0."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{path}.{key}" if path else str(key)
            if (key == "lr" or str(key).endswith("_lr")) and isinstance(value, (int, float)):
                if not value >= 0 or value == float("inf"):
                    raise ConfigError(f"{name}={value}: a learning rate must be a finite number >= 0")
            check_learning_rates(value, name)


def check_model_fits(model: torch.nn.Module, tasks: Any, predicts_targets: bool = True) -> None:
    """Fail early, naming the key, if the model cannot take the task family's inputs or (for learners
    whose model predicts the targets, not an embedding) its output size does not match."""
    if callable(getattr(tasks, "check_model", None)):  # a family that is not episodes of examples (environments)
        try:
            tasks.check_model(model, predicts_targets)
        except ValueError as ex:
            raise ConfigError(f"model: {ex}") from ex
        return
    try:
        out = probe(model, tasks)
    except RuntimeError as ex:
        shape = tuple(tasks.sample(1, "val", torch.Generator().manual_seed(0)).support_x.shape[2:])
        raise ConfigError(f"model: cannot take the dataset's inputs of shape {shape} "
                          f"({str(ex).splitlines()[0]})") from ex
    if predicts_targets and out.shape[-1] != tasks.output_size:
        raise OutputSizeError(f"model: outputs {out.shape[-1]} values per example but the dataset needs "
                              f"{tasks.output_size} (set model.out_features={tasks.output_size})",
                              out.shape[-1], tasks.output_size)


def _options(group: str, fits: Any) -> str:
    """The options of config group `group` whose `_target_` class satisfies `fits`, as `a, b or c`."""
    names = []
    for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
        text = path.read_text()
        target = re.search(r"^_target_:\s*(\S+)", text, re.M) or re.search(r"^\s+_target_:\s*(\S+)", text, re.M)
        try:
            if target and fits(get_class(target.group(1))):
                names.append(path.stem)
        except ImportError:  # an option whose optional dependency is missing
            continue
    return ", ".join(names[:-1]) + (f" or {names[-1]}" if len(names) > 1 else "".join(names))


def check_task_kind(node: DictConfig, tasks: Any) -> None:
    """The learner of config `node` learns from the kind of task the dataset gives (episodes of examples,
    environments, optimizee problems: the learner's `learns_from` against the family's batch type), or a
    ConfigError says which algorithms and datasets pair with them. Checked before the model and the
    learner are built, whose constructors would fail less clearly."""
    learner = get_class(node._target_)
    wants, gives = getattr(learner, "learns_from", TaskBatch), batch_type_of(tasks)
    if wants is not gives:
        algorithms = _options("algorithm", lambda cls: getattr(cls, "learns_from", None) is gives)
        datasets = _options("dataset", lambda cls: batch_type_of(cls) is wants)
        raise ConfigError(f"algorithm: {learner.__name__} learns from {getattr(wants, 'kind', wants.__name__)}, but "
                          f"the dataset ({type(tasks).__name__}) gives {getattr(gives, 'kind', gives.__name__)}: use "
                          f"algorithm={algorithms}, or dataset={datasets}")


def build_algorithm(node: DictConfig, model: torch.nn.Module, tasks: Any) -> MetaLearner[Any]:
    """The learner of config `node` on `model`, set up for the task distribution; the model is checked
    against the data."""
    check_task_kind(node, tasks)
    algorithm: MetaLearner[Any] = make(node, "algorithm", model=model, objective=tasks.objective)
    check_model_fits(model, tasks, algorithm.model_predicts_targets)  # before setup probes the model
    try:
        algorithm.setup(tasks)
    except (ValueError, TypeError) as ex:
        raise config_error("algorithm", ex) from ex
    return algorithm


def build_learner(cfg: DictConfig) -> tuple[Any, MetaLearner[Any]]:
    """The task distribution and the (untrained) learner on its model, from a run's config."""
    torch.manual_seed(cfg.seed)  # model initialisation; task sampling has its own generator
    tasks = make(cfg.dataset, "dataset")
    check_task_kind(cfg.algorithm, tasks)
    model = make(cfg.model, "model")
    return tasks, build_algorithm(cfg.algorithm, model, tasks)


def build_trainer(cfg: DictConfig, tasks: Any, algorithm: MetaLearner[Any], output_dir: Path,
                  ckpt_path: Path | None, run_config: dict[str, Any]) -> Any:
    """The optimizer over the learner's parameters, the schedule, the logger and the trainer of a run."""
    optimizer = make(cfg.optimizer, "optimizer", algorithm.parameters())
    scheduler = make(cfg.scheduler, "scheduler", optimizer) if cfg.get("scheduler") else None
    return make(cfg.trainer, "trainer", algorithm=algorithm, tasks=tasks, optimizer=optimizer, scheduler=scheduler,
                logger=build(cfg.logger, "logger"), output_dir=output_dir, seed=cfg.seed, ckpt_path=ckpt_path,
                run_config=run_config)

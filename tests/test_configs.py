"""Every experiment, algorithm and dataset option composes, instantiates and runs."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from metalearn.algorithms.base import GradientLearner, MetaLearner, SelfUpdating
from metalearn.algorithms.policy import PolicyLearner
from metalearn.compose import build_algorithm, check_task_kind
from metalearn.objectives import Regression
from metalearn.run import train
from metalearn.tasks import batch_type_of
from tests.conftest import CONF_DIR, Composer, constructor_parameters


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Experiments whose evaluation has sizes of its own, shrunk like the trainer's (TINY).
TINY_EXTRA = {"l2o_omniglot": ["algorithm.tuning_problems=4", "algorithm.picture_problems=4"]}


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiment_runs(experiment: str, compose_cfg: Composer) -> None:
    """Each experiment YAML trains a few steps end to end and writes its results."""
    cfg = compose_cfg(f"experiment={experiment}", *TINY_EXTRA.get(experiment, []))
    assert cfg.name == experiment
    results = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert results["step"] == cfg.trainer.max_steps
    assert json.loads((out / "results.json").read_text())["test"]["tasks"] == cfg.trainer.test_tasks
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()


# The model each dataset option is paired with; every dataset option must appear here.
MODEL_FOR = {
    "sinusoid": "mlp", "omniglot": "conv4", "miniimagenet": "conv4", "cifarfs": "resnet12", "fc100": "conv4",
    "image_folder": "resnet12", "navigation2d": "policy_mlp", "bandit": "policy_mlp", "halfcheetah_vel": "policy_mlp",
    "halfcheetah_dir": "policy_mlp", "quadratic": "lstm_optimizer",
    "omniglot_mlp": "lstm_optimizer",
}


def test_every_dataset_has_a_model() -> None:
    assert sorted(MODEL_FOR) == _options("dataset")


@pytest.mark.parametrize("dataset", _options("dataset"))
@pytest.mark.parametrize("algorithm", _options("algorithm"))
def test_algorithm_dataset_step(algorithm: str, dataset: str, compose_cfg: Composer) -> None:
    """Each algorithm option on each dataset option: instantiate, one meta-step fills finite gradients.
    An algorithm may refuse a regression dataset (metric-based ones classify), but only up front, in
    its constructor, with an error that says it needs a classification dataset. Reinforcement-learning
    algorithms and environment datasets pair only with each other, refusing the rest up front."""
    # RL² needs its recurrent policy on environments (its error says so: tests/algorithms/test_rl2.py).
    model_name = "gru_policy" if algorithm == "rl2" and MODEL_FOR[dataset] == "policy_mlp" else MODEL_FOR[dataset]
    # A coordinate-wise LSTM over ResNet-12's 12 M parameters needs ~20 GiB per inner step: the smaller
    # Conv-4 there (the refusal is tests/algorithms/test_maml_lstm.py::test_too_large_a_graph_is_refused).
    model_name = "conv4" if algorithm == "maml_lstm" and model_name == "resnet12" else model_name
    cfg = compose_cfg(f"algorithm={algorithm}", f"dataset={dataset}", f"model={model_name}")
    tasks = instantiate(cfg.dataset)
    try:
        check_task_kind(cfg.algorithm, tasks)
    except ValueError as ex:  # a different kind of task: refused before the model is built
        assert " learns from " in str(ex) and ", but the dataset " in str(ex)
        assert batch_type_of(tasks) is not get_class(cfg.algorithm._target_).learns_from
        return
    model = instantiate(cfg.model)
    try:
        algorithm_obj = build_algorithm(cfg.algorithm, model, tasks)
    except ValueError as ex:
        if not isinstance(tasks.objective, Regression) or "needs a classification dataset" not in str(ex):
            raise
        return
    assert isinstance(algorithm_obj, MetaLearner)
    batch = algorithm_obj.draw(tasks, 2, torch.Generator().manual_seed(0))  # as the trainer does
    if isinstance(algorithm_obj, SelfUpdating):  # a TRPO step: the parameters moved, no gradients left behind
        result, norm = algorithm_obj.update(batch, torch.optim.Adam(algorithm_obj.parameters()))
        assert math.isfinite(norm) and math.isfinite(result.meta_loss)
        return
    assert isinstance(algorithm_obj, GradientLearner)
    result = algorithm_obj.meta_train_step(batch)
    grads = [p.grad for p in algorithm_obj.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # >= 0, not > 0: an untrained 640-d ResNet-12 embedding separates the generated classes so far that
    # ProtoNet's float32 cross-entropy is exactly 0.
    assert math.isfinite(result.meta_loss)
    if not isinstance(algorithm_obj, PolicyLearner):  # a supervised loss; RL's meta-loss is −return, any sign
        assert result.meta_loss >= 0


def test_overrides_reach_the_objects(compose_cfg: Composer) -> None:
    """Command-line overrides land in the constructed objects (never silently ignored)."""
    cfg = compose_cfg("dataset.k_shot=5", "algorithm.inner_lr=0.25", "algorithm=fomaml", "optimizer.lr=0.003")
    tasks = instantiate(cfg.dataset)
    algorithm = instantiate(cfg.algorithm, _partial_=True)(model=instantiate(cfg.model), objective=tasks.objective)
    optimizer = instantiate(cfg.optimizer)(algorithm.parameters())
    assert tasks.sample(1, "train", torch.Generator()).support_x.shape[1] == 5
    assert algorithm.inner_lr == 0.25 and algorithm.first_order
    assert optimizer.param_groups[0]["lr"] == 0.003


def test_shared_values_are_interpolated(compose_cfg: Composer) -> None:
    """The cosine schedule's horizon follows trainer.max_steps rather than repeating it."""
    cfg = compose_cfg("scheduler=cosine", "trainer.max_steps=7")
    assert OmegaConf.select(cfg, "scheduler.T_max") == 7


def test_dataset_picks_its_model_and_metric_methods_drop_the_head(compose_cfg: Composer) -> None:
    """`metalearn algorithm=protonet dataset=omniglot dataset.k_shot=5` just works: the dataset option
    brings its usual model (Conv-4 for images, the MLP for sinusoid), a metric-based algorithm makes
    it an embedding network (no head), and explicit choices still win."""
    cfg = compose_cfg("algorithm=protonet", "dataset=omniglot", "dataset.k_shot=5")
    assert cfg.model._target_ == "metalearn.models.conv.Conv4" and cfg.model.out_features is None
    results = train(cfg)
    assert results["test"]["query_acc"] > 0.2  # 4 steps of a 5-way 5-shot ProtoNet already beat chance
    assert compose_cfg().model._target_ == "metalearn.models.mlp.MLP"
    image_maml = compose_cfg("dataset=miniimagenet")
    assert image_maml.model._target_ == "metalearn.models.conv.Conv4" and image_maml.model.out_features == 5
    assert compose_cfg("dataset=omniglot", "model=resnet12").model._target_ == "metalearn.models.resnet.ResNet12"
    assert compose_cfg("algorithm=protonet", "dataset=omniglot", "model.out_features=7").model.out_features == 7


# Option files of a class that serves in another role than its defaults are made for, with why.
INTENDED = {
    ("algorithm/inner_optimizer/lstm.yaml", "output_scale"): "MAML's inner step on sinusoids; 0.1 is for algorithm=l2o",
    ("model/policy_mlp.yaml", "hidden_sizes"): "the MAML-RL paper's policy; [40, 40] is the sinusoid regressor",
}


def _plain(value: object) -> object:
    """Tuples as lists, nested too, as YAML writes them."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _targets(group: str) -> list[Path]:
    return sorted(p for p in (CONF_DIR / group).rglob("*.yaml") if "_target_:" in p.read_text())


@pytest.mark.parametrize("path", _targets("algorithm") + _targets("model"),
                         ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_option_values_are_the_constructors_defaults(path: Path) -> None:
    """An option file states its class's settings so that `--cfg job` shows them and the command line can
    set them; a value there that a Python default contradicts would make the Python API train something
    else than the command. Each plain value equals the constructor's default for that argument (an
    argument without a default, an interpolation or a nested object is not compared)."""
    node = OmegaConf.load(path)
    target = node.get("_target_") if "_target_" in node else None
    if target is None:  # an option inheriting its target through `defaults`
        return
    parameters = constructor_parameters(get_class(str(target)))  # a subclass's **kwargs reach its base's
    differ = []
    for key in node:
        if key in ("_target_", "defaults", "_partial_") or str(key) not in parameters:
            continue
        default = parameters[str(key)].default
        if default is inspect.Parameter.empty or OmegaConf.is_interpolation(node, str(key)):
            continue
        value = OmegaConf.to_container(node)[str(key)]  # type: ignore[index]
        if isinstance(value, dict):
            continue
        if _plain(value) != _plain(default) and (str(path.relative_to(CONF_DIR)), str(key)) not in INTENDED:
            differ.append(f"{key}: {value!r} in the file, {default!r} in {target}")
    assert differ == []

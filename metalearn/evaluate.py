"""The `metalearn-eval` command: evaluate a trained run's checkpoint on a fixed set of held-out tasks.

    metalearn-eval ckpt_path=outputs/runs/protonet_omniglot_5w1s/<stamp> dataset.n_way=20

The run is rebuilt from the resolved configuration stored in its checkpoint, changed by the settings
given on the command line (Hydra's override syntax: `key=value`, `+key=value` to add a key), and
evaluated on `eval.episodes` tasks of `eval.split` drawn from `eval.seed` (by default the run's own
`trainer.<split>_seed`, so the test tasks are those of the run's final test). It prints the mean and
95% confidence interval (t·σ/√N, Student's t quantile) and writes every episode's values to
`<run dir>/eval_<split>_<timestamp>.json`. The checkpoint is only read.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from metalearn.checkpoint import CheckpointError, load_checkpoint, load_weights, run_dir_of, upgrade_config
from metalearn.checks import one_of, positive_int
from metalearn.compose import ConfigError, OutputSizeError, build_learner
from metalearn.metrics import eval_metrics, query_metric
from metalearn.rundir import write_new
from metalearn.runtime import resolve_device, resolve_precision
from metalearn.stats import INTERVAL
from metalearn.tasks import Split
from metalearn.trainer import evaluate_tasks

USAGE = """\
usage: metalearn-eval ckpt_path=<run dir or checkpoint file> [eval.<option>=<value> ...] [<key>=<value> ...]

Evaluate a trained run on held-out tasks and print the mean with its 95% confidence interval.

  ckpt_path=PATH         a run directory (its checkpoints/<eval.checkpoint>.pt) or a checkpoint file
  eval.split=test        train, val or test
  eval.episodes=600      number of tasks
  eval.seed=SEED         seed of the task set (default: the run's trainer.<split>_seed)
  eval.checkpoint=best   best or last, when ckpt_path is a run directory
  eval.batch_size=N      tasks per evaluation batch (default: the run's trainer.eval_batch_size)
  <key>=<value>          change a setting of the run's config for this evaluation, e.g.
                         dataset.n_way=20 dataset.k_shot=5 algorithm.eval_inner_steps=10 trainer.device=cpu

Writes eval_<split>_<timestamp>.json (summary and per-episode values) to the run directory.
"""

SPLITS: tuple[str, ...] = get_args(Split)


class EvalError(ValueError):
    """The evaluation cannot be done as asked; the message names the setting or path."""


@dataclass
class EvalRequest:
    """What `metalearn-eval` was asked to do."""

    ckpt_path: Path
    split: str = "test"
    episodes: int = 600
    seed: int | None = None
    checkpoint: str = "best"
    batch_size: int | None = None
    overrides: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> EvalRequest:
    """Split the command line into eval options and overrides of the run's config."""
    try:
        parsed = OverridesParser.create().parse_overrides(argv)
    except HydraException as ex:
        raise EvalError(str(ex).splitlines()[0]) from ex
    options: dict[str, Any] = {}
    overrides: list[str] = []
    for override in parsed:
        if override.is_sweep_override():
            raise EvalError(f"{override.input_line}: metalearn-eval evaluates one setting at a time (no sweeps)")
        key = override.key_or_group
        if key == "ckpt_path" or key.startswith("eval."):
            name = key.removeprefix("eval.")
            if name not in EvalRequest.__dataclass_fields__ or name == "overrides":
                raise EvalError(f"{key}: unknown option (eval.split, eval.episodes, eval.seed, eval.checkpoint, "
                                "eval.batch_size)")
            options[name] = override.value()
        else:
            overrides.append(str(override.input_line))
    if "ckpt_path" not in options or options["ckpt_path"] in (None, ""):
        raise EvalError("ckpt_path: missing; give the run directory or checkpoint to evaluate (ckpt_path=...)")
    request = EvalRequest(ckpt_path=Path(str(options.pop("ckpt_path"))), overrides=overrides, **options)
    one_of("eval.split", request.split, SPLITS)
    one_of("eval.checkpoint", request.checkpoint, ("best", "last"))
    positive_int("eval.episodes", request.episodes)
    if request.batch_size is not None:
        positive_int("eval.batch_size", request.batch_size)
    if request.seed is not None and (isinstance(request.seed, bool) or not isinstance(request.seed, int)):
        raise EvalError(f"eval.seed={request.seed!r}: must be an integer")
    return request


def checkpoint_file(request: EvalRequest) -> Path:
    """The checkpoint a run directory or file path names."""
    path = request.ckpt_path
    if path.is_dir():
        path = path / "checkpoints" / f"{request.checkpoint}.pt"
    if not path.is_file():
        raise EvalError(f"ckpt_path={str(request.ckpt_path)!r}: no checkpoint at {path}")
    return path


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The run's resolved config with single settings changed; an unknown key or a config-group
    choice (`dataset=omniglot`) is an error, since the run's composition is fixed."""
    cfg = OmegaConf.create(config)
    for override in OverridesParser.create().parse_overrides(overrides):
        key, line = override.key_or_group, override.input_line
        if override.is_delete():
            raise EvalError(f"{line}: settings cannot be deleted from a trained run's config")
        current = OmegaConf.select(cfg, key, default=KeyError)
        if current is KeyError and not override.is_add():
            raise EvalError(f"{line}: the run's config has no setting {key!r} (add one with +{line})")
        value = override.value()
        if isinstance(current, DictConfig) and not isinstance(value, dict):
            raise EvalError(f"{line}: {key} is the run's {key} group; change its settings ({key}.<name>=...), "
                            "not the choice of option")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Rebuild the run, load the checkpoint, evaluate; return (and write) the results."""
    path = checkpoint_file(request)
    state = load_checkpoint(path, "cpu")
    if not state.get("config"):
        raise EvalError(f"ckpt_path={str(path)!r}: the checkpoint holds no run config to rebuild the run from")
    cfg = apply_overrides(upgrade_config(state["config"]), request.overrides)
    changed = " ".join(request.overrides) or "the run's settings"
    try:
        tasks, algorithm = build_learner(cfg)
    except OutputSizeError as ex:
        raise EvalError(f"{changed}: the checkpoint's model outputs {ex.outputs} values per example but these "
                        f"tasks need {ex.needed}; the trained head fixes the number of classes (metric-based "
                        "methods such as protonet evaluate at any number of ways)") from ex
    try:
        load_weights(algorithm, state["algorithm"], path)
    except CheckpointError as ex:
        raise EvalError(f"{changed}: {ex}") from ex
    device = resolve_device(cfg.trainer.device)
    algorithm.to(device)
    split: Split = request.split  # type: ignore[assignment]
    seed = request.seed if request.seed is not None else int(cfg.trainer.get(f"{split}_seed", cfg.trainer.test_seed))
    batch_size = request.batch_size or int(cfg.trainer.eval_batch_size)
    torch.manual_seed(seed)  # any randomness inside adaptation is part of the evaluation's seed
    # Runs recorded before trainer.precision existed computed in float32.
    precision = resolve_precision(str(cfg.trainer.get("precision", "float32")), device, algorithm.model)
    scores = evaluate_tasks(algorithm, tasks, split, request.episodes, seed, batch_size, device, precision)
    metric = query_metric(tasks.objective.metric)
    summary = {k.split("/", 1)[1]: v for k, v in eval_metrics(scores, split, tasks.objective.metric).items()}
    results = {
        "checkpoint": str(path.resolve()), "step": state["step"], "split": split, "episodes": request.episodes,
        "seed": seed, "overrides": request.overrides, "metric": metric,
        "higher_is_better": tasks.objective.higher_is_better, "mean": summary[metric],
        "ci95": summary[f"{metric}_ci95"], "interval": INTERVAL, "summary": summary,
        "per_episode": {metric: scores.score.tolist(), f"{metric}_pre": scores.score_pre.tolist(),
                        "query_loss": scores.loss.tolist(), "query_loss_pre": scores.loss_pre.tolist()},
    }
    out = write_new(run_dir_of(path) / f"eval_{split}_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json",
                    json.dumps(results, indent=2) + "\n")
    results["file"] = str(out)
    return results


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Bad input is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    try:
        request = parse_args(argv)
        results = evaluate(request)
    except (EvalError, ConfigError, CheckpointError, ValueError, OmegaConfBaseException) as ex:
        print(f"error: {str(ex).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    metric, summary = results["metric"], results["summary"]
    print(f"{results['split']} {metric}: {results['mean']:.4f} ± {results['ci95']:.4f} "
          f"(95% CI over {results['episodes']} episodes, seed {results['seed']}; before adaptation "
          f"{summary[metric + '_pre']:.4f}; checkpoint step {results['step']})")
    print(f"Per-episode values: {results['file']}")


if __name__ == "__main__":
    main()

"""The resolvers metalearn's configuration uses (`${metalearn.run_dir:...}`, `${metalearn.run_name:}`,
`${metalearn.sweep_dir:...}`), registered with OmegaConf on import: a run's directory, created exclusively,
and its name."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from metalearn import distributed
from metalearn.checkpoint import run_dir_of
from metalearn.compose import ConfigError
from metalearn.rundir import create_fresh


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

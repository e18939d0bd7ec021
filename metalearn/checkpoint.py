"""Self-describing checkpoints, written atomically so that a crash never leaves a torn file."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a metalearn checkpoint."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint (`state` plus the format version) atomically."""
    atomic_save({"format": FORMAT_VERSION, **state}, path)


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` to `path` atomically: a temporary file in the same directory, fsync, rename.

    A reader sees either the previous complete file or the new complete file, never a partial one,
    and an interrupted write leaves no temporary file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable: without it a power loss can undo the rename."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu", key: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; raise CheckpointError, naming the setting `key`
    that gave the path, if it cannot be used."""
    if not path.is_file():
        raise CheckpointError(f"{key}={str(path)!r}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as ex:  # torch raises a variety of errors for truncated, corrupt or foreign files
        # torch's own message may advise weights_only=False, which is wrong (and unsafe) for a damaged file.
        raise CheckpointError(f"{key}={str(path)!r}: not a readable metalearn checkpoint (the file is truncated, "
                              f"corrupt or of another program; {type(ex).__name__})") from ex
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{key}={str(path)!r}: not a metalearn checkpoint (format {FORMAT_VERSION})")
    return state


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """`module.load_state_dict(weights)`, or a one-line CheckpointError naming the first parameter whose
    name or shape differs (torch's own error lists every mismatch over many lines).

    Args:
        module: the freshly built module (e.g. an algorithm with its model).
        weights: its state dict as saved in a checkpoint.
        source: the checkpoint file, for the message.
    """
    own = module.state_dict()
    problems = [f"{name} has shape {list(weights[name].shape)} in the checkpoint but {list(own[name].shape)} "
                "in the model these settings build" for name in own
                if name in weights and isinstance(own[name], torch.Tensor) and weights[name].shape != own[name].shape]
    problems += [f"{name} is in the model these settings build but not in the checkpoint"
                 for name in own if name not in weights]
    problems += [f"{name} is in the checkpoint but not in the model these settings build"
                 for name in weights if name not in own]
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise CheckpointError(f"{source}: the checkpoint's weights do not fit the model: {problems[0]}{more}; "
                              "the architecture settings (model.*) must be those the run was trained with")
    module.load_state_dict(weights)


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory a checkpoint (or a run directory given directly) belongs to."""
    if ckpt_path.is_dir() or ckpt_path.suffix != ".pt":
        return ckpt_path
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def checkpoint_in(path: Path) -> Path:
    """Resolve a run directory to its `checkpoints/last.pt`; a file path is returned unchanged."""
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


# Settings that may change when a run is continued: the budget, where and how it runs, how often it
# evaluates, logs and checkpoints, and the run's label. Every other setting must equal the run's own.
RESUME_KEYS = ("ckpt_path", "name", "trainer.resume", "trainer.max_steps", "trainer.progress", "trainer.device",
               "trainer.precision", "trainer.compile", "trainer.allocator",
               "trainer.eval_every", "trainer.log_every", "trainer.checkpoint_every", "trainer.eval_batch_size",
               "paths.", "logger.")


# Settings added after runs were recorded, with the value that does what such runs did: a run saved
# without the key continues with that value (and no other).
INTRODUCED = {"algorithm.train_pass": "per_set", "algorithm.inner_state": "task", "dataset.resample": "lanczos",
              "model.norm_init": "ones"}


# Strategies that were named by a string before they became objects chosen by `_target_` (2026-12-08):
# the config key, then per old name the object's target and its settings with the old keys (beside the
# name, in the same node) they were stored under. `upgrade_config` rewrites a saved run's config so.
RENAMED_OPTIONS: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "algorithm.inner_optimizer": {
        "sgd": ("metalearn.algorithms.functional.InnerSGD", {}),
        "adam": ("metalearn.algorithms.functional.InnerAdam", {"betas": "inner_betas", "eps": "inner_eps"}),
    },
    "algorithm.loss": {
        "koch": ("metalearn.algorithms.siamese.KochLoss", {}),
        "contrastive": ("metalearn.algorithms.siamese.ContrastiveLoss", {"margin": "margin"}),
    },
    "algorithm.outer": {
        "trpo": ("metalearn.rl.outer.TRPO", {"max_kl": "max_kl", "cg_iterations": "cg_iterations",
                                             "cg_damping": "cg_damping", "line_search_steps": "line_search_steps",
                                             "line_search_backtrack": "line_search_backtrack"}),
        "ppo": ("metalearn.rl.outer.PPO", {"clip": "ppo_clip", "epochs": "ppo_epochs"}),
        "vpg": ("metalearn.rl.outer.VPG", {}),
    },
}


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run's resolved config in today's shape: a strategy stored by name (`inner_optimizer: adam`
    with `inner_betas` beside it) becomes the node that builds the same object (`inner_optimizer:
    {_target_: ...InnerAdam, betas: ...}`), and the old settings keys go. Other values are unchanged, so
    the run rebuilds (metalearn-eval) and continues (resume) exactly as it was trained."""
    upgraded = copy.deepcopy(dict(config))
    for key, options in RENAMED_OPTIONS.items():
        section, name = key.rsplit(".", 1)
        node = upgraded.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        if isinstance(node[name], str) and node[name] in options:
            target, settings = options[node[name]]
            node[name] = {"_target_": target, **{new: node[old] for new, old in settings.items() if old in node}}
        for old in {old for _, moved in options.values() for old in moved.values()}:
            node.pop(old, None)  # also beside an object (maml_lstm's inner_optimizer kept inner_betas)
    return upgraded


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs between two resolved configs, apart from
    those that may change on resume (`RESUME_KEYS`); the saved config is read in today's shape
    (`upgrade_config`), and a setting the saved run predates (`INTRODUCED`) counts as the value it had then."""
    old, new = flatten_hparams(upgrade_config(saved)), flatten_hparams(current)
    old = {**{key: value for key, value in INTRODUCED.items() if key in new}, **old}
    return [f"{key}: {old.get(key)} -> {new.get(key)}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not _may_change(key)]


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k if k.endswith(".") else f"{k}.") for k in RESUME_KEYS)


def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten a nested config into `a.b.c -> scalar` for the HParams tab (lists become strings)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat

"""The `metalearn` command: Hydra composes the configuration, `metalearn.run.train` runs it, and errors
become one line and an exit status. The only other Hydra application is `metalearn-eval`
(metalearn/evaluate.py); composition itself is metalearn/compose.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalearn import __version__
from metalearn.checkpoint import CheckpointError
from metalearn.compose import CONFIG_DIR, ConfigError
from metalearn.help import hydra_template
from metalearn.messages import did_you_mean, failed_jobs, one_line
from metalearn.run import train, write_hydra_files
from metalearn.rundir import HeldLog, RunDirError, discard_if_empty
from metalearn.trainer import NonFiniteLossError

log = logging.getLogger(__name__)
__all__ = ["CONFIG_DIR", "main", "train"]


class JobFailed(RuntimeError):
    """A job of a multirun failed; its error is in the job's log and `failed.json`."""


EXPECTED = (ConfigError, CheckpointError, RunDirError, NonFiniteLossError)  # bad input: one line, no traceback
OmegaConf.register_new_resolver("metalearn.help", hydra_template, replace=True)  # hydra.help.template


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
            write_hydra_files(output_dir / ".hydra", OmegaConf.to_container(cfg))  # type: ignore[arg-type]
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
    if sys.argv[1:] in (["--version"], ["-V"]):  # metalearn's version, not Hydra's (Hydra's own flag)
        print(f"metalearn {__version__}")
        return
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

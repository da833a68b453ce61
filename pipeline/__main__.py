"""`python -m pipeline`: the Hydra entry point.

Bad input ends with one line on stderr (`error: ...`) and exit code 2; config
typos end with Hydra's own validation message, except an unknown stage or role on the
command line (one line). SIGTERM is handled like Ctrl-C: the running stage's temp folder
is removed, its MLflow runs are marked FAILED, and the process exits with code 130.
In a multirun sweep (`-m`), a job that fails prints its line and the sweep goes on to
the next job; the process then exits with code 2 and a line counting the failed jobs
(Ctrl-C still stops the whole sweep).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import register_configs, register_resolvers
from pipeline.errors import PipelineError

register_resolvers()
register_configs()
log = logging.getLogger("pipeline")
_sweep = {"jobs": 0, "failed": []}  # this process's multirun jobs (the CLI's own record, read after the sweep)
INTERRUPTED = "interrupted (SIGTERM or Ctrl-C): the running stage left nothing behind"
_signalled: list[str] = []  # SIGTERM received (a library may turn the KeyboardInterrupt into another error)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import cleanup_failed_run, existing_entries, finished_stages, run_pipeline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_label = hydra_cfg.job.override_dirname if multirun else ""
    signal.signal(signal.SIGTERM, _interrupt)
    _sweep["jobs"] += 1
    kept = existing_entries(run_dir, f"{hydra_cfg.job.name}.log", hydra_cfg.output_subdir)  # hydra.run.dir may be a folder of the user's
    try:
        summary = run_pipeline(cfg, run_dir, job_label)
    except PipelineError as e:
        if not multirun:
            _fail(run_dir, kept, finished_stages(e), str(e), 2)
        _fail_job(run_dir, kept, finished_stages(e), f"job #{hydra_cfg.job.num}: {_one_line(str(e))}")
        return
    except KeyboardInterrupt as e:
        _fail(run_dir, kept, finished_stages(e), INTERRUPTED, 130)
    except Exception as e:  # a bug, not bad input: clean up, then Hydra prints the traceback
        if _signalled or _interrupt_in_chain(e):
            _fail(run_dir, kept, finished_stages(e), INTERRUPTED, 130)
        if multirun:
            _fail_job(run_dir, kept, finished_stages(e), None)
        else:
            cleanup_failed_run(run_dir, kept, finished_stages(e))
        raise
    log.info("summary: %s", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    log.info("run folder: %s", run_dir)


def _interrupt(signum: int, frame) -> None:
    _signalled.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupt_in_chain(error: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt caused `error`: Optuna, stopped inside its bookkeeping, can raise an
    error of its own while handling the interrupt (an UnboundLocalError in Optuna 5.0's trial loop)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _fail(run_dir: Path, kept: frozenset[str], finished: tuple[str, ...], message: str, code: int) -> None:
    from pipeline.runner import cleanup_failed_run

    cleanup_failed_run(run_dir, kept, finished)
    logging.shutdown()
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def _fail_job(run_dir: Path, kept: frozenset[str], finished: tuple[str, ...], message: str | None) -> None:
    """A failed multirun job: cleaned up and recorded; the sweep goes on."""
    from pipeline.runner import cleanup_failed_run

    cleanup_failed_run(run_dir, kept, finished)
    _sweep["failed"].append(run_dir)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)


def _one_line(message: str) -> str:
    """The error's own line: a DataLoader worker re-raises it inside a copy of the worker's traceback."""
    if "\nOriginal Traceback (most recent call last):" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(f"{PipelineError.__name__}: ", 1)[-1]


def check_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown stage or role name (Hydra would also reject them, over several lines)."""
    from pipeline.config import Stage
    from pipeline.quant.sites import ROLES

    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key.startswith("quant.roles.") and key.split(".")[2] not in ROLES:
            return f"unknown role '{key.split('.')[2]}' in {arg} (roles: {', '.join(ROLES)})"
        if key != "stages" or not value or any(sign in value for sign in ("(", "${")):
            continue  # sweep functions (choice(...)) and interpolations are Hydra's to check
        for name in value.replace("[", ",").replace("]", ",").split(","):
            if name.strip() and name.strip() not in Stage.__members__:
                return f"unknown stage '{name.strip()}' in {arg} (stages: {', '.join(Stage.__members__)})"
    return None


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
    if _sweep["failed"]:
        print(f"error: {len(_sweep['failed'])} of the sweep's {_sweep['jobs']} jobs failed (see the lines above)", file=sys.stderr)
        sys.exit(2)

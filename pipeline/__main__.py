"""`python -m pipeline`: the Hydra entry point.

Bad input ends with one line on stderr (`error: ...`) and exit code 2; config
typos end with Hydra's own validation message, except an unknown stage or role on the
command line (one line). SIGTERM is handled like Ctrl-C: the running stage's temp folder
is removed, its MLflow runs are marked FAILED, and the process exits with code 130.
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run_pipeline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_label = hydra_cfg.job.override_dirname if hydra_cfg.mode == RunMode.MULTIRUN else ""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_pipeline(cfg, run_dir, job_label)
    except PipelineError as e:
        _fail(run_dir, str(e), 2)
    except KeyboardInterrupt:
        _fail(run_dir, "interrupted (SIGTERM or Ctrl-C): the running stage left nothing behind", 130)
    log.info("summary: %s", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    log.info("run folder: %s", run_dir)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _fail(run_dir: Path, message: str, code: int) -> None:
    from pipeline.runner import cleanup_failed_run

    cleanup_failed_run(run_dir)
    logging.shutdown()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown stage or role name (Hydra would also reject them, over several lines)."""
    from pipeline.config import Stage
    from pipeline.quant.sites import ROLES

    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key.startswith("quant.roles.") and key.split(".")[2] not in ROLES:
            return f"unknown role '{key.split('.')[2]}' in {arg} (roles: {', '.join(ROLES)})"
        if key != "stages" or not value:
            continue
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

"""`python -m pipeline`: the Hydra entry point.

Bad input ends with one line on stderr (`error: ...`) and exit code 2; config
typos end with Hydra's own validation message.
"""

from __future__ import annotations

import logging
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
    from pipeline.runner import cleanup_failed_run, run_pipeline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_label = hydra_cfg.job.override_dirname if hydra_cfg.mode == RunMode.MULTIRUN else ""
    try:
        summary = run_pipeline(cfg, run_dir, job_label)
    except PipelineError as e:
        cleanup_failed_run(run_dir)
        logging.shutdown()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    log.info("summary: %s", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    log.info("run folder: %s", run_dir)


def check_stage_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown stage name (Hydra would also reject it, over several lines)."""
    from pipeline.config import Stage

    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key != "stages" or not value:
            continue
        for name in value.replace("[", ",").replace("]", ",").split(","):
            if name.strip() and name.strip() not in Stage.__members__:
                return f"unknown stage '{name.strip()}' in {arg} (stages: {', '.join(Stage.__members__)})"
    return None


if __name__ == "__main__":
    problem = check_stage_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()

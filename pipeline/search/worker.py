"""A search worker process (`search.workers > 1`): rebuilds the setup and runs the same studies.

Started with the `spawn` method by the search stage; it shares the Optuna storage with the
stage's own process (and with any other command running the same study), logs its trials
below the stage's MLflow run, and exits 0 when the studies are complete. Ctrl-C ends it quietly
(exit 130; the stage's process reports the interrupt), and so does the death of the process that
started it: an orphan would go on running trials under a stage run that no one closes.
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable


def stop_when_orphaned(parent: int, poll_s: float = 1.0, stop: Callable[[], None] = _thread.interrupt_main) -> threading.Thread:
    """A daemon thread that interrupts the main thread (KeyboardInterrupt) once process `parent` is gone:
    the worker then has another parent. The trial it was running fails and is run again on resume."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        stop()

    thread = threading.Thread(target=watch, name="orphan-watch", daemon=True)
    thread.start()
    return thread


def worker_main(payload: dict[str, Any], index: int) -> None:
    import torch
    from omegaconf import OmegaConf

    from pipeline.artifacts import read_json
    from pipeline.config import TrackingConfig
    from pipeline.errors import PipelineError
    from pipeline.models import load_model
    from pipeline.runner import select_device
    from pipeline.stages.search import prepare, run_methods
    from pipeline.tracking import Tracker

    stop_when_orphaned(int(payload["parent"]))
    logging.basicConfig(level=logging.INFO, format=f"[search worker {index}] %(message)s")
    torch.set_num_threads(max(1, int(payload.get("threads") or 1)))
    cfg = OmegaConf.create(payload["cfg"])
    try:
        fp32 = load_model(cfg.model)
        sensitivity = read_json(payload["sensitivity"]) if payload.get("sensitivity") else None
        setup = prepare(cfg, fp32, select_device(payload["device"]), Path(payload["calib_dir"]), sensitivity)
        tracking = TrackingConfig(**{k: v for k, v in dict(cfg.tracking).items() if k in TrackingConfig.__dataclass_fields__})
        tracker = Tracker.attach(tracking, payload.get("run_id"))
        run_methods(cfg, fp32, setup, payload["storage"], tracker)
    except PipelineError as e:
        print(f"error: search worker {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

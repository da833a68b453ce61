"""MLflow tracking: the only module that talks to MLflow.

One parent run per invocation (one per job in a Hydra multirun, all in one
experiment) and one nested run per stage. The resolved config is logged
flattened as params and whole as `config.yaml`; tags carry the git commit, the
model and the data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline import PROJECT_ROOT
from pipeline.config import TrackingConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# Fail fast on an unreachable server instead of retrying for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_tracking_uri() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file a `sqlite:///` URL opens, resolved as SQLAlchemy resolves it (against the current
    folder; `~` is not expanded); None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite:///") or url.removeprefix("sqlite:///") in ("", ":memory:"):
        return None
    return Path(url.removeprefix("sqlite:///")).resolve()


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's database file (MLflow's own
    default is ./mlruns under the current directory), else the store's default (a server decides)."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "artifacts").as_uri()


def tracking_uri(cfg: TrackingConfig) -> str:
    """`tracking.uri`, else the embedded SQLite store; `tracking=server` (`server: true`) requires a uri."""
    if cfg.server and not cfg.uri:
        raise PipelineError("tracking=server needs tracking.uri=http://<host>:<port> (the MLflow tracking server)")
    return cfg.uri or default_tracking_uri()


_PARAM_KEY_INVALID = re.compile(r"[^\w\-. :/]")


def param_key(key: str) -> str:
    """An MLflow-valid param name: characters MLflow rejects (the * [ ] ? of site globs) become '_', and a
    changed name gets a short hash of the original, so that globs such as `blocks.*.x` and `blocks.?.x` stay
    two params."""
    valid = _PARAM_KEY_INVALID.sub("_", key)
    return valid if valid == key else f"{valid}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1, 'c': None}} -> {'a.b': 1}; lists stay values, unset (None) values are left out."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif v is not None:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Parent run + nested stage runs. With `enabled=False` every call is a no-op."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.uri = tracking_uri(cfg)
        self.parent_id: str | None = None
        self.active_id: str | None = None
        self._client = None

    # -- set-up -----------------------------------------------------------------
    def connect(self) -> None:
        """Check the store answers and the experiment exists; one clear error if not."""
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        try:
            path = sqlite_path(self.uri)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(self.uri)
            client = MlflowClient(self.uri)
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                artifact_location = artifact_root(self.uri)
                self.experiment_id = client.create_experiment(self.cfg.experiment, artifact_location=artifact_location)
            else:
                self.experiment_id = exp.experiment_id
        except Exception as e:  # MlflowException, requests errors, sqlalchemy errors
            raise PipelineError(f"MLflow tracking store {self.uri} is unreachable: {str(e).splitlines()[0][:200]}") from None
        self._client = client

    @property
    def client(self):
        return self._client

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"git_commit": git_commit(), **tags})
        self.parent_id = self.active_id = run.info.run_id
        self.log_params(params)

    def end(self, failed: bool = False) -> None:
        """Terminate the parent run; on failure also any stage run or run below a stage (a search trial)
        that an interrupt left RUNNING (for example stopped mid-`create_run`)."""
        if not (self.enabled and self.parent_id):
            return
        if failed:
            stages = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'")
            ours = {self.parent_id, *(run.info.run_id for run in stages)}
            for run in self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'"):
                if run.data.tags.get("mlflow.parentRunId") in ours:
                    self.client.set_terminated(run.info.run_id, "FAILED")
        self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")

    # -- stages -------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A nested run for one stage; marked FAILED if the stage raises."""
        if not self.enabled:
            yield
            return
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.parent_id, "stage": name}
        )
        self.active_id = run.info.run_id
        try:
            yield
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        finally:
            self.active_id = self.parent_id
        self.client.set_terminated(run.info.run_id, "FINISHED")

    # -- logging ----------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(param_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.active_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, parent: bool = False) -> None:
        """Log finite scalar metrics (non-finite values are skipped: MLflow rejects them)."""
        if not self.enabled:
            return
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        run_ids = [self.active_id] + ([self.parent_id] if parent and self.parent_id != self.active_id else [])
        for run_id in run_ids:
            for i in range(0, len(items), 1000):
                self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_series(self, key: str, values: Mapping[int, float]) -> None:
        """One metric over steps (e.g. `sqnr/sv_attn` with step = block index)."""
        if not self.enabled:
            return
        for step, value in values.items():
            self.log_metrics({key: value}, step=int(step))

    def set_tags(self, tags: Mapping[str, str], parent: bool = False) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self.client.set_tag(self.parent_id if parent else self.active_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.active_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.active_id, str(path), artifact_path)

    # -- nested runs below a stage (e.g. one per search trial) -----------------------------
    @classmethod
    def attach(cls, cfg: TrackingConfig, run_id: str | None) -> "Tracker":
        """A tracker in another process (a search worker) that logs below an existing run."""
        tracker = cls(cfg)
        if tracker.enabled and run_id:
            tracker.connect()
            tracker.parent_id = tracker.active_id = run_id
        else:
            tracker.enabled = False
        return tracker

    def child_run(self, name: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None, json_artifacts: Mapping[str, Any] | None = None, step: int = 0) -> str | None:
        """A finished run nested under the active run: finite metrics, tags and JSON files as artifacts. Returns its id."""
        if not self.enabled or not self.active_id:
            return None
        import json
        import math
        import tempfile
        import time

        from mlflow.entities import Metric, RunTag

        run = self.client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.active_id, **{k: str(v) for k, v in (tags or {}).items()}})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))]
        if items:
            self.client.log_batch(run_id, metrics=items, tags=[RunTag("stage", "trial")])
        if json_artifacts:
            with tempfile.TemporaryDirectory() as tmp:
                for file_name, obj in json_artifacts.items():
                    path = Path(tmp) / file_name
                    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
                    self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FINISHED")
        return run_id


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . space / only."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def resolve_run_dir(from_run: str, cfg: TrackingConfig, dest: Path) -> Path:
    """`from_run` is a run directory or an MLflow run id.

    For a run id, the parent run's `run_dir` tag is used when that folder exists here;
    otherwise the run's artifacts are downloaded into `dest`.
    """
    path = Path(from_run)
    if path.is_dir():
        return path
    if not cfg.enabled:
        raise PipelineError(f"from_run={from_run} is not a directory (and tracking is disabled, so it cannot be a run id)")
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    try:
        run = client.get_run(from_run)
    except Exception:
        raise PipelineError(f"from_run={from_run} is neither a run directory nor an MLflow run id in {tracking_uri(cfg)}") from None
    run_dir = run.data.tags.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        return Path(run_dir)
    # Stage artifacts live in the nested stage runs under '<stage>/': merge them into one folder.
    shutil.rmtree(dest, ignore_errors=True)  # never merged with an earlier download (another run's state)
    dest.mkdir(parents=True, exist_ok=True)
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{from_run}'")
    for child in [run, *children]:
        mlflow.artifacts.download_artifacts(run_id=child.info.run_id, dst_path=str(dest), tracking_uri=tracking_uri(cfg))
    return dest

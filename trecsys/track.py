"""Experiment tracking through the field's own tools, both optional (`pip install 'transfer-recsys[tracking]'`):

- TensorBoard: event files in `<run_dir>/tensorboard/<stage>/` (one sub-folder per fine-tuning
  candidate, so their curves overlay): `tensorboard --logdir <run_dir>/tensorboard`.
- MLflow: one run per stage in the experiment `track.mlflow_experiment` (default: the run folder's
  name), with the resolved config as params, every logged training step as metrics, the evaluation's
  numbers, and the stage's output folder as artifacts. The default store is a SQLite file inside the
  run folder (`<run_dir>/mlflow.db`, files in `<run_dir>/mlartifacts/`); `track.mlflow_tracking_uri`
  points it anywhere else (`http://host:5000`, `databricks`, ...).

Only rank 0 tracks. The packages are imported when a stage opens a tracker with tracking switched on,
so nothing here costs anything otherwise; `TrackConfig.validate` already refused a config that asks
for a package that is not installed.
"""

from __future__ import annotations

import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trecsys.config import ExperimentConfig, to_dict
from trecsys.errors import TrecError

TENSORBOARD_DIR = "tensorboard"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def mlflow_key(name: str) -> str:
    """MLflow accepts letters, digits and `_-. /:` in names: `ndcg@10` becomes `ndcg_at_10`."""
    return re.sub(r"[^\w.\- /:]", "_", name.replace("@", "_at_"))


class Tracker:
    """What one stage sends to TensorBoard and MLflow; a no-op when both are off (or on ranks > 0)."""

    def __init__(self, cfg: ExperimentConfig, stage: str, active: bool = True, fresh: bool = True):
        self.stage = stage
        self.run_dir = Path(cfg.run_dir).expanduser().resolve()
        track = cfg.track
        self._writers: dict[str, Any] = {}
        self._tb_root = self.run_dir / TENSORBOARD_DIR / stage if active and track.tensorboard else None
        if self._tb_root is not None and fresh and self._tb_root.exists():
            shutil.rmtree(self._tb_root)  # a re-run replaces the stage's curves instead of doubling them
        self._client = self._run_id = None
        if active and track.mlflow:
            self._start_mlflow(cfg)

    # -- MLflow ----------------------------------------------------------------------------------

    def _start_mlflow(self, cfg: ExperimentConfig) -> None:
        from mlflow import MlflowClient

        uri = cfg.track.mlflow_tracking_uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        name = cfg.track.mlflow_experiment or self.run_dir.name
        try:
            if not cfg.track.mlflow_tracking_uri:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                artifacts = None if cfg.track.mlflow_tracking_uri else (self.run_dir / "mlartifacts").as_uri()
                experiment_id = client.create_experiment(name, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, run_name=self.stage,
                                    tags={"trecsys.stage": self.stage, "trecsys.run_dir": str(self.run_dir)})
        except Exception as exc:  # the store is unreachable or refuses: say so before any work is done
            raise TrecError(f"config key 'track.mlflow_tracking_uri': cannot start an MLflow run at {uri}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        self._client, self._run_id = client, run.info.run_id
        self.log_params(to_dict(cfg))

    def log_params(self, config: dict) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        params = [Param(mlflow_key(k), str(v)[:6000]) for k, v in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self._client.log_batch(self._run_id, params=params[start:start + 100])

    # -- metrics -------------------------------------------------------------------------------------

    def _writer(self, group: str):
        if group not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[group] = SummaryWriter(log_dir=str(self._tb_root / group if group else self._tb_root))
        return self._writers[group]

    def log_metrics(self, metrics: dict[str, float], step: int, group: str = "") -> None:
        """Scalars at `step`; `group` (a fine-tuning candidate) is a TensorBoard sub-run and an MLflow prefix."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        if self._tb_root is not None:
            writer = self._writer(group)
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            prefix = f"{group}/" if group else ""
            batch = [Metric(mlflow_key(prefix + k), v, now, step) for k, v in metrics.items()]
            for start in range(0, len(batch), 1000):
                self._client.log_batch(self._run_id, metrics=batch[start:start + 1000])

    def log_training(self, record: dict, group: str = "") -> None:
        """One train_log.jsonl record of the engine: train loss, lr, speed and the validation, if any."""
        metrics = {"train/loss": record["loss"], "train/lr": record["lr"],
                   "train/sequences_per_s": record["sequences_per_s"], "train/epoch": record["epoch"]}
        metrics.update({f"valid/{k}": v for k, v in (record.get("valid") or {}).items()})
        self.log_metrics(metrics, record["step"], group)

    def log_evaluation(self, metrics_df, split: str) -> None:
        """The evaluation's overall numbers (slice `all`) per ranked system: `<split>/<system>/<metric>@<k>`."""
        rows = metrics_df[metrics_df["slice"] == "all"]
        values = {f"{split}/{r.run}/{r.metric}@{int(r.k)}": float(r.value) for r in rows.itertuples()}
        self.log_metrics(values, step=0)

    def log_artifacts(self, folder: Path) -> None:
        if self._client is not None:
            self._client.log_artifacts(self._run_id, str(folder))

    def close(self, status: str = "FINISHED") -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self._client is not None:
            self._client.set_terminated(self._run_id, status=status)
            self._client = None


@contextmanager
def tracking(cfg: ExperimentConfig, stage: str, active: bool = True, fresh: bool = True):
    """A Tracker for one stage, closed as FINISHED, or FAILED/KILLED when the stage raises."""
    tracker = Tracker(cfg, stage, active, fresh)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()

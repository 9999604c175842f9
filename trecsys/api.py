"""The Python API: the code the `trec` commands run, for notebooks and services.

    import trecsys

    run = trecsys.load_run("my-exp/demo.yaml")            # a config file (and overrides), or a run folder
    run.recommend(users=["u00001"], k=5)                   # DataFrame: user_id, rank, item_id, score, title
    run.recommend(histories={"someone-new": ["FOO0001"]})  # lists for histories the run has never seen
    run.evaluate()                                         # `trec evaluate`: writes eval/, returns the metrics
    run.metrics()                                          # eval/metrics.parquet
    run.train_log("finetune")                              # the stage's train_log.jsonl records

A Run holds only the resolved config; each call reads the run folder as the matching command would
(torch and the stages load on the first call that needs them). Errors are the CLI's TrecErrors
(`trecsys.errors`), each with a one-line message and an `exit_code`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from trecsys.config import ExperimentConfig, load_config
from trecsys.errors import ArtifactError, DataError
from trecsys.stage_table import EVALUATE, FINETUNE, RECOMMEND, STAGES

# Stage folders that keep the config they ran with, newest pipeline stage first.
_CONFIG_FOLDERS = tuple(s.folder for s in reversed(STAGES) if s is not RECOMMEND)


def load_run(config: str | Path, overrides: list[str] | None = None) -> Run:
    """A run from its experiment YAML (with dotted `overrides`, as on the command line), or from a run
    folder (the config its latest stage saved, with `run_dir` pointing at that folder)."""
    path = Path(config)
    if path.is_dir():
        saved = next((path / f / "config.yaml" for f in _CONFIG_FOLDERS if (path / f / "config.yaml").is_file()), None)
        if saved is None:
            raise ArtifactError(f"{path} holds no stage folder with a config.yaml: give the experiment YAML")
        return Run(load_config(saved, [*(overrides or []), f"run_dir={path}"]))
    return Run(load_config(path, overrides))


@dataclasses.dataclass
class Run:
    """One experiment: its resolved config and the folder its stages write to."""

    config: ExperimentConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir).expanduser()

    def items(self, domain: str | None = None):
        """The catalogue of `domain` (default: the target) as a DataFrame: item_id, title, text, ..."""
        from trecsys.prepared.tables import load_prepared

        prepared = load_prepared(self.run_dir)
        d = prepared.domain(domain or prepared.target, key="domain")
        return prepared.items.iloc[d.item_start:d.item_stop].reset_index(drop=True)

    def recommend(self, users: list[str] | None = None, histories: dict[str, list[str]] | None = None,
                  k: int | None = None, model: str | None = None, item_texts: dict[str, str] | None = None):
        """Top-k lists, as `trec recommend` makes them (the config's recommend section: fusion, filters,
        diversity, exclude_seen), returned instead of written: a DataFrame of user_id, rank, item_id,
        score and title. `users` are known user ids (default: every user of the domain, when no
        histories are given); `histories` maps a user id to item ids in order, replacing what the run
        knows about that user; items new to the catalogue need their text in `item_texts`."""
        from trecsys.prepared.tables import load_prepared
        from trecsys.rank.requests import Catalogue, History, user_requests
        from trecsys.rank.rerank import category_mask
        from trecsys.runtime import resolve_device
        from trecsys.stages import recommend as stage

        cfg = self.config
        if k is not None:
            cfg = dataclasses.replace(cfg, recommend=dataclasses.replace(cfg.recommend, k=k))
            cfg.recommend.validate()
        rc = cfg.recommend
        prepared = load_prepared(self.run_dir)
        domain = prepared.domain(rc.domain or prepared.target, key="recommend.domain")
        rankers = stage.resolve_rankers(cfg, model, prepared)
        given = [History(user, [str(i) for i in items], [(item_texts or {}).get(str(i)) for i in items],
                         f"histories[{user!r}]") for user, items in (histories or {}).items()]
        requests = user_requests(Catalogue(prepared, domain), users, given or None, rc.exclude_seen)
        if requests.unknown:
            shown = ", ".join(repr(u) for u in requests.unknown[:5])
            raise DataError(f"{len(requests.unknown)} user id(s) not in the prepared data: {shown}; give their "
                            "histories instead")
        items = prepared.items.iloc[domain.item_start:domain.item_stop].reset_index(drop=True)
        allowed = category_mask(items, rc.include_categories, rc.exclude_categories, domain.name)
        values, index = stage.rank(cfg, prepared, domain, rankers, requests, allowed, resolve_device(cfg.device))
        table = stage.output_table(requests, "users", values, index, items["item_id"].astype(str).to_numpy())
        frame = table.to_pandas()
        frame["title"] = frame["item_id"].map(stage.item_titles(items))
        return frame

    def evaluate(self, split: str = "test", model: str | None = None, compare: list[str] | None = None):
        """`trec evaluate`: full-ranking metrics with intervals, the report and plots in <run_dir>/eval/;
        returns the metrics table (run, split, slice, metric, k, value, ci_low, ci_high, n_users)."""
        from trecsys.stages import evaluate as stage

        stage.run(self.config, model=model, split=split, compare=compare)
        return self.metrics()

    def metrics(self):
        """The last evaluation's metrics table (<run_dir>/eval/metrics.parquet)."""
        import pandas as pd

        path = self.run_dir / EVALUATE.folder / "metrics.parquet"
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist: run `trec evaluate` (or Run.evaluate()) first")
        return pd.read_parquet(path)

    def train_log(self, stage: str = FINETUNE.folder) -> list[dict[str, Any]]:
        """A training stage's log records (pretrain, distill, finetune): step, loss, lr, valid metrics."""
        from trecsys.rank.report import read_train_log

        path = self.run_dir / stage / "train_log.jsonl"
        if not path.is_file():
            command = next((s.name for s in STAGES if s.folder == stage), stage)
            raise ArtifactError(f"{path} does not exist: run `trec {command}` first")
        return read_train_log(path)

    def manifest(self, folder: str) -> dict[str, Any]:
        """A stage folder's manifest.json (prepared, pretrain, distill, finetune, eval): versions, config,
        inputs, outputs and the stage's own record."""
        from trecsys.artifacts import read_manifest

        return read_manifest(self.run_dir / folder)

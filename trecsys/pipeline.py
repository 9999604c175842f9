"""`trec run`: every stage in pipeline order, each through `trecsys.stages.<name>.run(cfg)` as the CLI
calls it, skipping the stages whose outputs are up to date.

Up to date means: the stage's manifest exists and its output files are intact; the config sections
the stage reads are the same as the ones in its manifest (recorded by the stage when it ran); and
`<run_dir>/pipeline.json` records that `trec run` made exactly these outputs from the upstream
outputs that exist now (sha256 digests of the upstream manifests' outputs). For prepare, and for a
stage run by hand (`trec pretrain-source ...`), the input files its manifest records (with sha256)
must be unchanged instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trecsys.artifacts import (
    MANIFEST,
    check_manifest,
    read_json,
    run_lock,
    sha256_file,
    verify_outputs,
    write_json,
)
from trecsys.config import ExperimentConfig, to_dict
from trecsys.console import log
from trecsys.errors import ArtifactError, ConfigError, TrecError
from trecsys.stage_table import (
    BY_NAME,
    DISTILL,
    EVALUATE,
    FINETUNE,
    PREPARE,
    PRETRAIN,
    RECOMMEND,
    STAGES,
    Stage,
)

STATE = "pipeline.json"


@dataclass
class StageRecord:
    """What `trec run` recorded of a stage it ran: the sha256 digests of its upstream stages' outputs
    then ({stage: digest}, None for one without outputs), and of its own outputs."""

    finished_at: str | None
    upstream: dict[str, str | None]
    outputs: str | None


@dataclass
class PipelineState:
    """<run_dir>/pipeline.json: a record per stage that `trec run` ran."""

    stages: dict[str, StageRecord] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> PipelineState:
        """A hand-edited or foreign file is refused with its path (exit 2)."""
        stages = data.get("stages") if isinstance(data, dict) else None
        if not isinstance(stages, dict):
            raise ArtifactError(f"{path}: not a trecsys pipeline record (an object with a 'stages' object); delete "
                                "it and every stage is checked again from its own manifest")
        for name, record in stages.items():
            if not (isinstance(record, dict) and isinstance(record.get("upstream"), dict)
                    and all(isinstance(v, str | None) for v in record["upstream"].values())
                    and isinstance(record.get("outputs"), str | None)):
                raise ArtifactError(f"{path}: malformed record of stage {name!r}; delete the file and every stage "
                                    "is checked again from its own manifest")
        return cls({name: StageRecord(record.get("finished_at"), dict(record["upstream"]), record.get("outputs"))
                    for name, record in stages.items()})

    @classmethod
    def read(cls, run_dir: Path) -> PipelineState:
        path = run_dir / STATE
        return cls.from_json(read_json(path), path) if path.is_file() else cls()


def manifest_path(stage: Stage, cfg: ExperimentConfig) -> Path:
    """Where `stage` records what it made: its folder's manifest, or recommend's beside its output."""
    if stage.name == RECOMMEND.name:
        from trecsys.stages.recommend import output_paths

        return output_paths(cfg, None).manifest
    folder = eval_folder(cfg) if stage.name == EVALUATE.name else stage.folder
    return Path(cfg.run_dir).expanduser() / folder / MANIFEST


def eval_folder(cfg: ExperimentConfig) -> str:
    """eval/ for the recommendation task, eval_search/ for evaluate.task: search."""
    return EVALUATE.search_folder if cfg.evaluate.task == "search" else EVALUATE.folder


# `distill.teacher: finetune` compresses the target-tuned model: distill then runs after
# finetune-target and reads it (and finetune-target no longer reads distill).
TEACHER_FIRST = (
    PREPARE,
    PRETRAIN,
    dataclasses.replace(FINETUNE, reads=(PREPARE.name, PRETRAIN.name)),
    dataclasses.replace(DISTILL, reads=(PREPARE.name, PRETRAIN.name, FINETUNE.name)),
    EVALUATE,
    RECOMMEND,
)


def pipeline_stages(cfg: ExperimentConfig) -> tuple[Stage, ...]:
    """The stages in the order this config needs them."""
    if cfg.distill.teacher != FINETUNE.folder:
        return STAGES
    if cfg.finetune.init_from == DISTILL.folder:
        raise ConfigError("config keys 'distill.teacher' and 'finetune.init_from': the student is distilled from "
                          "the fine-tuned model, so fine-tuning cannot start from the student; set one of them "
                          "to pretrain")
    return TEACHER_FIRST


@dataclass
class Outcome:
    stage: str
    action: str  # ran, skipped
    reason: str
    seconds: float = 0.0


def run(cfg: ExperimentConfig, stages: str | None = None, force: bool = False, show: int = 3) -> list[Outcome]:
    selected = select(stages, pipeline_stages(cfg))
    run_dir = Path(cfg.run_dir).expanduser()
    outcomes = []
    with run_lock(run_dir / STATE):
        state = PipelineState.read(run_dir)
        for stage in selected:
            reason = "--force" if force else staleness(stage, cfg, state.stages.get(stage.name))
            if reason is None:
                outcomes.append(_note(Outcome(stage.name, "skipped", "up to date")))
                continue
            log(f"run: {stage.name}: running ({reason})")
            started = time.perf_counter()
            module = importlib.import_module(stage.module)
            try:
                module.run(cfg)
            except (TrecError, KeyboardInterrupt):
                log(f"run: {stage.name}: failed; later stages were not run")
                raise
            outcomes.append(Outcome(stage.name, "ran", reason, time.perf_counter() - started))
            state.stages[stage.name] = _record(stage, cfg)
            write_json(run_dir / STATE, state.to_json())
    print(summary(outcomes))
    ran = {o.stage for o in outcomes if o.action == "ran"}
    shown = results(cfg, [s for s in selected if not (s.name == EVALUATE.name and EVALUATE.name in ran)], show)
    if shown:
        print(shown)
    return outcomes


def select(stages: str | None, order: tuple[Stage, ...] = STAGES) -> list[Stage]:
    if not stages:
        return list(order)
    names = [n.strip() for n in stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise ConfigError(f"option --stages: unknown stage {unknown[0] if unknown else stages!r}; "
                          f"choose from {','.join(BY_NAME)}")
    return [s for s in order if s.name in names]


def _note(outcome: Outcome) -> Outcome:
    log(f"run: {outcome.stage}: skipped ({outcome.reason})")
    return outcome


def results(cfg: ExperimentConfig, selected: list[Stage], show: int) -> str:
    """What the run is for, whether its stages ran now or earlier: the evaluation table (left out by
    the caller when `trec evaluate` just printed it) and a few users' recommendations with item titles."""
    parts = []
    names = {s.name for s in selected}
    eval_dir = Path(cfg.run_dir).expanduser() / eval_folder(cfg)
    if EVALUATE.name in names and (eval_dir / "metrics.parquet").is_file():
        import pandas as pd

        from trecsys.rank.report import read_context, terminal_table

        manifest = eval_dir / "manifest.json"
        context = read_context(check_manifest(read_json(manifest), manifest), manifest)
        parts.append(terminal_table(pd.read_parquet(eval_dir / "metrics.parquet"), context)
                     + f"\n(full report: {eval_dir / 'report.md'})")
    if RECOMMEND.name in names and show > 0:
        from trecsys.stages.recommend import show_latest

        shown = show_latest(cfg, show)
        if shown:
            parts.append(shown)
    return "\n\n".join(parts)


def summary(outcomes: list[Outcome]) -> str:
    width = max((len(o.stage) for o in outcomes), default=5)
    lines = ["run: summary"]
    for o in outcomes:
        took = f" in {o.seconds:.1f} s" if o.action == "ran" else ""
        lines.append(f"  {o.stage.ljust(width)}  {o.action.ljust(7)}  {o.reason}{took}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Up to date?


def staleness(stage: Stage, cfg: ExperimentConfig, record: StageRecord | None) -> str | None:
    """Why the stage must run, or None when its outputs are up to date."""
    path = manifest_path(stage, cfg)
    if not path.is_file():
        return f"no output yet ({path.parent})"
    try:
        manifest = read_json(path)
        verify_outputs(path.parent, manifest)
    except ArtifactError as exc:
        return f"its outputs changed ({exc})"
    changed = changed_keys(sections(stage, manifest.get("config", {})), sections(stage, to_dict(cfg)))
    if changed:
        return "config changed: " + "; ".join(changed[:3]) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
    if stage.name == PREPARE.name:
        return _changed_input(manifest, cfg)
    if record is None or record.outputs != outputs_digest(manifest):
        # Made outside `trec run` (a stage run by hand): its manifest says what it read.
        return _changed_input(manifest, cfg)
    for name in stage.reads:
        if record.upstream.get(name) != _digest_of(BY_NAME[name], cfg):
            return f"the output of {name} changed"
    return None


def sections(stage: Stage, config: dict) -> dict:
    return {key: config.get(key) for key in stage.sections}


def changed_keys(then: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as `key old → new`."""
    out = []
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_short(a)} → {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _changed_input(manifest: dict, cfg: ExperimentConfig) -> str | None:
    """The files a stage's manifest says it read (relative paths are in run_dir): size and mtime
    first, sha256 only when they differ. None when all are as they were."""
    for entry in manifest.get("inputs", []):
        path = Path(cfg.run_dir).expanduser() / entry["path"]  # an absolute path stays itself
        if "sha256" not in entry:
            return f"made outside `trec run`, and its manifest has no digest of {entry['path']}"
        if not path.is_file():
            return f"input {path} is missing"
        stat = path.stat()
        if stat.st_size != entry["size"] or (stat.st_mtime_ns != entry["mtime_ns"] and sha256_file(path) != entry["sha256"]):
            return f"input {path} changed"
    return None


def outputs_digest(manifest: dict) -> str:
    pairs = sorted((e["path"], e["sha256"]) for e in manifest.get("outputs", []))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _digest_of(stage: Stage, cfg: ExperimentConfig) -> str | None:
    path = manifest_path(stage, cfg)
    return outputs_digest(check_manifest(read_json(path), path)) if path.is_file() else None


def _record(stage: Stage, cfg: ExperimentConfig) -> StageRecord:
    return StageRecord(
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        upstream={name: _digest_of(BY_NAME[name], cfg) for name in stage.reads},
        outputs=_digest_of(stage, cfg),
    )


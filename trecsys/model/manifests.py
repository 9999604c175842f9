"""What the training stages record about the models they leave: finetune/manifest.json's
`FinetuneManifest` (every candidate's `CandidateResult` and the one kept) and distill/manifest.json's
`DistillManifest`, beside the config and files every manifest has.

Why here and not in their stage modules, which write them: ranking reads them too (rank/report.py
marks the kept candidate's learning curve), and rank/ may not import stages/ (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from trecsys.artifacts import read_record
from trecsys.stage_table import DISTILL, FINETUNE


@dataclass
class CandidateResult:
    strategy: str
    valid: dict[str, float]
    best_step: int | None
    steps: int
    stopped: str  # the engine's FitResult.stopped, or stages.finetune_target.NOT_TRAINED / FUSED
    n_parameters: int
    n_trainable: int
    train_s: float
    # Trainable parameters per part (text tower, ids, sequence tower).
    trainable_by_part: dict[str, int] = field(default_factory=dict)


@dataclass
class FinetuneManifest:
    """What finetune/manifest.json records beside the config and files (evaluate, the report and the
    study read it)."""

    seed: int
    target: str
    strategy: str  # finetune.strategy as configured (auto, or one strategy)
    chosen: str  # the strategy whose model is in the folder
    chosen_by: str
    metrics: dict[str, float]  # the chosen candidate's validation metrics
    candidates: dict[str, CandidateResult]
    init_from: str | None
    history: str
    train_fraction: float
    n_train_users: int
    n_parameters: int
    n_trainable: int
    timings_s: dict[str, float]
    # The chosen model's trainable parameters per part (text tower, ids, sequence tower).
    n_trainable_by_part: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FinetuneManifest:
        return cls(**{**data, "candidates": {k: CandidateResult(**v) for k, v in data["candidates"].items()}})

    @classmethod
    def read(cls, folder: Path) -> FinetuneManifest:
        return read_record(cls, folder, FINETUNE.name)


@dataclass
class DistillManifest:
    """What distill/manifest.json records beside the config and files (evaluate and the study read it)."""

    seed: int
    teacher: str  # the teacher's checkpoint folder
    data: list[str]  # the domains whose train sequences it distilled on
    metrics: dict[str, float] | None  # the best student's validation metrics
    best_step: int | None
    steps: int
    stopped: str
    n_parameters: int
    comparison: dict  # {"teacher": ..., "student": ...} from stages.distill.measure()
    precision: str
    world_size: int
    timings_s: dict[str, float]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DistillManifest:
        return cls(**data)

    @classmethod
    def read(cls, folder: Path) -> DistillManifest:
        return read_record(cls, folder, DISTILL.name)

"""The pipeline's stages, in one table: each stage's CLI command, the folder it writes in the run
folder, the config sections its outputs depend on, and the stages whose outputs it reads. Every
other module names a stage or its folder through this table (`PRETRAIN.folder`, never "pretrain").

Why here, in the lowest layer beside artifacts.py, and not in pipeline.py, which runs it: code of
every layer names a stage's folder (prepared/ loads `<run_dir>/prepared/`, model/checkpoint.py finds
the latest checkpoint among the training stages' folders, rank/report.py reads their training
logs), and the layer rule of docs/ARCHITECTURE.md lets none of them import pipeline.py. The table is
plain data (no imports of trecsys), so any layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command (`trec <name>`), and the `stage` its manifest records
    folder: str  # what it writes, in run_dir
    # Top-level config keys whose values the stage's outputs depend on (`trec run` re-runs it when one
    # changes). A stage that adds a config section must add it here.
    sections: tuple[str, ...]
    reads: tuple[str, ...]  # names of the stages whose outputs it reads (`trec run` runs them first)
    checkpoint: bool = False  # its folder holds a model (model/checkpoint.py)
    # Its folder for the search task (evaluate.task: search; recommend --queries), None when it has none.
    search_folder: str | None = None

    @property
    def module(self) -> str:
        """The module whose `run(cfg)` the CLI and `trec run` call."""
        return f"trecsys.stages.{self.name.replace('-', '_')}"


PREPARE = Stage("prepare", "prepared", ("seed", "data", "embedding"), ())
PRETRAIN = Stage("pretrain-source", "pretrain", ("seed", "model", "pretrain"), ("prepare",), checkpoint=True)
DISTILL = Stage("distill", "distill", ("seed", "model", "distill"), ("prepare", "pretrain-source"), checkpoint=True)
# finetune.init_from may name the student, so fine-tuning reads distill's output (pipeline.py reverses
# the two for distill.teacher: finetune).
FINETUNE = Stage("finetune-target", "finetune", ("seed", "model", "finetune"),
                 ("prepare", "pretrain-source", "distill"), checkpoint=True)
_MODELS = ("prepare", "pretrain-source", "distill", "finetune-target")
EVALUATE = Stage("evaluate", "eval", ("seed", "evaluate", "search"), _MODELS, search_folder="eval_search")
RECOMMEND = Stage("recommend", "recommend", ("recommend", "search"), _MODELS, search_folder="queries")

# Pipeline order.
STAGES = (PREPARE, PRETRAIN, DISTILL, FINETUNE, EVALUATE, RECOMMEND)
BY_NAME = {s.name: s for s in STAGES}
# The stages that leave a model in their folder, in pipeline order.
TRAINING = tuple(s for s in STAGES if s.checkpoint)

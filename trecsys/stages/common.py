"""What the training stages share: checking the prepared data against the config, and writing the
stage folder (windows and the loss: trecsys/train/next_item.py; validation: trecsys/rank/validation.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trecsys.artifacts import MANIFEST, stage_output, write_manifest, write_text
from trecsys.config import ExperimentConfig, to_dict, to_yaml
from trecsys.errors import ArtifactError
from trecsys.prepared.tables import DomainRange, Prepared

MONITOR = "ndcg@10"

# ---------------------------------------------------------------------------------------------
# Prepared data


def check_prepared(prepared: Prepared, cfg: ExperimentConfig) -> list[str]:
    """Refuse prepared data made for another config; return its source domains."""
    made_with = prepared.manifest.encoder_name
    if made_with != cfg.embedding.encoder:
        raise ArtifactError(
            f"{prepared.folder / MANIFEST}: the item embeddings were made with encoder {made_with!r}, but config "
            f"key 'embedding.encoder' is {cfg.embedding.encoder!r}: re-run `trec prepare` or set it back"
        )
    sources = prepared.source
    if cfg.data.source and list(cfg.data.source) != sources:
        raise ArtifactError(
            f"{prepared.folder / MANIFEST}: prepared with source domains {sources}, but config key "
            f"'data.source' is {list(cfg.data.source)}: re-run `trec prepare`"
        )
    return sources


def check_target(prepared: Prepared, cfg: ExperimentConfig) -> DomainRange:
    """The target domain's item range; `data.target` must be the prepared target."""
    domain = prepared.domain(cfg.data.target, key="data.target")
    if cfg.data.target != prepared.target:
        raise ArtifactError(
            f"{prepared.folder / MANIFEST}: prepared with target domain {prepared.target!r}, but config key "
            f"'data.target' is {cfg.data.target!r}: set it back or re-run `trec prepare`"
        )
    return domain


# ---------------------------------------------------------------------------------------------
# The stage folder


def write_stage_folder(out: Path, files: dict[str, Path], cfg: ExperimentConfig, stage: str,
                       inputs: list[dict], extra: dict) -> None:
    """Copy `files` ({relative destination: source}) into a fresh `out`, with config.yaml and a
    manifest, swapped in atomically by `stage_output`."""
    with stage_output(out) as folder:
        for destination, source in files.items():
            (folder / destination).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / destination)
        write_text(folder / "config.yaml", to_yaml(cfg))
        write_manifest(folder, stage, to_dict(cfg), inputs=inputs, extra=extra)


def metrics_line(metrics: dict | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if "/" not in k)

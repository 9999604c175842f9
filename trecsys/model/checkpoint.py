"""Which trained model a run holds, and whether a model or run fits our prepared data: shared by the
stages that read checkpoints (evaluate, recommend).
"""

from __future__ import annotations

from pathlib import Path

from trecsys.artifacts import read_manifest, sha256_file
from trecsys.errors import ArtifactError
from trecsys.prepared.tables import Prepared

# Where a run keeps its checkpoints, latest pipeline stage first.
MODEL_STAGES = ("finetune", "distill", "pretrain")
# The prepared files two runs must share to be compared user by user.
COMPARABLE_FILES = ("items.parquet", "interactions.parquet")
WEIGHTS = "model.safetensors"


def prepared_file_inputs(prepared: Prepared) -> list[dict]:
    """The prepared files a ranking stage reads, as manifest inputs named from the run folder
    (with their sha256, so `trec run` can tell whether a hand-run stage is still up to date)."""
    return [{**entry, "path": f"{prepared.folder.name}/{entry['path']}"}
            for entry in prepared.manifest.get("outputs", []) if entry["path"] in COMPARABLE_FILES]


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / WEIGHTS).is_file() and (Path(folder) / "config.json").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """finetune/, else distill/, else pretrain/: the last pipeline stage that left a model."""
    for stage in MODEL_STAGES:
        if is_checkpoint(Path(run_dir) / stage):
            return Path(run_dir) / stage
    return None


def check_same_prepared(other: Path, prepared: Prepared, option: str,
                        files: tuple[str, ...] = COMPARABLE_FILES,
                        what_to_do: str = "compare runs prepared from the same data") -> None:
    """Refuse another prepared folder whose `files` differ from ours (paired comparisons need the same
    users, targets and catalogue; a model needs the same catalogue)."""
    if Path(other).resolve() == prepared.folder.resolve():
        return
    ours = output_hashes(prepared.manifest)
    theirs = output_hashes(read_manifest(other, stage="prepare"))
    for name in files:
        if ours.get(name) != theirs.get(name):
            raise ArtifactError(
                f"{option}: {Path(other) / name} (sha256 {str(theirs.get(name))[:12]}…) differs from "
                f"{prepared.folder / name} (sha256 {str(ours.get(name))[:12]}…): {what_to_do}"
            )


def output_hashes(manifest: dict) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in manifest.get("outputs", [])}


def weights_sha256(folder: Path) -> str:
    """The checkpoint's fingerprint: sha256 of its weights file."""
    return sha256_file(Path(folder) / WEIGHTS)

"""Which prepared data this is: its fingerprint, the files a ranking stage names as its inputs, and
whether another run's prepared folder holds the same users, targets and catalogue as ours.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trecsys.artifacts import MANIFEST, describe_file, read_manifest, sha256_file
from trecsys.errors import ArtifactError
from trecsys.prepared.tables import Prepared
from trecsys.stage_table import PREPARE

# The prepared files two runs must share to be compared user by user.
COMPARABLE_FILES = ("items.parquet", "interactions.parquet")


def prepared_fingerprint(prepared: Prepared) -> str:
    """sha256 of the prepared manifest: it changes whenever `trec prepare` runs again."""
    return sha256_file(prepared.folder / MANIFEST)


def catalogue_identity(prepared: Prepared) -> dict:
    """What a model's item indices mean: sha256 of the ordered (domain, item id) list, and the text
    encoder that made the item embeddings. Two catalogues of the same size with one item renamed
    differ here, which n_items alone cannot tell."""
    items = prepared.items.sort_values("item_idx")
    listed = json.dumps([items["domain"].astype(str).tolist(), items["item_id"].astype(str).tolist()])
    encoder = prepared.manifest.encoder
    if isinstance(encoder, dict):
        encoder = f"{encoder.get('name')}@{encoder.get('revision')}"
    return {"items_sha256": hashlib.sha256(listed.encode()).hexdigest(), "n_items": int(len(items)),
            "encoder": str(encoder), "prepared": str(prepared.folder.resolve())}


def prepared_input(prepared: Prepared, run_dir: Path) -> dict:
    """The prepared manifest as a training stage's manifest input."""
    return describe_file(prepared.folder / MANIFEST, root=run_dir)


def prepared_file_inputs(prepared: Prepared) -> list[dict]:
    """The prepared files a ranking stage reads, as manifest inputs named from the run folder
    (with their sha256, so `trec run` can tell whether a hand-run stage is still up to date)."""
    return [{**entry, "path": f"{prepared.folder.name}/{entry['path']}"}
            for entry in prepared.outputs if entry["path"] in COMPARABLE_FILES]


def check_same_prepared(other: Path, prepared: Prepared, option: str,
                        files: tuple[str, ...] = COMPARABLE_FILES,
                        what_to_do: str = "compare runs prepared from the same data") -> None:
    """Refuse another prepared folder whose `files` differ from ours (paired comparisons need the same
    users, targets and catalogue; a model needs the same catalogue)."""
    if Path(other).resolve() == prepared.folder.resolve():
        return
    ours = output_hashes(prepared.outputs)
    theirs = output_hashes(read_manifest(other, stage=PREPARE.name)["outputs"])
    for name in files:
        if ours.get(name) != theirs.get(name):
            raise ArtifactError(
                f"{option}: {Path(other) / name} (sha256 {str(theirs.get(name))[:12]}…) differs from "
                f"{prepared.folder / name} (sha256 {str(ours.get(name))[:12]}…): {what_to_do}"
            )


def output_hashes(outputs: list[dict]) -> dict[str, str]:
    """{path: sha256} of a manifest's output entries."""
    return {entry["path"]: entry["sha256"] for entry in outputs}

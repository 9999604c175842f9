"""Checkpoints, in one place: a folder with `model.safetensors` (the weights; never pickle) and
`config.json` (what rebuilds the model, and what the stage that trained it recorded). This module
owns their file names, saving and loading, which checkpoint a run holds ("latest"), and the one
check of whether a checkpoint fits a run's prepared catalogue.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from trecsys import __version__
from trecsys.artifacts import atomic_path, read_json, sha256_file, verify_stage_folder, write_json
from trecsys.config import ModelConfig, build
from trecsys.errors import ArtifactError, ConfigError
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.identity import catalogue_identity, prepared_fingerprint
from trecsys.prepared.tables import Prepared
from trecsys.stage_table import TRAINING

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Run folders that hold a checkpoint, latest pipeline stage first, and the command that writes each.
CHECKPOINT_STAGES = {s.folder: s.name for s in reversed(TRAINING)}
# Where config.json's `extra` records the prepared data the model was trained on, and the catalogue
# (ordered item ids and text encoder) its item indices refer to.
PREPARED_KEY = "prepared_manifest_sha256"
CATALOGUE_KEY = "catalogue"


def trained_on(prepared: Prepared) -> dict:
    """What every training stage records in a checkpoint's `extra` about the data it was trained on."""
    return {PREPARED_KEY: prepared_fingerprint(prepared), CATALOGUE_KEY: catalogue_identity(prepared)}


@dataclass
class CheckpointInfo:
    """config.json: the architecture and sizes that rebuild the model, and `extra`, what the stage
    that trained it recorded (stage, prepared fingerprint, finetune history and strategy, ...)."""

    model: ModelConfig
    text_dim: int
    n_items: int
    trecsys_version: str = __version__
    extra: dict = field(default_factory=dict)
    # Rows of the ID table (the items it trained on; `id_row` in the weights maps items to them).
    # None: a checkpoint from before, with a row for every item.
    n_id_items: int | None = None

    @property
    def history(self) -> str:
        """The `finetune.history` the model was trained with: which items its users' histories hold."""
        return self.extra.get("history", "target")

    @property
    def prepared_sha256(self) -> str | None:
        return self.extra.get(PREPARED_KEY)

    def to_json(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "text_dim": self.text_dim, "n_items": self.n_items,
                "n_id_items": self.n_id_items, "trecsys_version": self.trecsys_version, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> CheckpointInfo:
        try:
            # A checkpoint written before model.seen_bias existed has no such parameter.
            model = build(ModelConfig, {"seen_bias": False, **data["model"]}, where=f" in {path}", prefix="model.")
            n_id_items = data.get("n_id_items")
            return cls(model, int(data["text_dim"]), int(data["n_items"]),
                       str(data.get("trecsys_version", "")), dict(data.get("extra") or {}),
                       None if n_id_items is None else int(n_id_items))
        except ConfigError as exc:
            raise ArtifactError(str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a trecsys model config ({exc!r}): re-save the checkpoint") from None


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_weights(module: nn.Module, folder: Path, name: str = WEIGHTS, metadata: dict | None = None) -> None:
    """`module`'s state dict as safetensors in `folder/name`, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    data = sorted_metadata(save(tensors, metadata=metadata))
    with atomic_path(Path(folder) / name) as tmp:
        tmp.write_bytes(data)


def sorted_metadata(data: bytes) -> bytes:
    """The safetensors bytes `data` with the header's `__metadata__` in key order.

    Why: safetensors builds `__metadata__` as a Rust HashMap, whose iteration order is random per
    map (per process and per call), so the same weights were written with `{"format", "trecsys_version"}`
    in either order: different bytes, so a different sha256 (the checkpoint fingerprint that exact
    resume and stage manifests compare). The tensors' entries and data are already in a fixed order
    (by dtype alignment, then name) and stay as they are; the header is re-padded with spaces to a
    multiple of 8 bytes, as safetensors pads it.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def load_weights(module: nn.Module, folder: Path, name: str = WEIGHTS) -> None:
    """The inverse of `save_weights` (strict: every tensor must match)."""
    module.load_state_dict(read_weights(Path(folder) / name))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"missing checkpoint weights: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: unreadable safetensors ({reason}): the file is truncated or corrupt") from None


def save_checkpoint(model: SeqRecModel, folder: str | Path, extra: dict | None = None) -> None:
    """Write `model.safetensors` and `config.json` into `folder`, each atomically."""
    folder = Path(folder)
    save_weights(model, folder, metadata={"format": "pt", "trecsys_version": __version__})
    info = CheckpointInfo(model.config, model.text_dim, model.n_items, extra=extra or {},
                          n_id_items=len(model.id_items()))
    write_json(folder / CONFIG, info.to_json())


def read_info(folder: str | Path) -> CheckpointInfo:
    """A checkpoint's config.json, without loading its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"checkpoint folder not found: {folder}")
    return CheckpointInfo.from_json(read_json(folder / CONFIG), folder / CONFIG)


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[SeqRecModel, CheckpointInfo]:
    """Rebuild the model from `config.json` and load `model.safetensors`; returns (model, info).

    The text embeddings are not in the checkpoint: call `model.set_item_text(...)` afterwards.
    """
    folder = Path(folder)
    info = read_info(folder)
    try:
        # The table's size from config.json; which item has which row (id_row) from the weights.
        n_id_items = info.n_items if info.n_id_items is None else info.n_id_items
        model = SeqRecModel(info.model, info.text_dim, info.n_items, id_items=range(n_id_items))
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from None
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    tensors = read_weights(weights_path)
    expected = model.state_dict()
    _upgrade_id_table(tensors, expected)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{weights_path} does not match {config_path}: missing tensors {missing[:3]}, "
            f"unexpected tensors {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ArtifactError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)} but {config_path} "
                f"describes {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(map_location), info


def _upgrade_id_table(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """A checkpoint from before `id_row` has an ID row for every item: prepend the zero row."""
    if "id_row" in expected and "id_row" not in tensors and "item_id.weight" in tensors:
        old = tensors["item_id.weight"]
        tensors["item_id.weight"] = torch.cat([old.new_zeros(1, old.shape[1]), old])
        tensors["id_row"] = torch.arange(1, old.shape[0] + 1)


def checkpoint_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """{destination: source} for copying a checkpoint (weights and config.json) into a stage folder."""
    return {f"{prefix}{name}": Path(folder) / name for name in (WEIGHTS, CONFIG)}


def weights_sha256(folder: Path) -> str:
    """The checkpoint's fingerprint: sha256 of its weights file."""
    return sha256_file(Path(folder) / WEIGHTS)


# ---------------------------------------------------------------------------------------------
# Which checkpoint


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / WEIGHTS).is_file() and (Path(folder) / CONFIG).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """finetune/, else distill/, else pretrain/: the last pipeline stage that left a model."""
    for stage in CHECKPOINT_STAGES:
        if is_checkpoint(Path(run_dir) / stage):
            return Path(run_dir) / stage
    return None


def checkpoint_folder(value: str, run_dir: Path) -> Path:
    """A stage name of this run (pretrain, distill, finetune) or a checkpoint folder -> the folder."""
    return Path(run_dir) / value if value in CHECKPOINT_STAGES else Path(value).expanduser()


def resolve_checkpoint(value: str, run_dir: Path, key: str) -> Path:
    """The checkpoint folder `value` names (config key `key`), which must hold a checkpoint."""
    folder = checkpoint_folder(value, run_dir)
    if not is_checkpoint(folder):
        if value in CHECKPOINT_STAGES:
            hint = f"run `trec {CHECKPOINT_STAGES[value]}` first"
        else:
            hint = f"expected one of {', '.join(reversed(CHECKPOINT_STAGES))} or a folder with {WEIGHTS} and {CONFIG}"
        raise ArtifactError(f"config key '{key}': no checkpoint in {folder}: {hint}")
    return folder


# ---------------------------------------------------------------------------------------------
# Does it fit our catalogue?


def check_fits(info: CheckpointInfo, folder: Path, prepared: Prepared, where: str = "",
               same_prepared: bool = False) -> None:
    """Refuse a checkpoint that cannot rank `prepared`'s catalogue, naming what differs. `where`
    prefixes the message (e.g. "config key 'distill.teacher': "). With `same_prepared` (a model that
    a training stage builds on), one recorded as trained on other prepared data is refused too."""
    config_path = Path(folder) / CONFIG
    if same_prepared:
        recorded, current = info.prepared_sha256, prepared_fingerprint(prepared)
        if recorded is not None and recorded != current:
            raise ArtifactError(
                f"{where}{folder} was trained on other prepared data (prepared manifest sha256 "
                f"{recorded[:12]}…, this run's is {current[:12]}…): retrain it on {prepared.folder} or name a "
                "checkpoint of this run"
            )
    if info.n_items != prepared.n_items:
        raise ArtifactError(
            f"{where}{config_path}: the model was built for n_items={info.n_items} but the prepared catalogue "
            f"has {prepared.n_items} items: use it with the run whose prepared data it was trained on"
        )
    text_dim = prepared.embeddings.shape[1]
    if info.text_dim != text_dim:
        raise ArtifactError(
            f"{where}{config_path}: the model expects text_dim={info.text_dim} but the prepared item "
            f"embeddings have {text_dim} dimensions: use the same embedding.encoder"
        )
    check_catalogue(info, folder, prepared, where)


def check_catalogue(info: CheckpointInfo, folder: Path, prepared: Prepared, where: str = "") -> None:
    """Refuse a checkpoint whose item indices mean other items (same size, other ids or order) or whose
    item text came from another encoder. A checkpoint made before catalogues were recorded is checked
    by size only."""
    recorded = info.extra.get(CATALOGUE_KEY)
    if not isinstance(recorded, dict):
        return
    ours = catalogue_identity(prepared)
    theirs = recorded.get("prepared", "its training run")
    if recorded.get("items_sha256") != ours["items_sha256"]:
        raise ArtifactError(
            f"{where}{folder / CONFIG}: the model was trained on another catalogue: item ids sha256 "
            f"{str(recorded.get('items_sha256'))[:12]}… (in {theirs} when it was trained), but {prepared.folder} "
            f"lists sha256 {ours['items_sha256'][:12]}… now, though both have {prepared.n_items} items: its item indices would "
            "name the wrong items; retrain it on this run's prepared data or use it with its own run"
        )
    if recorded.get("encoder") != ours["encoder"]:
        raise ArtifactError(
            f"{where}{folder / CONFIG}: the model was trained on item text embedded by {recorded.get('encoder')} "
            f"({theirs}), but {prepared.folder} was embedded by {ours['encoder']}: use the same embedding.encoder"
        )


def load_fitting(folder: Path, prepared: Prepared, device: str | torch.device = "cpu", where: str = "",
                 same_prepared: bool = False) -> tuple[SeqRecModel, CheckpointInfo]:
    """Load the checkpoint in `folder` after `check_fits`, with the prepared text embeddings attached."""
    try:
        model, info = load_checkpoint(folder, map_location=device)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}{exc}") from None
    check_fits(info, folder, prepared, where, same_prepared)
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    return model, info


def load_named(value: str, run_dir: Path, prepared: Prepared, key: str, verify: bool = False
               ) -> tuple[SeqRecModel, CheckpointInfo, Path]:
    """The checkpoint that config key `key` names (`value`: a stage of this run or a folder), for a
    training stage to build on: its folder checked against its manifest (size + mtime; every sha256
    with `verify`), refused when made for other prepared data or another catalogue."""
    folder = resolve_checkpoint(value, run_dir, key)
    verify_stage_folder(folder, full_hash=verify)
    model, info = load_fitting(folder, prepared, where=f"config key '{key}': ", same_prepared=True)
    return model, info, folder

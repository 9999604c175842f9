"""prepared/manifest.json, typed: what `trec prepare` records beside what every manifest has (config,
inputs, outputs; artifacts.write_manifest). stages/prepare.py writes it with `to_json`; every later
stage reads it as `Prepared.manifest`, by attribute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from trecsys.errors import ArtifactError


@dataclass
class DomainRange:
    name: str
    role: str
    item_start: int
    item_stop: int

    @property
    def n_items(self) -> int:
        return self.item_stop - self.item_start


@dataclass
class PreparedManifest:
    seed: int | None  # None in hand-made prepared folders (tests) that do not record it
    timings_s: dict[str, float]  # wall seconds per step of prepare
    cpu_s: dict[str, float]  # CPU seconds of every thread per step: steadier than wall time on a shared machine
    # {domain: statistics}: role, item_start, item_stop (its items' item_idx range), and the counts
    # of stages/prepare.py's `domain_stats` (users, items, interactions, splits, cold items, ...).
    domains: dict[str, dict]
    source: list[str]
    target: str
    # The text encoder's record (name, revision, pooling, dim, ...: ingest/embed.py); its name alone
    # in older runs; None when not recorded.
    encoder: dict | str | None
    n_users: int
    n_items: int | None
    # The item texts: how many, distinct, embedded by this run, read from the embedding cache, on
    # how many processes (torchrun), seconds and new items per second; None in older runs.
    embedding: dict | None = None

    @property
    def ranges(self) -> dict[str, DomainRange]:
        """Each domain's item_idx range and role."""
        return _ranges(self.domains)

    @property
    def encoder_record(self) -> dict:
        """The encoder record; {"name": ...} for a run that recorded only the name."""
        return self.encoder if isinstance(self.encoder, dict) else {"name": self.encoder}

    @property
    def encoder_name(self) -> str | None:
        return self.encoder_record.get("name")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, path: Path) -> PreparedManifest:
        """The manifest at `path` (already checked by `artifacts.check_manifest`); a missing or
        malformed field is refused naming the file (exit 2)."""
        try:
            domains = {str(name): dict(info) for name, info in data["domains"].items()}
            _ranges(domains)  # every domain has a role and an item range
            return cls(
                seed=None if data.get("seed") is None else int(data["seed"]),
                timings_s=dict(data.get("timings_s") or {}),
                cpu_s=dict(data.get("cpu_s") or {}),
                domains=domains,
                source=list(data["source"]),
                target=str(data["target"]),
                encoder=data.get("encoder"),
                n_users=int(data["n_users"]),
                n_items=None if data.get("n_items") is None else int(data["n_items"]),
                embedding=None if data.get("embedding") is None else dict(data["embedding"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{path}: not a prepared manifest (bad or missing {exc!s}): re-run `trec prepare`"
                                ) from None


def _ranges(domains: dict[str, dict]) -> dict[str, DomainRange]:
    return {name: DomainRange(name, str(info["role"]), int(info["item_start"]), int(info["item_stop"]))
            for name, info in domains.items()}

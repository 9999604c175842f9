"""Shared fixtures: a tiny prepared run folder written to the contract in trecsys/data/prepared.py.

tests/ is on sys.path so test helpers import as plain modules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from trecsys.artifacts import write_manifest, write_parquet

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(os.environ.get("TRECSYS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write_tiny_prepared(run_dir: Path, seed: int = 0, n_users: int = 60, n_source_items: int = 30,
                        n_target_items: int = 60, text_dim: int = 8, with_test: bool = True) -> Path:
    """Two domains, `src` (source) then `tgt` (target), leave-one-out split, Zipf-like popularity.

    Target users have 1 to 21 train interactions, some users are only in the target, and a few
    target items never occur in training (cold start from text only). `with_test=False` leaves the
    test split empty.
    """
    rng = np.random.default_rng(seed)
    folder = Path(run_dir) / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    ranges = {"src": (0, n_source_items), "tgt": (n_source_items, n_source_items + n_target_items)}
    n_items = n_source_items + n_target_items

    rows = []  # (user_idx, item_idx, domain, timestamp, split)
    for u in range(n_users):
        t = 0
        for domain, (start, stop) in ranges.items():
            in_domain = (domain == "tgt" and u % 3 != 0) or (domain == "src" and u % 2 == 0)
            if not in_domain:
                continue
            length = int(rng.integers(3, 24)) if domain == "tgt" else int(rng.integers(2, 10))
            # Zipf-like: low local indices are popular; the last 3 target items are never drawn early.
            weights = 1.0 / np.arange(1, stop - start + 1) ** 0.8
            if domain == "tgt":
                weights[-3:] = 0.0
            items = start + rng.choice(stop - start, size=min(length, stop - start - 3), replace=False,
                                       p=weights / weights.sum())
            if domain == "tgt" and u % 7 == 1:
                items[-1] = stop - 1 - (u % 3)  # a held-out item never seen in training
            splits = ["train"] * len(items)
            if domain == "tgt":
                splits[-1], splits[-2] = ("test" if with_test else "train"), "valid"
            for item, split in zip(items, splits, strict=True):
                rows.append((u, int(item), domain, t, split))
                t += 1
    rows.sort(key=lambda r: (r[0], r[3]))
    user_idx = np.array([r[0] for r in rows], dtype=np.int64)
    interactions = pa.table({
        "user_idx": pa.array(user_idx),
        "user_id": pa.array([f"u{u}" for u in user_idx]),
        "item_idx": pa.array(np.array([r[1] for r in rows], dtype=np.int32)),
        "domain": pa.array([r[2] for r in rows]),
        "timestamp": pa.array(np.array([r[3] for r in rows], dtype=np.int64)),
        "rating": pa.array(np.full(len(rows), np.nan)),
        "split": pa.array([r[4] for r in rows]),
    })
    domains = [d for d, (start, stop) in ranges.items() for _ in range(start, stop)]
    items = pa.table({
        "item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
        "item_id": pa.array([f"i{i}" for i in range(n_items)]),
        "domain": pa.array(domains),
        "title": pa.array([f"{d} item {i}" for i, d in enumerate(domains)]),
        "text": pa.array([f"{d} item {i}" for i, d in enumerate(domains)]),
    })
    emb = rng.normal(size=(n_items, text_dim)).astype(np.float32)
    embeddings = pa.table({
        "item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), text_dim),
    })
    write_parquet(items, folder / "items.parquet")
    write_parquet(interactions, folder / "interactions.parquet")
    write_parquet(embeddings, folder / "item_embeddings.parquet", metadata={"encoder": "random-test"})
    extra = {
        "domains": {name: {"role": "target" if name == "tgt" else "source", "item_start": start,
                           "item_stop": stop} for name, (start, stop) in ranges.items()},
        "source": ["src"],
        "target": "tgt",
        "n_users": n_users,
        "encoder": {"name": "random-test", "dim": text_dim},
    }
    write_manifest(folder, "prepare", {"seed": seed}, [], extra)
    return Path(run_dir)


@pytest.fixture
def tiny_prepared(tmp_path: Path) -> Path:
    """A run folder whose prepared/ has a 30-item source and a 60-item target domain."""
    return write_tiny_prepared(tmp_path / "run")


@pytest.fixture
def make_prepared():
    """write_tiny_prepared(run_dir, seed=..., ...) for tests that need variants."""
    return write_tiny_prepared


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA

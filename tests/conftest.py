"""Shared fixtures. tests/ is on sys.path so test helpers import as plain modules.

`tiny_prepared` writes a small fake `<run_dir>/prepared/` that follows the contract in
trecsys/prepared/tables.py (random text embeddings, two source domains and a target), so the stages
after `prepare` can be tested without running it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Stages size their thread pools from runtime.threads / TRECSYS_THREADS (trecsys/runtime.py). The
# tests' tensors are tiny: one thread is fastest, and on shared cores more threads wait on each other.
os.environ.setdefault("TRECSYS_THREADS", "1")

from trecsys.artifacts import stage_output, write_manifest, write_parquet  # noqa: E402
from trecsys.config import EmbeddingConfig  # noqa: E402
from trecsys.prepared.sequences import write_sequences  # noqa: E402

TINY_DOMAINS = {"Books": ("source", 30), "Games": ("source", 24), "Food": ("target", 16)}
TINY_TEXT_DIM = 16


def write_tiny_prepared(run_dir: Path, n_users: int = 60, seed: int = 0,
                        encoder: str = EmbeddingConfig.encoder) -> Path:
    """Users walk a domain's catalogue in small steps from a personal start (learnable order);
    leave-one-out split per user and domain (last -> test, second last -> valid)."""
    rng = np.random.default_rng(seed)
    items, rows, domains, start = [], [], {}, 0
    for name, (role, n_items) in TINY_DOMAINS.items():
        domains[name] = {"role": role, "item_start": start, "item_stop": start + n_items, "n_items": n_items}
        items += [(start + i, f"{name[0]}{i:03d}", name, f"{name} item {i}") for i in range(n_items)]
        start += n_items
    time = 0
    for user in range(n_users):
        for name, info in domains.items():
            if rng.random() < 0.2:
                continue
            n_items = info["item_stop"] - info["item_start"]
            length = int(rng.integers(3, 12))
            walk = (int(rng.integers(n_items)) + np.cumsum(rng.integers(1, 3, size=length))) % n_items
            _, first = np.unique(walk, return_index=True)
            walk = walk[np.sort(first)]  # no repeats, order kept
            splits = ["train"] * len(walk)
            if len(walk) >= 3:
                splits[-1], splits[-2] = "test", "valid"
            for item, split in zip(walk, splits, strict=True):
                time += 1
                rows.append((user, f"u{user}", info["item_start"] + int(item), name, time, split))
    # Contract: rows sorted by (user_idx, timestamp), domains interleaved.
    rows.sort(key=lambda r: (r[0], r[4]))
    n_items = start
    embeddings = rng.normal(size=(n_items, TINY_TEXT_DIM)).astype(np.float32)
    folder = Path(run_dir) / "prepared"
    with stage_output(folder) as tmp:
        idx, ids, doms, titles = zip(*items, strict=True)
        write_parquet(pa.table({
            "item_idx": pa.array(idx, pa.int32()), "item_id": ids, "domain": doms, "title": titles, "text": titles,
        }), tmp / "items.parquet")
        users, user_ids, item_idx, row_domains, stamps, split = zip(*rows, strict=True)
        interactions = pa.table({
            "user_idx": pa.array(users, pa.int64()), "user_id": user_ids,
            "item_idx": pa.array(item_idx, pa.int32()), "domain": row_domains,
            "timestamp": pa.array(stamps, pa.int64()), "rating": pa.array([None] * len(rows), pa.float32()),
            "split": split,
        })
        write_parquet(interactions, tmp / "interactions.parquet")
        source = [n for n, (r, _) in TINY_DOMAINS.items() if r == "source"]
        write_sequences(tmp, interactions, {n: (d["item_start"], d["item_stop"]) for n, d in domains.items()},
                        source, "Food", n_items)
        flat = pa.array(embeddings.reshape(-1), pa.float32())
        write_parquet(pa.table({
            "item_idx": pa.array(np.arange(n_items), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, TINY_TEXT_DIM),
        }), tmp / "item_embeddings.parquet")
        encoder_info = {"name": encoder, "revision": "test", "pooling": "mean", "dim": TINY_TEXT_DIM}
        write_manifest(tmp, "prepare", {}, inputs=[], extra={
            "seed": seed, "domains": domains, "source": source,
            "target": "Food", "encoder": encoder_info, "n_users": n_users, "n_items": n_items,
        })
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): its
    tiny tensors run fastest so, and on a shared two-core machine two threads wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_prepared(tmp_path) -> Path:
    """A run directory holding a tiny fake `prepared/`; returns the run directory."""
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    return run_dir


def tiny_config(run_dir: Path, path: Path, sections: dict | None = None, **train) -> Path:
    """An experiment YAML for `tiny_prepared`: a small model and a few quick epochs. `train`
    overrides pretrain.train keys; `sections` adds or replaces top-level sections (distill, ...)."""
    data = {
        "run_dir": str(run_dir),
        "device": "cpu",
        "data": {"domains": {n: {"format": "synthetic"} for n in TINY_DOMAINS},
                 "source": ["Books", "Games"], "target": "Food"},
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 6, "dropout": 0.1,
                  "n_experts": 2},
        "pretrain": {"train": {"epochs": 4, "batch_size": 16, "lr": 0.01, "patience": 0, **train}},
        **(sections or {}),
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def fake_embed_texts(texts, cfg, device="cpu", progress=True, cache=True, stop=None, counts=None):
    """A deterministic stand-in for the encoder: a hash-seeded unit vector per text."""
    if counts is not None:  # nothing is cached: every distinct text counts as embedded
        counts.update(distinct=len(set(texts)), from_cache=0, embedded=len(set(texts)))
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        row = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
        rows.append(row / np.linalg.norm(row))
    info = {"name": "fake", "path": "", "revision": "0", "pooling": "mean", "dim": 8, "max_length": 16}
    return np.stack(rows), info


def pretrained_tiny_run(root: Path, write_config) -> Path:
    """`<root>/run` with a tiny prepared/ and a pretrain/ trained through the CLI, with the config
    that `write_config(run_dir, path)` writes; module fixtures build it once for their tests."""
    from typer.testing import CliRunner

    from trecsys.cli import app

    run_dir = root / "run"
    write_tiny_prepared(run_dir)
    result = CliRunner().invoke(app, ["pretrain-source", "-c", str(write_config(run_dir, root / "cfg.yaml"))])
    assert result.exit_code == 0, result.output
    return run_dir

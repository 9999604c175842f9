"""`torchrun ... trec recommend`: users split across ranks, parts of one Parquet dataset published at once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import tiny_config, write_tiny_prepared
from launch import trec

from trecsys.config import ModelConfig
from trecsys.model.checkpoint import save_checkpoint
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import load_prepared
from trecsys.stages.recommend_shards import shard_rows


@pytest.mark.parametrize("n_rows, world, block", [(60, 2, 8), (7, 3, 2), (3, 4, 8), (0, 2, 4), (100, 3, 1)])
def test_shard_rows_cover_every_row_once_in_whole_blocks(n_rows, world, block):
    bounds = [shard_rows(n_rows, r, world, block) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))  # contiguous, in order
    assert all(lo % block == 0 for lo, hi in bounds if hi > lo)


def launch(n_proc: int, config: Path, output: Path) -> subprocess.CompletedProcess:
    return trec(n_proc, ["recommend", "-c", str(config), "--output", str(output)], timeout=300)


@pytest.mark.slow
def test_two_process_gloo_recommend_equals_one_process(tmp_path):
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir, n_users=90)
    prepared = load_prepared(run_dir)
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.0, n_experts=2),
                        prepared.embeddings.shape[1], prepared.n_items)
    save_checkpoint(model, run_dir / "finetune")
    config = tiny_config(run_dir, tmp_path / "cfg.yaml")
    data = yaml.safe_load(config.read_text())
    data["recommend"] = {"k": 5, "user_batch": 8}  # several blocks per rank
    config.write_text(yaml.safe_dump(data))

    single = launch(1, config, tmp_path / "single.parquet")
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = launch(2, config, tmp_path / "sharded.parquet")
    assert sharded.returncode == 0, sharded.stderr[-2000:]

    folder = tmp_path / "sharded.parquet"
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    one = pq.read_table(tmp_path / "single.parquet").replace_schema_metadata(None)
    parts = pq.read_table(folder).replace_schema_metadata(None)
    assert one.num_rows > 0 and parts.equals(one)
    # Each rank wrote a non-empty share; the manifest beside the dataset names both parts.
    sizes = [pq.read_metadata(p).num_rows for p in sorted(folder.iterdir())]
    assert min(sizes) > 0 and sum(sizes) == one.num_rows
    manifest = json.loads((tmp_path / "_sharded.manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == [f"sharded.parquet/part-0000{r}-of-00002.parquet" for r in (0, 1)]
    assert not list(tmp_path.glob(".sharded.parquet.tmp-*"))  # the staging folder was swapped in
    assert np.isfinite(parts.column("score").to_numpy()).all()

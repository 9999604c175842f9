"""`torchrun ... trec prepare`: the item texts embedded on every rank, the prepared files those of one process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from launch import trec

from trecsys.ingest import embed
from trecsys.prepared import sequences


@pytest.mark.parametrize("n, world", [(0, 2), (5, 2), (2048, 2), (2049, 2), (7000, 3), (7000, 1), (100, 4)])
def test_shares_are_whole_chunks_that_cover_every_miss_once(n, world):
    misses = [f"t{i}" for i in range(n)]
    shares = [embed.share_of_misses(misses, r, world) for r in range(world)]
    assert sorted(t for s in shares for t in s) == sorted(misses)
    chunks = [misses[i:i + embed.CHUNK_TEXTS] for i in range(0, n, embed.CHUNK_TEXTS)]
    for rank, share in enumerate(shares):  # a share re-cut into chunks gives the one-process chunks
        assert [share[i:i + embed.CHUNK_TEXTS] for i in range(0, len(share), embed.CHUNK_TEXTS)] == chunks[rank::world]


def tiny_encoder(folder: Path) -> Path:
    """A random 1-layer BERT with the default encoder's tokenizer: a real encoder that runs in a blink."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    source, _ = embed._resolve_encoder(embed.DEFAULT_ENCODER)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(folder)
    return folder


def launch(n_proc: int, config: Path) -> subprocess.CompletedProcess:
    return trec(n_proc, ["prepare", "-c", str(config)], timeout=600)


@pytest.mark.slow
def test_two_process_gloo_prepare_writes_the_bytes_of_one_process(tmp_path):
    encoder = tiny_encoder(tmp_path / "encoder")
    configs = {}
    for n in (1, 2):
        configs[n] = tmp_path / f"cfg{n}.yaml"
        configs[n].write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / f"run{n}"), "device": "cpu", "runtime": {"threads": 1},
            "data": {"domains": {"Kitchen": {"format": "synthetic"}, "Food": {"format": "synthetic"}},
                     "source": ["Kitchen"], "target": "Food",
                     # more distinct titles than one chunk of embed.CHUNK_TEXTS: both ranks get a chunk
                     "synthetic": {"n_users": 600, "n_items_per_domain": 1400}},
            # Each run starts from an empty cache of its own: both embed every text.
            "embedding": {"encoder": str(encoder), "cache_dir": str(tmp_path / f"cache{n}")},
        }))
    single = launch(1, configs[1])
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = launch(2, configs[2])
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    one, two = tmp_path / "run1" / "prepared", tmp_path / "run2" / "prepared"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    data_files = [f for f in files if f.name not in ("manifest.json", "config.yaml")]
    assert len(data_files) == 3 + len(sequences.FILES)  # items, interactions, embeddings, the sequence arrays
    for name in data_files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    # config.yaml differs in run_dir and cache_dir alone
    mask = lambda text, n: text.replace(f"run{n}", "RUN").replace(f"cache{n}", "CACHE")  # noqa: E731
    assert mask((one / "config.yaml").read_text(), 1) == mask((two / "config.yaml").read_text(), 2)

    record = {n: json.loads((tmp_path / f"run{n}" / "prepared" / "manifest.json").read_text())["embedding"]
              for n in (1, 2)}
    assert record[1]["processes"] == 1 and record[2]["processes"] == 2
    assert record[1]["embedded"] == record[2]["embedded"] == record[1]["distinct"] > embed.CHUNK_TEXTS
    assert min(record[2]["embedded_per_rank"]) > 0 and record[2]["items_per_s"] > 0
    # each rank merged its chunks into one shard of the cache; the ranks wrote nothing else
    assert len(list((tmp_path / "cache2").rglob("shard-*.parquet"))) == 2
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["prepared"]
    assert "items/s on 2 process(es)" in sharded.stderr

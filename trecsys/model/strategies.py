"""What each `finetune.strategy` starts from and trains: the model it builds, the parameters it
freezes, which parameters are new (their own learning rate), and the optional L2-SP pull toward
the transferred weights (Li et al. 2018, "Explicit inductive bias for transfer learning").
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from trecsys.config import ModelConfig
from trecsys.model.seqrec import SeqRecModel
from trecsys.runtime import seed_everything

# Strategies that start from the init_from weights (the others only borrow its architecture).
TRANSFERRING = ("full", "adaptor", "zero_shot")


@dataclass
class Candidate:
    """One strategy's model, ready for the engine: frozen parameters have requires_grad False."""

    strategy: str
    model: SeqRecModel
    new_params: list[str]  # parameters that did not come from init_from
    # Transferred weights as they were loaded, for L2-SP (trainable ones only).
    anchors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.strategy != "zero_shot"

    def n_trainable(self) -> int:
        return self.model.num_parameters(trainable_only=True)

    def lr_scales(self, new_params_lr_scale: float) -> dict[str, float]:
        return {name: new_params_lr_scale for name in self.new_params} if new_params_lr_scale != 1.0 else {}


def candidate_config(strategy: str, base: ModelConfig, item_ids: bool) -> ModelConfig:
    """The architecture a strategy trains: the base one, with target item IDs when asked (never for
    zero_shot: nothing would train them), and IDs only for id_only."""
    if strategy == "id_only":
        return dataclasses.replace(base, item_text=False, item_ids=True)
    if strategy == "zero_shot":
        return base
    return dataclasses.replace(base, item_ids=base.item_ids or item_ids)


def build_candidate(strategy: str, init: SeqRecModel | None, base: ModelConfig, item_text: torch.Tensor,
                    n_items: int, item_ids: bool, seed: int) -> Candidate:
    """The model `strategy` starts from. `init` (the init_from model) is required by the
    transferring strategies; `base` is the architecture (init's when there is one)."""
    if strategy in TRANSFERRING and init is None:
        raise ValueError(f"strategy {strategy!r} needs an init_from model")
    if strategy == "zero_shot":
        model = copy.deepcopy(init)
        model.requires_grad_(False)
        return Candidate(strategy, model, new_params=[])
    seed_everything(seed)  # the same random init for a strategy whatever ran before it
    model = SeqRecModel(candidate_config(strategy, base, item_ids), item_text.shape[1], n_items)
    model.set_item_text(item_text)
    if strategy not in TRANSFERRING:
        return Candidate(strategy, model, new_params=[name for name, _ in model.named_parameters()])
    loaded = init.state_dict()
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    if unexpected:  # only ever an ID table the init has and we add anyway; a mismatch is a bug
        raise RuntimeError(f"init_from tensors not in the {strategy} model: {unexpected}")
    if strategy == "adaptor":
        freeze_sequence_tower(model)
    anchors = {name: loaded[name].detach().clone() for name, p in model.named_parameters()
               if p.requires_grad and name not in missing}
    return Candidate(strategy, model, new_params=list(missing), anchors=anchors)


def freeze_sequence_tower(model: SeqRecModel) -> None:
    """Train only the item tower's adaptor, ID table and item norm, and every LayerNorm: the
    Transformer's attention and MLP weights and the positions stay as transferred."""
    for name, module in model.named_modules():
        trainable = name.startswith(("adaptor", "item_id")) or isinstance(module, nn.LayerNorm)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)


def l2sp_penalty(model: nn.Module, anchors: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """weight · Σ ||w − w_transferred||² over the anchored (transferred, trainable) weights."""
    params = dict(model.named_parameters())
    total = next(iter(params.values())).new_zeros(())
    for name, anchor in anchors.items():
        p = params[name]
        if anchor.device != p.device:
            anchors[name] = anchor = anchor.to(p.device)
        total = total + (p - anchor).pow(2).sum()
    return weight * total

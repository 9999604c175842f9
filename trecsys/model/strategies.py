"""`finetune.strategy`, one row each: what a strategy transfers from `finetune.init_from`, whether it
trains, what it freezes, and which architecture it builds. Fine-tuning, `auto`, evaluate's labels and
the study script read this table; adding a strategy is one row here (and its name in
config/schema.py's StrategyName, the YAML vocabulary). Also the optional L2-SP pull toward the
transferred weights (Li et al. 2018, "Explicit inductive bias for transfer learning").
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from trecsys.config import STRATEGY_NAMES, ModelConfig
from trecsys.errors import ConfigError
from trecsys.model.seqrec import MoEAdaptor, SeqRecModel
from trecsys.runtime import seed_everything


def freeze_sequence_tower(model: SeqRecModel) -> None:
    """Train only the item tower's adaptor, ID table and item norm, every LayerNorm and the seen
    offset: the Transformer's attention and MLP weights and the positions stay as transferred."""
    for name, module in model.named_modules():
        trainable = name.startswith(("adaptor", "item_id")) or isinstance(module, nn.LayerNorm)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
    if model.seen_bias is not None:  # whether the target's users come back to an item: learned there
        model.seen_bias.requires_grad_(True)


@dataclass(frozen=True)
class Strategy:
    name: str
    # Starts from init_from's weights; otherwise only its architecture is borrowed (random init).
    transfers: bool
    # False: the transferred model is only validated, never trained.
    trains: bool = True
    # `finetune.item_ids` adds a learned target item-ID table to the text item tower.
    takes_item_ids: bool = True
    # The item tower reads the items' text (False: an item-ID table alone, SASRec-style).
    item_text: bool = True
    # Marks the parameters kept as transferred (requires_grad False); None trains them all.
    freeze: Callable[[SeqRecModel], None] | None = None

    def architecture(self, base: ModelConfig, item_ids: bool) -> ModelConfig:
        """The model config this strategy builds from `base` (init_from's architecture when there is one)."""
        if not self.item_text:
            return dataclasses.replace(base, item_text=False, item_ids=True)
        if not self.takes_item_ids:
            return base
        return dataclasses.replace(base, item_ids=base.item_ids or item_ids)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("full", transfers=True),
    Strategy("adaptor", transfers=True, freeze=freeze_sequence_tower),
    Strategy("zero_shot", transfers=True, trains=False, takes_item_ids=False),  # nothing would train IDs
    Strategy("scratch", transfers=False),
    Strategy("id_only", transfers=False, takes_item_ids=False, item_text=False),
)}
if tuple(STRATEGIES) != STRATEGY_NAMES:  # the config's vocabulary and this table must agree, in order
    raise RuntimeError(f"trecsys.model.strategies names {tuple(STRATEGIES)}, config/schema.py {STRATEGY_NAMES}")


def transfers_any(names: list[str]) -> bool:
    """Whether any of these strategies needs the init_from weights (else its architecture will do)."""
    return any(STRATEGIES[name].transfers for name in names)


@dataclass
class Candidate:
    """One strategy's model, ready for the engine: frozen parameters have requires_grad False."""

    strategy: Strategy
    model: SeqRecModel
    new_params: list[str]  # parameters that did not come from init_from
    # Transferred weights as they were loaded, for L2-SP (trainable ones only).
    anchors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.strategy.name

    def n_trainable(self) -> int:
        return self.model.num_parameters(trainable_only=True)

    def lr_scales(self, new_params_lr_scale: float) -> dict[str, float]:
        return {name: new_params_lr_scale for name in self.new_params} if new_params_lr_scale != 1.0 else {}


def build_candidate(name: str, init: SeqRecModel | None, base: ModelConfig, item_text: torch.Tensor,
                    n_items: int, item_ids: bool, seed: int, id_items: Sequence[int] | None = None,
                    adaptor_init: str = "keep", target_text: torch.Tensor | None = None) -> Candidate:
    """The model strategy `name` starts from. `init` (the init_from model) is required by the
    transferring strategies; `base` is the architecture (init's when there is one). An ID table has
    rows for `id_items` only (the items the candidate trains on); rows of items init_from has an ID
    for are copied from it, the others are new. `adaptor_init` (`finetune.adaptor_init`) is what a
    transferring strategy that trains does with init's text adaptor: keep it, `whiten` it on
    `target_text` (the target catalogue's text vectors: `rewhiten`), or `reinit` it as scratch's."""
    spec = STRATEGIES[name]
    if spec.transfers and init is None:
        raise ValueError(f"strategy {name!r} needs an init_from model")
    if not spec.trains:  # the transferred model as it is
        model = copy.deepcopy(init)
        model.requires_grad_(False)
        return Candidate(spec, model, new_params=[])
    seed_everything(seed)  # the same random init for a strategy whatever ran before it
    model = SeqRecModel(spec.architecture(base, item_ids), item_text.shape[1], n_items, id_items)
    model.set_item_text(item_text)
    if not spec.transfers:
        return Candidate(spec, model, new_params=[param for param, _ in model.named_parameters()])
    loaded = {k: v for k, v in init.state_dict().items() if k not in ("item_id.weight", "id_row")}
    if adaptor_init == "reinit":  # left as the seeded random init above: the same start as scratch's
        loaded = {k: v for k, v in loaded.items() if not k.startswith("adaptor.")}
    elif adaptor_init == "whiten":
        if target_text is None:
            raise ValueError("adaptor_init 'whiten' needs the target catalogue's text vectors")
        loaded["adaptor.bias"] = rewhiten(model, target_text)
    elif adaptor_init != "keep":
        raise ValueError(f"unknown adaptor_init {adaptor_init!r}")
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    if unexpected:  # the architectures match but for the ID table; a mismatch is a bug
        raise RuntimeError(f"init_from tensors not in the {name} model: {unexpected}")
    missing = [param for param in missing if param != "id_row"]  # a buffer, set from id_items
    if copy_id_rows(init, model) and "item_id.weight" in missing:
        missing.remove("item_id.weight")  # transferred (the rows init_from had)
        loaded["item_id.weight"] = model.item_id.weight.detach().clone()
    if spec.freeze is not None:
        spec.freeze(model)
    anchors = {param: loaded[param].detach().clone() for param, p in model.named_parameters()
               if p.requires_grad and param not in missing}
    return Candidate(spec, model, new_params=list(missing), anchors=anchors)


def rewhiten(model: SeqRecModel, target_text: torch.Tensor) -> torch.Tensor:
    """The moe adaptor's whitening biases re-fitted to a catalogue: every expert's b_k in
    (x - b_k) W_k set to the mean of `target_text` (n, text_dim), so the experts' projections, learnt
    on the source, see the target's text vectors centred as they saw the source's: trained from
    b = 0, the b_k move toward the source catalogue's mean text vector (README, "Transfer levers"),
    and catalogues' means differ."""
    if not isinstance(model.adaptor, MoEAdaptor):
        raise ConfigError("config key 'finetune.adaptor_init': whiten re-fits the moe adaptor's whitening; "
                          f"init_from's adaptor is {model.config.adaptor!r}: use keep or reinit")
    mean = target_text.to(model.adaptor.bias).mean(dim=0)
    return mean.expand_as(model.adaptor.bias).clone()


def copy_id_rows(init: SeqRecModel, model: SeqRecModel) -> bool:
    """Copy the ID rows of the items both models have one for; True when every row of `model`'s
    table came from `init` (the table is then transferred, not new)."""
    if init.item_id is None or model.item_id is None:
        return False
    both = (init.id_row > 0) & (model.id_row > 0)
    with torch.no_grad():
        model.item_id.weight[model.id_row[both]] = init.item_id.weight[init.id_row[both]].to(model.item_id.weight)
    return int(both.sum()) == int((model.id_row > 0).sum())


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

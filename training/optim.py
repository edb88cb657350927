"""Optimizer parameter groups with their own learning rates, as VG-LLM and JanusVLN make them.

Their trainer (`src/qwen_vl/train/trainer.py`, `create_optimizer`) gives, when `--mm_projector_lr`
is set, every trainable parameter whose name contains "merger" (the geometry merger `merger.*` AND
Qwen's `visual.merger.*`) that rate, and with `--vision_tower_lr` as well every other `visual.*`
parameter that one; the rest keeps `--learning_rate`. Within each, weight decay goes to the
parameters outside `nn.LayerNorm` modules whose names lack "bias" (transformers 4.50's rule, which
decays RMSNorm weights), 0 to the others. Their published scripts pass `--mm_projector_lr 1e-5
--vision_tower_lr 1e-6`; `--recipe` sets both. Without `--mm_projector_lr`, transformers' own
grouping applies (one rate).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

__all__ = ["parameter_groups"]


def parameter_groups(model: nn.Module, *, weight_decay: float, projector_lr: Optional[float],
                     vision_lr: Optional[float] = None) -> Optional[List[Dict]]:
    """The optimizer's parameter groups of the references' rule (module docstring), or None when
    `projector_lr` is unset or 0 (their code then falls back to one rate too).

    Returns:
        Up to six groups (rest / vision / projector, each with and without decay), empty ones
        left out; a group without "lr" takes the optimizer's (--learning_rate).

    Example:
        >>> import torch
        >>> m = torch.nn.ModuleDict({"merger": torch.nn.Linear(2, 2), "lm": torch.nn.Linear(2, 2)})
        >>> [(len(g["params"]), g.get("lr")) for g in parameter_groups(m, weight_decay=0.1, projector_lr=1e-5)]
        [(1, None), (1, None), (1, 1e-05), (1, 1e-05)]
    """
    if not projector_lr:
        return None
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, [nn.LayerNorm]) if "bias" not in n}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def role(name: str) -> str:
        if "merger" in name:
            return "projector"
        if vision_lr and "visual" in name:
            return "vision"
        return "rest"

    rates = {"rest": None, "vision": vision_lr, "projector": projector_lr}
    groups = []
    for which in ("rest", "vision", "projector"):
        for decayed in (True, False):
            params = [p for n, p in trainable if role(n) == which and (n in decay) == decayed]
            if not params:
                continue
            group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
            if rates[which] is not None:
                group["lr"] = rates[which]
            groups.append(group)
    return groups

"""`python -m training.train` plus a look inside, for the distributed tests: runs the real entry
(`training.train.run`), then writes <output_dir>/probe.rank<R>.json saying where the online VGGT's
parameters ended up under DeepSpeed (partitioned? in the optimizer? in the module tree?)."""

from __future__ import annotations

import json
import os
import sys


def _optimizer_param_ids(optimizer) -> set[int]:
    # accelerate wraps DeepSpeed's ZeRO optimizer; that one keeps the model's own parameters in
    # fp16_groups (stage 3) or bit16_groups (stage 1/2), its param_groups hold flat fp32 partitions.
    while not hasattr(optimizer, "fp16_groups") and not hasattr(optimizer, "bit16_groups") \
            and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bit16_groups", None) or \
        [g["params"] for g in optimizer.param_groups]
    return {id(p) for group in groups for p in group}


def main(argv: list[str]) -> int:
    from training.train import close_distributed, run

    trainer = run(argv)
    model = trainer.model
    in_optimizer = _optimizer_param_ids(trainer.optimizer)
    model_params = dict(model.named_parameters())
    online = model.online_vggt
    vggt = list(online.encoder("cpu").model.parameters()) if online is not None and online.built else []
    tree_ids = {id(p) for p in model_params.values()}
    report = {
        "vggt_built": bool(vggt),
        "vggt_params": len(vggt),
        "vggt_partitioned": sum(hasattr(p, "ds_id") for p in vggt),
        "vggt_in_optimizer": sum(id(p) in in_optimizer for p in vggt),
        "vggt_in_module_tree": sum(id(p) in tree_ids for p in vggt),
        "vggt_names_in_model": [n for n in model_params if "vggt" in n.lower() or "aggregator" in n],
        "model_partitioned": sum(hasattr(p, "ds_id") for p in model_params.values()),
        "merger_in_optimizer": sum(id(p) in in_optimizer for p in model.merger.parameters()),
        "merger_params": len(list(model.merger.parameters())),
        "vision_blocks": len(model.model.visual.blocks),
    }
    rank = trainer.args.process_index
    with open(os.path.join(trainer.args.output_dir, f"probe.rank{rank}.json"), "w") as f:
        json.dump(report, f)
    close_distributed()  # as training.train.main does
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

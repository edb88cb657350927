"""`python -m training.train` with a look inside, for train_zero_bench.py.

Runs the real entry module as `__main__` (runpy: the same code, arguments from the command
line) after adding one callback to every `FeatstoreTrainer`, which writes
<output_dir>/zero_probe.json at the end of training:

- peak GPU memory of the run (torch.cuda.max_memory_allocated / reserved),
- where the online VGGT's parameters are: whether DeepSpeed partitioned any (a ZeRO-3
  parameter carries `ds_id`; a partitioned one holds an empty local tensor), whether any is
  in the model's module tree, and how many model parameters ZeRO-3 did partition,
- what ZeRO-3 gathered: every call of its parameter coordinator's `fetch_sub_module` (the
  all-gather before a submodule's forward or backward) is counted, with the ids of the
  parameters it fetched; `vggt_gathered` counts those that are VGGT parameters.

    python benchmarks/_zero_probe.py <python -m training.train flags>
"""

from __future__ import annotations

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FETCHED = {"calls": 0, "param_ids": set(), "instrumented": False, "error": None}


def _instrument_zero3_fetch() -> None:
    """Count ZeRO-3's gathers (PartitionedParameterCoordinator.fetch_sub_module)."""
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except Exception as e:  # no deepspeed, or another layout: say so in the probe
        _FETCHED["error"] = f"{type(e).__name__}: {e}"
        return
    original = PartitionedParameterCoordinator.fetch_sub_module

    def fetch_sub_module(self, current_submodule, *args, **kwargs):
        _FETCHED["calls"] += 1
        for p in current_submodule.parameters(recurse=False):
            _FETCHED["param_ids"].add(id(p))
        return original(self, current_submodule, *args, **kwargs)

    PartitionedParameterCoordinator.fetch_sub_module = fetch_sub_module
    _FETCHED["instrumented"] = True


def _vggt_report(model) -> dict:
    from training.model import vggt_parameter_count

    online = getattr(model, "online_vggt", None)
    tree = {id(p) for p in model.parameters()}
    out = {"vggt_attached": online is not None, "vggt_built": bool(online is not None and online.built),
           "vggt_parameters_in_model_tree": vggt_parameter_count(model),
           "model_params": len(tree), "model_partitioned": sum(hasattr(p, "ds_id") for p in model.parameters())}
    if out["vggt_built"]:
        params = list(online.encoder(None).model.parameters())  # built already: no device needed
        ids = {id(p) for p in params}
        out.update(vggt_params=len(params), vggt_elements=sum(p.numel() for p in params),
                   vggt_partitioned=sum(hasattr(p, "ds_id") for p in params),
                   vggt_empty_local=sum(p.numel() == 0 for p in params),
                   vggt_in_module_tree=len(ids & tree), vggt_gathered=len(ids & _FETCHED["param_ids"]),
                   vggt_device=str(params[0].device), vggt_dtype=str(params[0].dtype))
    out.update(zero3_fetch_instrumented=_FETCHED["instrumented"], zero3_fetch_calls=_FETCHED["calls"],
               zero3_fetched_params=len(_FETCHED["param_ids"] & tree))
    if _FETCHED["error"]:
        out["zero3_fetch_error"] = _FETCHED["error"]
    return out


def _install() -> None:
    import torch
    from transformers import TrainerCallback

    from training import trainer as trainer_mod

    class ZeroProbe(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            report = _vggt_report(model)
            if torch.cuda.is_available():
                report.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                              peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
            report["steps"] = state.global_step
            if state.is_world_process_zero:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, "zero_probe.json"), "w") as f:
                    json.dump(report, f, indent=1)

    cls = trainer_mod.FeatstoreTrainer
    original_init = cls.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(ZeroProbe())

    cls.__init__ = __init__


if __name__ == "__main__":
    _instrument_zero3_fetch()
    _install()
    sys.argv[0] = "training.train"
    runpy.run_module("training.train", run_name="__main__", alter_sys=True)

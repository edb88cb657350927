"""A real tiny causal LM (transformers' Llama, ~30k parameters) with a dataset whose collator
emits training.trainer.STAT_KEYS, for FeatstoreTrainer's tests. Run as a script (under torchrun)
it trains once and leaves each rank's metrics file in --output_dir.

Sample i counts as a store hit unless i % 3 == 0; a miss is computed online when i % 6 == 0.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from training.train import close_distributed
from training.trainer import STAT_KEYS, FeatstoreTrainer

VOCAB, LENGTH = 64, 8


def expected_counts(indices) -> dict[str, int]:
    """Totals of cache_hits/misses/computed over the samples `indices`."""
    indices = list(indices)
    return {
        "cache_hits": sum(1 for i in indices if i % 3 != 0),
        "cache_misses": sum(1 for i in indices if i % 3 == 0),
        "cache_computed": sum(1 for i in indices if i % 6 == 0),
    }


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"index": i, "input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)}


class Collate:
    """Stacks samples and adds this batch's cache counters (0-d int64, as training.data does)."""

    def __init__(self, sleep_s: float = 0.0):
        self.sleep_s = sleep_s

    def __call__(self, samples: list[dict]) -> dict:
        if self.sleep_s:
            time.sleep(self.sleep_s)  # stands in for a slow read, so data_time has a floor
        ids = torch.stack([s["input_ids"] for s in samples])
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        counts = expected_counts(s["index"] for s in samples)
        batch.update({k: torch.tensor(counts[k], dtype=torch.int64) for k in STAT_KEYS})
        return batch


class RecordingLlama(transformers.LlamaForCausalLM):
    """Llama that refuses the counters and remembers which batch keys its forward received."""

    seen_keys: set = set()

    def forward(self, **kwargs):
        leaked = [k for k in STAT_KEYS if k in kwargs]
        if leaked:
            raise AssertionError(f"the model saw {leaked}")
        type(self).seen_keys |= {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        return super().forward(**kwargs)


def tiny_model(seed: int = 0) -> RecordingLlama:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LENGTH)
    return RecordingLlama._from_config(cfg)


def training_args(output_dir: str, **overrides) -> transformers.TrainingArguments:
    kw = dict(output_dir=output_dir, use_cpu=True, report_to="none", remove_unused_columns=False,
              label_names=["labels"], save_strategy="no", disable_tqdm=True, learning_rate=1e-3,
              logging_steps=2, max_steps=6, per_device_train_batch_size=2, seed=0)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def build(output_dir: str, *, n: int = 12, sleep_s: float = 0.0, **arg_overrides) -> FeatstoreTrainer:
    # Arguments first: with a ZeRO-3 config they make _from_config build the model partitioned.
    args = training_args(output_dir, **arg_overrides)
    return FeatstoreTrainer(model=tiny_model(), args=args, train_dataset=CountingDataset(n),
                            data_collator=Collate(sleep_s))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_samples", type=int, default=12)
    p.add_argument("--max_steps", type=int, default=3)
    p.add_argument("--deepspeed", default=None)
    a = p.parse_args()
    extra = {}
    if a.deepspeed:
        import deepspeed

        deepspeed.init_distributed("gloo")  # before the model, for ZeRO-3 on CPU (TRAINING.md)
        extra["deepspeed"] = a.deepspeed
    try:
        build(a.output_dir, n=a.num_samples, max_steps=a.max_steps, logging_steps=1, **extra).train()
    finally:
        # As training.train does: a process group left to the interpreter's exit can abort a
        # finished rank ("terminate called without an active exception").
        close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Qwen2.5-VL training with VGGT geometry features, from the featstore cache or online.

Modules, one role each:
    args         HfArgumentParser dataclasses and the resolution of the VGGT flags
    presets      the tiny random Qwen2.5-VL, its offline tokenizer and image processor
    data         conversation dataset (cache reads in DataLoader workers) and collator
    merger       the trainable geometry merger (VG-LLM / JanusVLN parameter layout)
    model        the Qwen2_5_VLForConditionalGeneration subclass that injects the merger output
    vggt_online  the encoder spec without a model, and the frozen online VGGT
    trainer      FeatstoreTrainer: logs data time and cache hit/miss totals carried in the batch
    train        `python -m training.train`
    configs/     DeepSpeed ZeRO-2 / ZeRO-3 configs
"""

__all__ = ["args", "presets", "data", "merger", "model", "vggt_online", "trainer", "train"]

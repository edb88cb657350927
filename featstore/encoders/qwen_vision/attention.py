"""One attention call per layer for transformers' Qwen2.5-VL vision tower ("one_call").

transformers' vision attention (`Qwen2_5_VLVisionAttention.forward`, 5.17 and 5.25) hands the
packed `cu_seqlens` (one segment per window, or per image in a full-attention layer) to the
attention function only when `is_flash_attention_requested(config)` holds, that is when the
implementation's NAME contains "flash"; every other implementation (`sdpa`, `eager`) gets the
tokens split into one call per segment: ~180 calls a layer for nine 504x392 images, which is
host-launch-bound on a GPU. So this module registers an attention function in transformers'
`AttentionInterface` under a name containing "flash" (`ONE_CALL_IMPLEMENTATION`) and sets it on
the vision config only; the function attends within every segment in ONE call:

- `torch.nn.attention.varlen.varlen_attn` (the flash varlen kernel: CUDA, fp16/bf16) where this
  torch has it and it applies;
- else ONE `scaled_dot_product_attention` over the segments gathered into a padded batch
  [segments, heads, longest, head_dim] with a key-padding mask. A dense block-diagonal mask over
  all tokens would compute every image against every other (9x the work of the full layers, ~140x
  of the windowed ones for nine images) only to mask it away; the padded batch computes what the
  per-segment calls compute, plus padding.

"auto" (`AUTO_IMPLEMENTATION`, the default of training and the encoders) takes the varlen call
where it applies and otherwise makes transformers' own per-segment SDPA calls, so CPU and float32
runs compute the stock numbers bit for bit and only a bf16/fp16 CUDA run changes path.

The language model keeps its own implementation, and a real flash-attention request
(`flash_attention_2`, ...) on the vision config is left as it is.

Example:
    >>> import torch
    >>> from featstore.encoders.qwen_vision.attention import one_call_attention
    >>> q = torch.randn(1, 2, 5, 8)                        # [1, heads, tokens, head_dim]
    >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)   # two segments: tokens 0-1 and 2-4
    >>> out, _ = one_call_attention(None, q, q, q, scaling=8 ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    >>> out.shape                                         # [1, tokens, heads, head_dim]
    torch.Size([1, 5, 2, 8])
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featstore.encoders.qwen_vision.config import VISION_ATTENTION_CHOICES
from featstore.errors import EncoderError

__all__ = ["VISION_ATTENTION_CHOICES", "ONE_CALL_IMPLEMENTATION", "AUTO_IMPLEMENTATION", "one_call_attention",
           "auto_attention", "register", "set_vision_attention", "varlen_kernel"]

# Must contain "flash": transformers passes cu_seqlens only to implementations so named
# (utils/generic.py `is_flash_attention_requested`: `"flash" in config._attn_implementation`).
ONE_CALL_IMPLEMENTATION = "featstore_one_call_flash_varlen"
AUTO_IMPLEMENTATION = "featstore_auto_flash_varlen"
_OURS = (ONE_CALL_IMPLEMENTATION, AUTO_IMPLEMENTATION)

_VARLEN = None  # (function, takes scale=) once looked up; False: not in this torch
# False: always the padded SDPA call (benchmarks/vision_attention_bench.py times both).
PREFER_VARLEN = True


def varlen_kernel():
    """torch's `varlen_attn` and whether it takes `scale=`, or None where this torch lacks it
    (it appeared in torch 2.9; the GPU image has 2.11, this machine 2.13)."""
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN = False
        else:
            _VARLEN = (varlen_attn, "scale" in inspect.signature(varlen_attn).parameters)
    return _VARLEN or None


def _varlen_applies(query: Tensor, scaling: Optional[float], dropout: float) -> bool:
    """The flash varlen kernel runs on CUDA in fp16/bf16 without dropout; a scale other than the
    default 1/sqrt(head_dim) needs a torch whose varlen_attn takes `scale=`."""
    kernel = varlen_kernel()
    if not PREFER_VARLEN or kernel is None or query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if dropout:
        return False
    default_scale = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-12
    return default_scale or kernel[1]


def _segment_of_tokens(cu: Tensor, total: int) -> Tensor:
    """Segment index of every token (cu: [n + 1] boundaries), without a host sync."""
    tokens = torch.arange(total, device=cu.device, dtype=cu.dtype)
    return torch.searchsorted(cu[1:].contiguous(), tokens, right=True)


def _padded_sdpa(query: Tensor, key: Tensor, value: Tensor, cu: Tensor, longest: int,
                 scaling: Optional[float], dropout: float) -> Tensor:
    """[1, H, S, D] q/k/v, segments cu -> [1, S, H, D]: one SDPA call over the padded segments."""
    total = query.shape[2]
    cu = cu.to(device=query.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(longest, device=query.device)
    # Slot (segment i, position j) holds token cu[i] + j; a padding slot any valid token (it is
    # never read back). A zero-length segment (none in Qwen's windows: unique_consecutive) keeps
    # one visible key, so that its padding rows' softmax has no all-masked row (NaN gradients).
    index = (cu[:-1, None] + pos[None, :]).clamp_(max=max(total - 1, 0))
    keys_visible = (pos[None, :] < lengths.clamp(min=1)[:, None])[:, None, None, :]  # [n, 1, 1, L]

    def pad(x: Tensor) -> Tensor:  # [1, H, S, D] -> [n, H, L, D]
        return x[0][:, index].transpose(0, 1)

    out = F.scaled_dot_product_attention(pad(query), pad(key), pad(value), attn_mask=keys_visible,
                                         dropout_p=dropout, scale=scaling)  # [n, H, L, D]
    segment = _segment_of_tokens(cu, total)
    slot = segment * longest + (torch.arange(total, device=query.device) - cu[segment])
    flat = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])  # [n * L, H, D]
    return flat[slot].unsqueeze(0)


def one_call_attention(module: Optional[nn.Module], query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Optional[Tensor] = None, scaling: Optional[float] = None,
                       dropout: float = 0.0, cu_seq_lens_q: Optional[Tensor] = None,
                       cu_seq_lens_k: Optional[Tensor] = None, max_length_q: Optional[int] = None,
                       max_length_k: Optional[int] = None, is_causal: bool = False,
                       **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention-function signature for the vision tower: q/k/v [1, H, S, D], the
    segments `cu_seq_lens_q` (== `cu_seq_lens_k`), bidirectional within a segment; returns
    ([1, S, H, D], None) as transformers' sdpa and flash functions do.

    Without cu_seq_lens the whole sequence is one segment (what a per-segment caller passes).

    Raises:
        EncoderError: causal attention, an attention mask, or different query and key segments
            were asked for (the vision tower asks for none of them).
    """
    if is_causal or attention_mask is not None:
        raise EncoderError(f"{ONE_CALL_IMPLEMENTATION} serves the Qwen2.5-VL vision tower only (bidirectional "
                           "attention within cu_seqlens, no mask); use 'sdpa' for other models")
    total = query.shape[2]
    if cu_seq_lens_q is None:
        cu = torch.tensor([0, total], dtype=torch.int32, device=query.device)
    else:
        cu = cu_seq_lens_q
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu and not torch.equal(cu_seq_lens_k, cu):
            raise EncoderError(f"{ONE_CALL_IMPLEMENTATION}: query and key segments differ; the vision tower's "
                               "self-attention has one cu_seqlens")
    longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
    if module is not None and not module.training:
        dropout = 0.0
    if _varlen_applies(query, scaling, dropout):
        fn, takes_scale = varlen_kernel()
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, H, D]
        cu32 = cu.to(device=query.device, dtype=torch.int32)
        extra = {"scale": scaling} if takes_scale and scaling is not None else {}
        out = fn(q, k, v, cu32, cu32, longest, longest, **extra)
        return out.unsqueeze(0), None
    return _padded_sdpa(query, key, value, cu, longest, scaling, dropout), None


def auto_attention(module: Optional[nn.Module], query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Optional[Tensor] = None, scaling: Optional[float] = None,
                   dropout: float = 0.0, cu_seq_lens_q: Optional[Tensor] = None,
                   cu_seq_lens_k: Optional[Tensor] = None, max_length_q: Optional[int] = None,
                   max_length_k: Optional[int] = None, is_causal: bool = False,
                   **kwargs) -> Tuple[Tensor, None]:
    """"auto": `one_call_attention` where torch's varlen kernel applies (CUDA, fp16/bf16), else
    exactly what transformers' sdpa path does without a flash implementation: one SDPA call per
    segment, the outputs concatenated (Qwen2_5_VLVisionAttention.forward's non-flash branch), so
    a CPU or float32 run computes the stock numbers bit for bit."""
    if is_causal or attention_mask is not None:
        raise EncoderError(f"{AUTO_IMPLEMENTATION} serves the Qwen2.5-VL vision tower only (bidirectional "
                           "attention within cu_seqlens, no mask); use 'sdpa' for other models")
    in_use_dropout = 0.0 if module is not None and not module.training else dropout
    if _varlen_applies(query, scaling, in_use_dropout):
        return one_call_attention(module, query, key, value, attention_mask=None, scaling=scaling, dropout=dropout,
                                  cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
                                  max_length_q=max_length_q, max_length_k=max_length_k, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        segments = [(query, key, value)]
    else:
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
        segments = zip(*(torch.split(x, lengths, dim=2) for x in (query, key, value)))
    outs = [sdpa_attention_forward(module, q, k, v, attention_mask=None, scaling=scaling, dropout=dropout,
                                   is_causal=False, **kwargs)[0] for q, k, v in segments]
    return torch.cat(outs, dim=1), None


def register() -> str:
    """Register `one_call_attention` and `auto_attention` in transformers' AttentionInterface
    (idempotent); returns the one-call name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ONE_CALL_IMPLEMENTATION, one_call_attention)
    AttentionInterface.register(AUTO_IMPLEMENTATION, auto_attention)
    return ONE_CALL_IMPLEMENTATION


def set_vision_attention(visual: nn.Module, choice: str) -> str:
    """Choose how `visual` (transformers' Qwen2.5-VL vision tower, e.g. `model.model.visual`)
    attends: "stock" leaves it; "one_call" sets `ONE_CALL_IMPLEMENTATION` on its config and its
    attention modules' configs, unless a real flash-attention implementation is set (that path
    already makes one varlen call per layer); "auto" sets `AUTO_IMPLEMENTATION` where the tower
    uses transformers' sdpa path (its default) and leaves any other implementation (eager, flash,
    flex) as the user chose it. The language model is not touched.

    Returns:
        the vision tower's attention implementation afterwards.

    Raises:
        EncoderError: `choice` is not one of VISION_ATTENTION_CHOICES, or `visual` has no config.

    Example:
        >>> from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG
        >>> from featstore.encoders.qwen_vision.encoder import build_vision_tower
        >>> set_vision_attention(build_vision_tower(TINY_VISION_CONFIG), "one_call")
        'featstore_one_call_flash_varlen'
    """
    if choice not in VISION_ATTENTION_CHOICES:
        raise EncoderError(f"vision attention {choice!r} is not one of {', '.join(VISION_ATTENTION_CHOICES)}")
    config = getattr(visual, "config", None)
    if config is None:
        raise EncoderError(f"set_vision_attention takes transformers' Qwen2.5-VL vision tower (a module with a "
                           f"config); got {type(visual).__name__}")
    current = config._attn_implementation
    if choice == "stock":
        if current not in _OURS:
            return current
        target = "sdpa"  # back from one of ours to transformers' default
    elif current and "flash" in current and current not in _OURS:
        return current
    elif choice == "auto" and current not in (None, "sdpa", *_OURS):
        return current
    else:
        target = AUTO_IMPLEMENTATION if choice == "auto" else ONE_CALL_IMPLEMENTATION
    register()
    configs = {id(config): config}
    for m in visual.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and type(m).__name__.endswith("VisionAttention"):
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        # The attribute, not model.set_attn_implementation: that would look for a flash-attn
        # package for a name containing "flash".
        cfg._attn_implementation = target
    return target

"""`VGGTAggregator`: featstore's own VGGT aggregator, weight-compatible with facebook/VGGT-1B.

Written from the published VGGT architecture and a reading of the official code
(facebookresearch/vggt @ 44b3afb, `vggt/models/aggregator.py`); no code is copied. Parameter
names match the official `Aggregator` so that its state_dict (the checkpoint's `aggregator.*`
keys with the prefix stripped) loads with `strict=True`.

What differs from the official code, on purpose:
- RoPE cos/sin tables are built once per (grid, head_dim, device) and kept on the device. The
  official RoPE calls `int(positions.max())` in every attention (96 GPU->CPU syncs per call).
- Per-layer outputs (concat of frame and global block outputs) are only materialised for the
  layers asked for, and the forward stops after the last layer needed.
- `attention="causal"`: frame k attends to frames 0..k in the global blocks (JanusVLN /
  StreamVGGT), as one masked call or one frame per call with a key/value cache (`stream_step`).

Shape legend:
    B  batch (independent sequences)        S  frames per sequence (one encoder call)
    P  tokens per frame = 1 camera + R registers + h*w patches      R  register tokens
    h, w  patch grid = H // patch_size, W // patch_size             C  embed_dim
    H_  attention heads     D  head_dim = C // H_                    N  tokens in one attention
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featstore.encoders.vggt.config import CODE_VERSION, VGGT_1B_CONFIG

__all__ = [
    "VGGTAggregator",
    "CODE_VERSION",
    "StreamState",
    "VGGT_1B_CONFIG",
    "DINOV2_VARIANTS",
    "init_random_",
]

# DINOv2 ViT sizes used as patch embed: (embed_dim, depth, heads). The official aggregator builds
# them with 4 registers (its num_register_tokens), LayerScale 1.0, bicubic antialiased position
# interpolation without the legacy 0.1 offset, and LayerNorm eps 1e-6.
DINOV2_VARIANTS: Dict[str, Tuple[int, int, int]] = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Building blocks (names of submodules/parameters follow the official checkpoint layout)
# --------------------------------------------------------------------------------------------


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ConvPatchEmbed(nn.Module):
    """Plain strided conv: [N, 3, H, W] -> [N, h*w, C]."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _rope_rotate(t: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """2-D rotary embedding on the last dim of `t` ([..., P, H_, D]); tables [P, 1, D].

    The head dim is split in two halves (rows, then columns); inside each half, element j is
    rotated with element j + D/4. Swapping those quarters and folding the sign into the sine
    table gives rotate-half with one flip and one fused multiply-add.
    """
    d = t.shape[-1]
    swapped = t.unflatten(-1, (2, 2, d // 4)).flip(-2).flatten(-3)
    return torch.addcmul(t * cos, swapped, sin_signed)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool,
                 norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def project(self, x: Tensor, rope: Optional[Tuple[Tensor, Tensor]], tokens_per_frame: int):
        """x [B', N, C] -> q, k, v each [B', H_, N, D] (q, k normalised and rotated)."""
        b, n, c = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # [B', N, 3, H_, D]
        q, k, v = qkv.unbind(2)  # each [B', N, H_, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin_signed = rope
            # RoPE positions repeat per frame (no temporal index): view N as frames x P so the
            # [P, 1, D] tables broadcast over frames instead of being tiled S times.
            nf = n // tokens_per_frame
            q = _rope_rotate(q.unflatten(1, (nf, tokens_per_frame)), cos, sin_signed).flatten(1, 2)
            k = _rope_rotate(k.unflatten(1, (nf, tokens_per_frame)), cos, sin_signed).flatten(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def finish(self, o: Tensor) -> Tensor:
        """o [B', H_, N, D] -> [B', N, C]."""
        return self.proj(o.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, rope=None, tokens_per_frame: int = 0, attn_mask=None) -> Tensor:
        q, k, v = self.project(x, rope, tokens_per_frame or x.shape[1])
        if q.dtype != v.dtype:
            # Under autocast SDPA casts q/k/v itself; outside it (fp32 LayerNorm on bf16 weights)
            # bring them to one dtype.
            q, k = q.to(v.dtype), k.to(v.dtype)
        return self.finish(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


class _Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
                 ffn_bias: bool, init_values: Optional[float], qk_norm: bool, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = _Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, norm_eps=1e-5)
        self.ls1 = _LayerScale(dim, init_values) if init_values else None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), ffn_bias)
        self.ls2 = _LayerScale(dim, init_values) if init_values else None

    @staticmethod
    def _residual(x: Tensor, h: Tensor, ls: Optional[_LayerScale]) -> Tensor:
        # addcmul = one kernel for x + h * gamma; the residual stream stays in x's dtype (fp32
        # under autocast, as in the official code where fp32 gamma promotes the bf16 branch).
        if ls is None:
            return x + h
        return torch.addcmul(x, h, ls.gamma)

    def forward(self, x: Tensor, rope=None, tokens_per_frame: int = 0, attn_mask=None) -> Tensor:
        x = self._residual(x, self.attn(self.norm1(x), rope, tokens_per_frame, attn_mask), self.ls1)
        return self._residual(x, self.mlp(self.norm2(x)), self.ls2)

    def forward_cached(self, x: Tensor, rope, tokens_per_frame: int,
                       cache: Optional[Tuple[Tensor, Tensor]]):
        """One streamed frame: x [B, P, C] attends to the cached k/v of earlier frames and itself.

        Returns (x_out, (k_all, v_all)) with k/v [B, H_, cached_frames*P + P, D]. Keys are
        cached after q/k-norm and RoPE: both act per token with per-frame positions, so this equals
        re-applying them to cached raw projections (StreamVGGT) at lower cost.
        """
        h = self.norm1(x)
        q, k, v = self.attn.project(h, rope, tokens_per_frame)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        qq, kk = (q, k) if q.dtype == v.dtype else (q.to(v.dtype), k.to(v.dtype))
        o = self.attn.finish(F.scaled_dot_product_attention(qq, kk, v))
        x = self._residual(x, o, self.ls1)
        return self._residual(x, self.mlp(self.norm2(x)), self.ls2), (k, v)


class _DinoV2PatchEmbed(nn.Module):
    """DINOv2 ViT-*/14 with registers used as patch embed: [N, 3, H, W] -> normed patch tokens."""

    def __init__(self, variant: str, img_size: int, patch_size: int, num_register_tokens: int):
        super().__init__()
        dim, depth, heads = DINOV2_VARIANTS[variant]
        self.embed_dim = dim
        self.patch_size = patch_size
        self.patch_embed = _ConvPatchEmbed(patch_size, dim)
        grid = img_size // patch_size
        self.pretrain_grid = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, dim)) if num_register_tokens else None
        )
        # Unused at inference; kept because the checkpoint has it (strict loading).
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            _Block(dim, heads, 4.0, True, True, True, 1.0, qk_norm=False, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_register_tokens = num_register_tokens
        self._pos_cache: Dict[tuple, Tensor] = {}

    def _pos_for_grid(self, h: int, w: int) -> Tensor:
        """Position embedding [1, 1 + h*w, dim] (fp32) for an h x w grid, cached per grid.

        Bicubic with antialias to the exact output size, from fp32, as DINOv2 in VGGT does
        (interpolate_offset=0). The cache key includes the parameter's version counter so a
        load_state_dict or in-place edit invalidates it.
        """
        pe = self.pos_embed
        key = (h, w, pe.device, pe.data_ptr(), pe._version)
        hit = self._pos_cache.get(key)
        if hit is not None:
            return hit
        g = self.pretrain_grid
        if h == g and w == g:
            out = pe.detach().float()
        else:
            with torch.autocast(pe.device.type, enabled=False):
                patch = pe.detach().float()[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
                patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
                patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
            out = torch.cat([pe.detach().float()[:, :1], patch], dim=1)
        self._pos_cache = {key: out}  # one grid at a time is the common case; keep memory flat
        return out

    def forward(self, x: Tensor) -> Tensor:
        n, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        t = self.patch_embed(x)  # [N, h*w, dim]
        # torch.cat promotes (bf16 conv output under autocast + fp32 cls -> fp32), as in the
        # official code; the position embedding is then added in fp32 and the block stack runs
        # its residual stream in fp32.
        t = torch.cat([self.cls_token.expand(n, -1, -1), t], dim=1)
        t = t + self._pos_for_grid(h, w).to(t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(n, -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 1 + self.num_register_tokens:]


# --------------------------------------------------------------------------------------------
# The aggregator
# --------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """Key/value cache of one causal stream (one per sequence batch; reset per sample).

    `kv[i]` holds global block i's keys and values of all frames fed so far,
    each [B, H_, frames * P, D]. `frames` counts the frames fed.
    """

    kv: List[Optional[Tuple[Tensor, Tensor]]] = field(default_factory=list)
    frames: int = 0
    grid: Optional[Tuple[int, int]] = None
    batch: Optional[int] = None


class VGGTAggregator(nn.Module):
    """VGGT's alternating-attention aggregator (frame blocks and global blocks).

    Args: the official `Aggregator`'s config names (see `VGGT_1B_CONFIG` for VGGT-1B);
        `block_fn` is not taken. `patch_embed` is "conv" or one of `DINOV2_VARIANTS`.

    Example:
        >>> import torch
        >>> from featstore.encoders.vggt.model import VGGTAggregator
        >>> agg = VGGTAggregator(embed_dim=64, depth=2, num_heads=4, patch_embed="conv")
        >>> outs, psi = agg(torch.rand(1, 2, 3, 28, 42), attention="causal")
        >>> outs[-1].shape, psi
        (torch.Size([1, 2, 11, 128]), 5)
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        patch_embed: str = "dinov2_vitl14_reg",
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        qk_norm: bool = True,
        rope_freq: float = 100,
        init_values: Optional[float] = 0.01,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
        if rope_freq > 0 and head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim % 4 == 0; got head_dim={head_dim}")
        if depth % aa_block_size:
            raise ValueError(f"depth ({depth}) must be divisible by aa_block_size ({aa_block_size})")
        if sorted(aa_order) != ["frame", "global"]:
            # The official code accepts any list; featstore only runs the VGGT order (one of each).
            raise ValueError(f"aa_order must contain 'frame' and 'global' once each; got {aa_order!r}")
        if patch_embed == "conv":
            self.patch_embed = _ConvPatchEmbed(patch_size, embed_dim)
        elif patch_embed in DINOV2_VARIANTS:
            if DINOV2_VARIANTS[patch_embed][0] != embed_dim:
                raise ValueError(
                    f"patch_embed={patch_embed!r} outputs {DINOV2_VARIANTS[patch_embed][0]} channels "
                    f"but embed_dim={embed_dim}; they must match"
                )
            self.patch_embed = _DinoV2PatchEmbed(patch_embed, img_size, patch_size, num_register_tokens)
        else:
            raise ValueError(
                f"patch_embed must be 'conv' or one of {sorted(DINOV2_VARIANTS)}; got {patch_embed!r}"
            )

        def make_block():
            return _Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias,
                          init_values, qk_norm, norm_eps=1e-5)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(depth))
        # Index 0: frame 0 of a call (or of a stream); index 1: every other frame.
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim) * 1e-6)
        self.register_buffer("_mean", torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.head_dim = head_dim
        self.rope_freq = rope_freq
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.patch_start_idx = 1 + num_register_tokens
        self._rope_cache: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self._mask_cache: Dict[tuple, Tensor] = {}

    # ---- helpers ------------------------------------------------------------------------

    def _rope_tables(self, h: int, w: int, device) -> Optional[Tuple[Tensor, Tensor]]:
        """cos and sign-folded sin tables [P, 1, D] (fp32) for an h x w grid, cached on device.

        Positions: special tokens (0, 0) -> identity rotation; patch (row, col) -> (row+1, col+1).
        Frequencies per axis: base ** (-2j / (D/2)), j < D/4, duplicated for the two quarters.
        """
        if self.rope_freq <= 0:
            return None
        key = (h, w, str(device))
        hit = self._rope_cache.get(key)
        if hit is not None:
            return hit
        d_axis = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_freq ** (torch.arange(0, d_axis, 2, device=device).float() / d_axis))
        rows = torch.arange(h, device=device).repeat_interleave(w) + 1
        cols = torch.arange(w, device=device).repeat(h) + 1
        zeros = torch.zeros(self.patch_start_idx, device=device, dtype=rows.dtype)
        pos = torch.stack([torch.cat([zeros, rows]), torch.cat([zeros, cols])], dim=1).float()  # [P, 2]
        ang = pos[:, :, None] * inv_freq[None, None, :]  # [P, axis, D/4]
        ang = torch.stack([ang, ang], dim=2)  # [P, axis, quarter, D/4]
        sign = torch.tensor([-1.0, 1.0], device=device).view(1, 1, 2, 1)
        cos = ang.cos().flatten(1)[:, None, :]
        sin_signed = (ang.sin() * sign).flatten(1)[:, None, :]
        self._rope_cache[key] = (cos, sin_signed)
        return cos, sin_signed

    def _causal_mask(self, s: int, p: int, device) -> Tensor:
        """Boolean block-causal mask [S*P, S*P]: True where query frame >= key frame.

        Boolean, not additive float: at S=9, P=1615 a float mask would be ~0.85 GB.
        """
        key = (s, p, str(device))
        m = self._mask_cache.get(key)
        if m is None:
            fid = torch.arange(s, device=device).repeat_interleave(p)
            m = fid[:, None] >= fid[None, :]
            self._mask_cache = {key: m}  # keep one: masks are large
        return m

    def _resolve_layers(self, last_layer, keep_layers):
        if keep_layers is not None:
            keep = sorted({k % self.depth if -self.depth <= k < self.depth else _bad_layer(k, self.depth)
                           for k in keep_layers})
        else:
            keep = None
        if last_layer is None:
            last = keep[-1] if keep else self.depth - 1
        else:
            if not -self.depth <= last_layer < self.depth:
                _bad_layer(last_layer, self.depth)
            last = last_layer % self.depth
        if keep is None:
            keep = list(range(last + 1))
        if keep and keep[-1] > last:
            raise ValueError(f"keep_layers {keep} go past last_layer={last}")
        return last, set(keep)

    def _embed(self, images: Tensor, first_index: Optional[int] = None,
               frame_index: Optional[Tensor] = None) -> Tuple[Tensor, int, int]:
        """images [B, S, 3, H, W] in [0, 1] -> tokens [B*S, P, C], grid h, w.

        With `frame_index` [B, S] (long), `images` are distinct frames [U, 3, H, W] and sequence b's
        frame k is images[frame_index[b, k]]: the patch embedding depends on the frame alone, so
        it runs once per distinct frame and its tokens are gathered per sequence.
        """
        if frame_index is not None:
            b, s = frame_index.shape
            images = images.unsqueeze(1)  # [U, 1, 3, H, W]: the layout the checks below read
        else:
            b, s = images.shape[:2]
        _, _, c, hh, ww = images.shape
        if c != 3:
            raise ValueError(f"images must have 3 channels at dim 2; got shape {tuple(images.shape)}")
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of patch_size={self.patch_size}")
        x = ((images - self._mean) / self._std).flatten(0, 1)
        patches = self.patch_embed(x)  # [B*S, h*w, C], or [U, h*w, C] with frame_index
        if frame_index is not None:
            patches = patches.index_select(0, frame_index.reshape(-1).to(patches.device))  # [B*S, h*w, C]
        # Frame 0 of a call takes variant 0 of the camera/register tokens, others variant 1.
        # `first_index` overrides the variant of frame 0 (streaming: 1 once the cache is non-empty).
        idx = torch.ones(s, dtype=torch.long, device=images.device)
        idx[0] = 0 if first_index is None else first_index
        special = torch.cat([self.camera_token, self.register_token], dim=2)[0]  # [2, 1+R, C]
        special = special.index_select(0, idx)  # [S, 1+R, C]
        special = special.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * s, -1, self.embed_dim)
        tokens = torch.cat([special, patches], dim=1)  # promotes to fp32 like the official cat
        return tokens, hh // self.patch_size, ww // self.patch_size

    def _alternate(self, tokens: Tensor, last: int, keep: set, *, frame_step, global_step, output
                   ) -> List[Optional[Tensor]]:
        """The alternating layer loop that `forward` and `stream_step` share.

        Per group of aa_block_size layers, run the frame blocks and the global blocks in
        aa_order (`frame_step(i, tokens)` / `global_step(i, tokens)` -> tokens), stopping after
        layer `last`; layer i's output is `output(frame_out_i, global_out_i)` when i is in
        `keep`, else None (not materialised).
        """
        outputs: List[Optional[Tensor]] = []
        layer = 0
        for _ in range(self.depth // self.aa_block_size):
            inter: Dict[str, List[Tensor]] = {"frame": [], "global": []}
            for kind in self.aa_order:
                step = frame_step if kind == "frame" else global_step
                for i in range(layer, min(layer + self.aa_block_size, last + 1)):
                    tokens = step(i, tokens)
                    inter[kind].append(tokens)
            for j in range(len(inter["global"])):
                outputs.append(output(inter["frame"][j], inter["global"][j]) if layer + j in keep else None)
            layer += self.aa_block_size
            if layer > last:
                break
        return outputs

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self,
        images: Tensor,
        *,
        attention: str = "full",
        last_layer: Optional[int] = None,
        keep_layers: Optional[Sequence[int]] = None,
        frame_index: Optional[Tensor] = None,
    ) -> Tuple[List[Optional[Tensor]], int]:
        """Run the aggregator on one call of S frames.

        Args:
            images: [B, S, 3, H, W], RGB in [0, 1] (not normalised), H, W multiples of patch_size;
                with `frame_index`, the distinct frames [U, 3, H, W] of the B sequences.
            frame_index: [B, S] long, or None: sequence b's frame k is images[frame_index[b, k]];
                the patch embedding then runs once per distinct frame (frames shared by several
                sequences of the batch are embedded once), the rest as for [B, S, 3, H, W].
            attention: "full" (official) or "causal" (frame k sees frames 0..k in global blocks).
            last_layer: stop after this layer (negative counts from depth); default: the last kept
                layer, or depth-1.
            keep_layers: layers whose output to materialise; default: all up to last_layer.

        Returns:
            (outputs, patch_start_idx): outputs[i] is layer i's [B, S, P, 2C] (frame-block output
            concatenated with global-block output), or None for layers not kept. The list has
            last_layer+1 entries.
        """
        if attention not in ("full", "causal"):
            raise ValueError(f"attention must be 'full' or 'causal'; got {attention!r}")
        last, keep = self._resolve_layers(last_layer, keep_layers)
        b, s = images.shape[:2] if frame_index is None else frame_index.shape
        tokens, h, w = self._embed(images, frame_index=frame_index)
        p, c = tokens.shape[1], tokens.shape[2]
        rope = self._rope_tables(h, w, images.device)
        mask = self._causal_mask(s, p, images.device) if (attention == "causal" and s > 1) else None

        outputs = self._alternate(
            tokens, last, keep,
            frame_step=lambda i, t: self.frame_blocks[i](t.reshape(b * s, p, c), rope, p),
            global_step=lambda i, t: self.global_blocks[i](t.reshape(b, s * p, c), rope, p, mask),
            output=lambda f, g: torch.cat([f.reshape(b, s, p, c), g.reshape(b, s, p, c)], dim=-1))
        return outputs, self.patch_start_idx

    def new_stream(self) -> StreamState:
        """An empty key/value cache for `stream_step`."""
        return StreamState(kv=[None] * self.depth)

    def stream_step(
        self,
        frame: Tensor,
        state: StreamState,
        *,
        last_layer: Optional[int] = None,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> Tuple[List[Optional[Tensor]], int]:
        """Causal streaming: feed ONE frame per sequence, attending to all frames fed before.

        Equal (up to rounding) to frame k of `forward(..., attention="causal")` on the frames fed
        so far. The state keeps k/v for global blocks up to `last_layer` only, so keep
        `last_layer` the same for every step of a stream.

        Args:
            frame: [B, 3, H, W] or [B, 1, 3, H, W] in [0, 1].
            state: from `new_stream()`; updated in place.
        Returns:
            (outputs, patch_start_idx) with outputs[i] of shape [B, 1, P, 2C] or None.
        """
        if frame.dim() == 4:
            frame = frame.unsqueeze(1)
        if frame.dim() != 5 or frame.shape[1] != 1:
            raise ValueError(f"stream_step takes one frame per sequence ([B, 3, H, W]); got {tuple(frame.shape)}")
        last, keep = self._resolve_layers(last_layer, keep_layers)
        if len(state.kv) != self.depth:
            state.kv = [None] * self.depth
        b = frame.shape[0]
        grid = (frame.shape[-2] // self.patch_size, frame.shape[-1] // self.patch_size)
        if state.frames and (grid != state.grid or b != state.batch):
            raise ValueError(
                f"all frames of a stream must share batch and size: stream has B={state.batch}, grid "
                f"{state.grid}; this frame has B={b}, grid {grid}. Start a new stream (new_stream())."
            )
        tokens, h, w = self._embed(frame, first_index=0 if state.frames == 0 else 1)
        p = tokens.shape[1]
        rope = self._rope_tables(h, w, frame.device)

        def global_step(i: int, t: Tensor) -> Tensor:
            t, state.kv[i] = self.global_blocks[i].forward_cached(t, rope, p, state.kv[i])
            return t

        outputs = self._alternate(
            tokens, last, keep,
            frame_step=lambda i, t: self.frame_blocks[i](t, rope, p),
            global_step=global_step,
            output=lambda f, g: torch.cat([f, g], dim=-1).unsqueeze(1))
        state.frames += 1
        state.grid, state.batch = grid, b
        return outputs, self.patch_start_idx

    def compile_blocks(self, **compile_kwargs) -> "VGGTAggregator":
        """torch.compile each block (fuses LayerNorm, RoPE and residual elementwise work).

        Blocks share one class, so compiled code is reused across the 2*depth blocks (and the
        DINOv2 blocks); recompiles happen per input shape (frame vs global, S, grid).
        """
        from featstore.encoders.base import compile_each

        blocks = list(self.frame_blocks) + list(self.global_blocks)
        if isinstance(self.patch_embed, _DinoV2PatchEmbed):
            blocks += list(self.patch_embed.blocks)
        compile_each(blocks, **compile_kwargs)  # one graph per (shape, block kind)
        return self


def _bad_layer(k, depth):
    raise ValueError(f"layer index {k} is out of range for depth {depth} (use 0..{depth - 1} or -{depth}..-1)")


@torch.no_grad()
def init_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter from a seeded CPU generator, with scales that keep activations O(1).

    Used by the `vggt-tiny` preset and by tests: the official init (LayerScale 0.01, special tokens
    std 1e-6) makes the blocks nearly the identity and the frame-0 token variant nearly equal to the
    others, which would let tests pass vacuously. Deterministic for a given torch CPU RNG.
    """
    g = torch.Generator().manual_seed(seed)
    for name, prm in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        r = torch.randn(prm.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            val = 0.5 + 0.1 * r
        elif "norm" in name and leaf == "weight":
            val = 1.0 + 0.1 * r
        elif leaf == "bias":
            val = 0.05 * r
        elif prm.dim() >= 2 and leaf == "weight":
            fan_in = prm[0].numel()
            val = r / math.sqrt(fan_in)
        else:  # tokens and position embeddings
            val = 0.5 * r
        prm.copy_(val.to(prm.dtype))
    return module

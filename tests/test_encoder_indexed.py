"""`VGGTEncoder.encode_indexed`: B sequences that share frames, each distinct frame given (and
patch-embedded) once, gathered per sequence by an index [B, S]; equal to `encode` of the gathered
frames. The build's frame reuse (tests/test_build_frame_reuse.py) runs on it."""

import pytest
import torch

from featstore.encoders import get_encoder
from featstore.encoders.vggt.model import VGGTAggregator, init_random_
from featstore.errors import EncoderError


@pytest.mark.parametrize("options", [{}, {"reference_frame": "last"}, {"frames_kept": "last"}, {"layer": 1},
                                     {"attention": "causal"}, {"attention": "causal", "frames_kept": "last"}])
def test_encode_indexed_equals_encode_of_the_gathered_frames(options):
    enc = get_encoder("vggt-tiny", **options)
    assert enc.encodes_indexed
    frames = torch.rand(5, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 1, 1]])
    assert torch.equal(enc.encode_indexed(frames, index), enc.encode(frames[index]))


def test_dinov2_patch_embedding_once_per_distinct_frame():
    """The DINOv2 patch embedding (VGGT-1B's) over the distinct frames, gathered per sequence,
    gives the outputs of the plain call: a small random ViT-S/14 stands in for the ViT-L."""
    torch.manual_seed(0)
    agg = init_random_(VGGTAggregator(img_size=56, embed_dim=384, depth=2, num_heads=6,
                                      patch_embed="dinov2_vits14_reg")).eval()
    frames = torch.rand(4, 3, 28, 42)
    index = torch.tensor([[0, 1, 3], [0, 2, 3]])
    with torch.inference_mode():
        calls = []
        agg.patch_embed.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        got, _ = agg(frames, frame_index=index)
        want, _ = agg(frames[index])
    assert calls == [4, 6]  # 4 distinct frames embedded, against 6 frame instances
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_encode_indexed_is_refused_where_it_is_not_offered():
    official = get_encoder("vggt-tiny")
    official.backend = "official"  # the official package's aggregator takes no frame index
    assert not official.encodes_indexed
    with pytest.raises(EncoderError, match="encode_indexed needs backend='featstore'"):
        official.encode_indexed(torch.rand(2, 3, 28, 28), torch.zeros(1, 2, dtype=torch.long))
    enc = get_encoder("vggt-tiny")
    with pytest.raises(EncoderError, match=r"index values must lie in \[0, 2\)"):
        enc.encode_indexed(torch.rand(2, 3, 28, 28), torch.tensor([[0, 2]]))
    with pytest.raises(EncoderError, match="index \\[B, S\\] of dtype long"):
        enc.encode_indexed(torch.rand(2, 3, 28, 28), torch.tensor([0, 1]))

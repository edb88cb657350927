"""Compare stored features with recomputed ones within the tolerance of their dtypes.

Used by `featstore verify --recompute`, training's cached == online test and the benchmarks.

Example:
    >>> import torch
    >>> from featstore.ops.compare import compare_features
    >>> ref = torch.randn(1, 48, 128)
    >>> compare_features(ref.to(torch.bfloat16), ref, "bfloat16")["ok"]
    True
    >>> compare_features(ref.to(torch.bfloat16), ref.flip(1), "bfloat16")["ok"]
    False
"""

from __future__ import annotations

import math

# storage dtype -> (max |stored - recomputed| / max |stored|, min cosine): each storage codec's
# `tolerance` (featstore.format.codecs); the loosest of it and the compute dtype's row applies.
from featstore.format.codecs import RECOMPUTE_TOLERANCES

__all__ = ["compare_features", "RECOMPUTE_TOLERANCES", "COMPUTE_TOLERANCES"]

# A CUDA build computes under autocast(compute_dtype); a CPU recompute runs float32, so errors
# compound through the network. Measured on vggt-tiny (4 blocks), sample_data, autocast vs fp32:
# bf16 0.6% of max |x|, cosine 0.99999; fp16 0.08%, cosine 0.9999998. VGGT-1B has 24 blocks, not
# measured here: the rows leave ~8x (bf16) and ~12x (fp16) headroom. A wrong layer, weights or
# frame order gives cosine far below (tests/test_verify.py::test_recompute_catches_wrong_features).
COMPUTE_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-2, 0.9999),
    "bfloat16": (5e-2, 0.999),
}


def compare_features(stored, recomputed, storage_dtype: str, compute_dtype: str | None = None) -> dict:
    """Compare two feature tensors within the tolerance of the storage (and compute) dtype.

    Args:
        stored: the features as stored (any dtype, any device).
        recomputed: the same unit's features computed again (same shape).
        storage_dtype: the store's storage dtype name ("bfloat16", "float16", "float32",
            "float8_e4m3fn").
        compute_dtype: the autocast dtype the store was computed under, when it matters (a
            CUDA build compared with a CPU recompute); None: storage rounding only.

    Returns:
        dict with max_abs_error, rel_error (max abs error / max |stored|), cosine, the
        tolerances used (rel_tolerance, cosine_tolerance), and ok; on a shape mismatch only
        ok=False, error and the tolerances.
    """
    import torch

    a = stored.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    b = recomputed.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    rows = [RECOMPUTE_TOLERANCES.get(storage_dtype, RECOMPUTE_TOLERANCES["bfloat16"])]
    if compute_dtype in COMPUTE_TOLERANCES:
        rows.append(COMPUTE_TOLERANCES[compute_dtype])
    rel_tol = max(r[0] for r in rows)
    cos_tol = min(r[1] for r in rows)
    if tuple(stored.shape) != tuple(recomputed.shape):
        return {"ok": False, "error": f"shape {list(stored.shape)} != recomputed {list(recomputed.shape)}",
                "rel_tolerance": rel_tol, "cosine_tolerance": cos_tol}
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    ok = math.isfinite(err) and rel <= rel_tol and cos >= cos_tol
    return {"ok": ok, "max_abs_error": err, "rel_error": rel, "cosine": cos,
            "rel_tolerance": rel_tol, "cosine_tolerance": cos_tol}

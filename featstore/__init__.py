"""featstore: precompute frozen-encoder features once, serve them to training zero-copy.

One LMDB environment beside the data holds one safetensors blob per unit (one encoder call),
keyed by the unit's path relative to the data root. See docs/FORMAT.md for the store format.

Layers, one module per role, from the bytes on disk to the commands:
    on-disk     format (one value: safetensors blob + CRC-32), keys (one key), store (the LMDB
                layout, the manifest, the one spec check and the one truncation check)
    read/write  reader (`FeatureStore`: zero-copy reads in any process), writer (`StoreWriter`)
    entry       plan (units: which encoder calls exist), encoders (`resolve_spec`, `get_encoder`,
                `EncoderSpec`, the `Encoder` protocol, VGGT), encode (encode one unit), compare
                (stored vs recomputed within dtype tolerance), dtypes (the one dtype map)
    build       build (the overlapped pipeline, several GPUs and hosts), merge (shards -> one)
    operate     verify, gc, copy, info, cli (the `featstore` command)
Training imports plan, reader and encoders.resolve_spec (encode for the online path); none of
them imports the build or the VGGT model module.

Example:
    >>> from featstore import FeatureStore
    >>> with FeatureStore("data/") as store:       # finds data/vggt_features.lmdb
    ...     len(store), store.manifest["encoder"]["encoder"]
    (10, 'vggt-tiny')
"""

__version__ = "0.1.0"

from featstore.errors import *  # noqa: F401,F403
from featstore.errors import __all__ as _errors_all

__all__ = ["__version__", "FeatureStore", "StoreWriter", *_errors_all]


def __getattr__(name):
    # Lazy so that `import featstore` stays cheap (no lmdb/torch import for `--help`).
    if name == "FeatureStore":
        from featstore.store.reader import FeatureStore

        return FeatureStore
    if name == "StoreWriter":
        from featstore.store.writer import StoreWriter

        return StoreWriter
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")

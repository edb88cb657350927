"""featstore: precompute frozen-encoder features once, serve them to training zero-copy.

One LMDB environment beside the data holds one safetensors blob per unit (one encoder call),
keyed by the unit's path relative to the data root. See docs/FORMAT.md for the store format.
"""

__version__ = "0.1.0"

from featstore.errors import *  # noqa: F401,F403
from featstore.errors import __all__ as _errors_all

__all__ = ["__version__", "FeatureStore", "StoreWriter", *_errors_all]


def __getattr__(name):
    # Lazy so that `import featstore` stays cheap (no lmdb/torch import for `--help`).
    if name == "FeatureStore":
        from featstore.reader import FeatureStore

        return FeatureStore
    if name == "StoreWriter":
        from featstore.writer import StoreWriter

        return StoreWriter
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")

"""Exceptions featstore raises: one class per failure a caller can handle."""

__all__ = [
    "FeatstoreError",
    "VideoSupportError",
    "CorruptEntryError",
    "InvalidKeyError",
    "MissingKeyError",
    "FingerprintMismatchError",
    "StoreNotFoundError",
    "StorePermissionError",
    "ManifestError",
    "CorruptStoreError",
    "StoreFullError",
    "EncoderError",
    "WeightsError",
    "ImageDecodeError",
    "PlanError",
    "StoreAlreadyOpenError",
    "InheritedLockedStoreError",
    "EntrySchemaError",
    "MergeConflictError",
    "StoreBusyError",
    "InvalidFeatureSetError",
    "FeatureSetNotFoundError",
]


class FeatstoreError(Exception):
    """Base class of every error featstore raises on purpose."""


class CorruptEntryError(FeatstoreError):
    """A stored blob does not decode, or its bytes do not match their checksum."""


class InvalidKeyError(FeatstoreError, ValueError):
    """A key is not a clean relative path, or is longer than LMDB's 511-byte key limit."""


class MissingKeyError(FeatstoreError, KeyError):
    """The key is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class StaleEntryError(MissingKeyError):
    """The entry's source files changed (size or mtime) since it was computed: a miss, never served."""


class FingerprintMismatchError(FeatstoreError):
    """The store was built with an encoder spec that differs from the one asked for."""


class StoreNotFoundError(FeatstoreError, FileNotFoundError):
    """No featstore database exists at the given path."""


class StorePermissionError(FeatstoreError, PermissionError):
    """The store (or the folder it goes in) exists, but this user may not read or write it."""


class ManifestError(FeatstoreError):
    """The store's manifest is missing, unparsable, or of an unsupported format version."""


class CorruptStoreError(FeatstoreError):
    """The LMDB files of a store are damaged (truncated, overwritten, or not LMDB at all)."""


class StoreFullError(FeatstoreError, OSError):
    """The disk holding the store is full; everything committed before is kept."""


class EncoderError(FeatstoreError):
    """An encoder cannot be built or run as configured."""


class WeightsError(EncoderError):
    """A weights file is missing, unreadable, or lacks / adds parameters."""


class ImageDecodeError(FeatstoreError):
    """An image file cannot be read or is unusable (truncated, zero bytes, too small)."""


class VideoSupportError(FeatstoreError, ImportError):
    """A container video must be decoded and PyAV (featstore's `video` extra) is not installed."""


class PlanError(FeatstoreError):
    """The units to build cannot be planned (bad annotations, key collisions)."""


class StoreAlreadyOpenError(FeatstoreError):
    """The store is already open in this process (a StoreWriter or another handle): LMDB allows
    one environment per path per process. Close the other first, or share it."""


class InheritedLockedStoreError(FeatstoreError):
    """A store opened with locking (its build in progress) before fork is used in the forked
    child, e.g. a DataLoader worker: open it only inside the workers, or use 'spawn'."""


class EntrySchemaError(FeatstoreError):
    """An entry decodes but lacks what the caller asked of it (a tensor name): a schema
    problem, never a miss, so a compute-on-miss policy must not recompute it."""


class MergeConflictError(FeatstoreError):
    """Two shards hold different values for one key."""


class StoreBusyError(FeatstoreError):
    """Another build is writing the store (its pid, host and start time are named)."""


class InvalidFeatureSetError(FeatstoreError, ValueError):
    """A feature set name is not 1 to 32 characters of [a-z0-9_]."""


class FeatureSetNotFoundError(ManifestError):
    """The store holds no feature set of that name (the message lists the sets it has)."""

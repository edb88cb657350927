"""Check 1, structure: data.mdb is not truncated and passes LMDB's offline structural audit,
*before* the file is mapped: a truncated map is a SIGBUS, not an exception, once a page past
the end is touched. Reads the file with read(), never mmap."""

from __future__ import annotations

import os

from featstore.errors import CorruptStoreError
from featstore.ops.verify.report import MAX_LISTED, Report
from featstore.store.layout import truncated_size

__all__ = ["check_structure", "check_size"]


def check_structure(path: str, report: Report, *, full: bool) -> bool:
    """Return True when data.mdb may be mapped. `full`: run `lmdb.verify` (py-lmdb >= 3.0, a
    pure-Python byte walker reading every page header once); else only the size is checked."""
    data = os.path.join(path, "data.mdb")
    audit = None
    if full:
        try:
            from lmdb import verify as audit  # py-lmdb >= 3.0: a pure-Python byte walker
        except ImportError:
            report.notes.append("structure: py-lmdb < 3.0 has no lmdb.verify; only the file size was checked")
    if audit is not None:
        try:
            errors = audit.verify(path, subdir=True)
        except audit.VerifyError as e:
            raise CorruptStoreError(f"{data}: not a usable LMDB data file ({e}); restore or rebuild the store") from None
        except OSError as e:
            raise CorruptStoreError(f"{data}: cannot read it ({e.strerror}); check its permissions, or restore the "
                                    "store from a good copy") from None
        report.checks.append("structure")
        for err in errors[:MAX_LISTED]:
            report.add("structure", f"{data}: {err}")
        if len(errors) > MAX_LISTED:
            report.add("structure", f"{data}: ... and {len(errors) - MAX_LISTED} more structural problems")
        return not errors
    report.checks.append("file size")
    return True


def check_size(path: str, report: Report) -> bool:
    """A data.mdb shorter than its last page is a truncated copy: touching the missing pages
    through the map raises SIGBUS in this process, so refuse before LMDB maps the file."""
    data = os.path.join(path, "data.mdb")
    short = truncated_size(path)
    if short is not None:
        have, need = short
        report.add("structure", f"{data}: truncated: {have} bytes on disk, but its pages need {need} "
                                "(an interrupted copy?)")
        return False
    return True

"""Check 3, entries: every value decodes and its CRC-32 (header and tensors) matches; dtype ==
storage dtype; shape [frames_kept, grid rows*cols, channels] (channels: the encoder family's
stored-shape rule); entry fingerprint == manifest's; the key is canonical.

Values are read in parallel threads, each its own read transaction (zlib's CRC-32 releases the
GIL, so the pass is bound by disk and checksum speed). What the later checks need from each
entry is kept as a `Record`; no tensor data is kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from featstore.format.codecs import codec_for
from featstore.errors import CorruptEntryError, FeatstoreError, InvalidKeyError
from featstore.format.keys import normalize_key
from featstore.ops.verify.report import Finding, Report
from featstore.store.layout import storage_dtype_of

__all__ = ["Record", "read_entries", "expected_channels"]

CHUNK_ENTRIES = 64  # keys per task: large enough to amortise a transaction, small enough to balance


@dataclass
class Record:
    """What the later checks need from one decoded entry (no tensor data is kept)."""

    key: str
    frames: list | None
    sources: list | None


def read_entries(fs, manifest: dict, workers: int, progress: bool, report: Report) -> dict[str, Record]:
    """Decode and check every entry of the set `fs` (a FeatureStore) reads; findings go into
    `report`, with its entry count, bytes read and read time. Returns {key: Record} of the
    entries that decode."""
    from featstore.progress import Progress

    report.checks.append("entries (decode, crc32, dtype, shape)")
    enc = manifest.get("encoder") or {}
    expect = {"dtype": storage_dtype_of(manifest), "fingerprint": manifest.get("fingerprint"),
              "frames_kept": enc.get("frames_kept", "all"), "channels": expected_channels(enc)}
    keys = fs.raw_keys()  # keys only: never touches the overflow pages of big values
    records: dict[str, Record] = {}
    t0 = time.perf_counter()
    bar = Progress(manifest.get("bytes") or None, desc=report.progress_desc("entries"), unit="B", enabled=progress)
    try:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="featstore-verify") as pool:
            futures = [pool.submit(_check_chunk, fs, chunk, expect) for chunk in _chunks(keys, CHUNK_ENTRIES)]
            for fut in cf.as_completed(futures):
                recs, findings, nbytes = fut.result()
                for r in recs:
                    records[r.key] = r
                report.problems.extend(findings)
                report.bytes_read += nbytes
                bar.update(nbytes)
    finally:
        bar.close()
    report.read_seconds = time.perf_counter() - t0
    report.entries = len(keys)
    report.problems.sort(key=lambda f: (f.kind, f.key or ""))  # threads finish in any order
    if manifest.get("entries") != len(keys):
        report.add("manifest", f"manifest: says {manifest.get('entries')} entries, the store holds {len(keys)}")
    if manifest.get("bytes") != report.bytes_read:
        report.add("manifest", f"manifest: says {manifest.get('bytes')} value bytes, the store holds {report.bytes_read}")
    return records


def expected_channels(encoder: dict) -> int | None:
    """The channels the set's encoder stores, by its family's stored-shape rule
    (`featstore.encoders.stored_channels`: VGGT 2 x embed_dim, Qwen's vision tower hidden_size, a
    registered family its own); None (no channel check) when the spec does not parse or does not say.

    Example:
        >>> from featstore.encoders import resolve_spec
        >>> from featstore.ops.verify.entries import expected_channels
        >>> expected_channels(resolve_spec("vggt-tiny").to_dict()), expected_channels({})
        (128, None)
    """
    from featstore.contract.spec import EncoderSpec
    from featstore.encoders import stored_channels

    try:
        spec = EncoderSpec.from_dict(encoder)
        return int(stored_channels(spec))
    except (FeatstoreError, KeyError, TypeError, ValueError):
        return None


def _check_chunk(fs, keys: list[bytes], expect: dict) -> tuple[list[Record], list[Finding], int]:
    """Decode and checksum the values of `keys` inside one read transaction (a worker thread)."""
    from featstore.format.blob import decode_entry

    records, findings, nbytes = [], [], 0
    for kb, value in fs.raw_values(keys):
        key = kb.decode("utf-8", "backslashreplace")
        if value is None:  # deleted since the key listing (a writer is running)
            continue
        nbytes += len(value)
        try:
            entry = decode_entry(value, key=key, verify=True)
            findings += _check_entry(key, entry, expect)
            meta = entry.metadata
            records.append(Record(key, json_list(meta.get("frames")), json_list(meta.get("sources"))))
        except CorruptEntryError as e:
            findings.append(Finding("corrupt", str(e), key))
        del value  # a view into the map: never used after the transaction ends
    return records, findings, nbytes


def json_list(text: str | None) -> list | None:
    """A metadata field that holds a JSON list, parsed; None when absent or not a list."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _check_entry(key: str, entry, expect: dict) -> list[Finding]:
    codec = codec_for(expect["dtype"])
    out = []
    feats = entry.tensors.get("features")
    if feats is None:
        return [Finding("shape", f"entry {key!r}: no 'features' tensor (has {sorted(entry.tensors)})", key)]
    if not codec.all_finite(feats):  # builds refuse them since; another writer, or an older build, did not
        out.append(Finding("corrupt", f"entry {key!r}: its features hold NaN or infinite values", key))
    dtype = str(feats.dtype).removeprefix("torch.")
    if expect["dtype"] and dtype != expect["dtype"]:
        out.append(Finding("dtype", f"entry {key!r}: features are {dtype}, the manifest says {expect['dtype']}", key))
    shape = list(feats.shape)
    out += [Finding(kind, message, key) for kind, message in codec.check_tensors(entry.tensors, key=key)]
    meta = entry.metadata
    want = [None, None, expect["channels"]]
    frames = json_list(meta.get("frames"))
    if frames is not None:
        want[0] = 1 if expect["frames_kept"] == "last" else len(frames)
    grid = json_list(meta.get("grid"))
    if grid is not None and len(grid) == 2 and all(isinstance(g, int) for g in grid):
        want[1] = grid[0] * grid[1]
    if len(shape) != 3 or any(w is not None and w != s for w, s in zip(want, shape)):
        wanted = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
        out.append(Finding("shape", f"entry {key!r}: features shape {shape}, expected {wanted} "
                                    f"([frames_kept, grid rows*cols, channels])", key))
    fp = meta.get("fingerprint")
    if expect["fingerprint"] and fp is not None and fp != expect["fingerprint"]:
        out.append(Finding("fingerprint", f"entry {key!r}: computed with encoder fingerprint {fp[:16]}, "
                                          f"the manifest says {expect['fingerprint'][:16]}", key))
    try:
        if normalize_key(key) != key:
            out.append(Finding("key", f"key {key!r} is not canonical (normalises to {normalize_key(key)!r})", key))
    except InvalidKeyError as e:
        out.append(Finding("key", f"key {key!r}: {e}", key))
    return out


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]

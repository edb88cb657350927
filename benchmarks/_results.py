"""Where a benchmark writes its JSON: --out, else $OUT (the device tool's folder), else ./bench_out."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(out, filename: str, report: dict) -> Path:
    """Write `report` as indented JSON to <out>/<filename> (the folder made if needed), say where,
    and return the path. `out`: the --out argument, or None."""
    folder = Path(out or os.environ.get("OUT") or "bench_out")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path

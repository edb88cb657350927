"""`featstore verify`: check a store, feature set by feature set (`verify_store` -> `Report`).

One module per role: `report` (findings, the summary, the JSON), one per check (`structure`,
`manifest`, `entries`, `freshness`, `coverage`, `recompute`), `orchestrate` (`verify_store`:
the checks over every set), `weights` (`--weights [NAME=]PATH`), `cli` (the command; its help
lists the checks in order).
"""

from featstore.ops.verify.coverage import plan_unit_of
from featstore.ops.verify.orchestrate import verify_store
from featstore.ops.verify.report import PROBLEM_KINDS, Finding, Report
from featstore.ops.verify.weights import parse_weights

__all__ = ["Finding", "Report", "verify_store", "plan_unit_of", "parse_weights", "PROBLEM_KINDS"]

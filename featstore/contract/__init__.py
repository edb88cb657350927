"""featstore/contract."""

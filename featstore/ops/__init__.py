"""featstore/ops."""

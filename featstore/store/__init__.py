"""featstore/store."""

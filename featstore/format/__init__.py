"""featstore/format."""

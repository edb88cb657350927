"""featstore/build."""

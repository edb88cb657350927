"""featstore/encoders/vggt."""

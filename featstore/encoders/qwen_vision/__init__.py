"""featstore/encoders/qwen_vision."""

"""File formats: streaming, validating readers and writers (safetensors)."""

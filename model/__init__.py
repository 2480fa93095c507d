"""Model presets, construction, FLOPs accounting and tokenizers. Knows nothing of DeepSpeed."""

"""Model loading, the embedded default, adapters and merging."""

"""Page-level algorithms as plain torch functions (no vLLM): digests, scoring, selection."""

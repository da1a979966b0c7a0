"""vLLM glue: plugin registration, CLI flags, KV-cache spec/manager and attention backend."""

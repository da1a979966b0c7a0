# The two commands a newcomer needs (see README): `make serve` and `make test`.
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?= configs/arkvale.yaml
# CPU memory for the KV cache, in GiB (vLLM's CPU backend setting).
export VLLM_CPU_KVCACHE_SPACE ?= 4

.PHONY: setup serve test
setup:
	bash scripts/setup.sh

serve: setup
	$(VENV)/bin/vllm serve "$$($(VENV)/bin/python -m vllm_kvevict.model)" --config $(CONFIG) --host $(HOST) --port $(PORT)

test: setup
	$(VENV)/bin/python -m pytest -v $(PYTEST_ARGS)

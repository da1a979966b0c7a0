"""Benchmarks: ``python -m vllm_kvevict.bench {passkey,perplexity,latency,throughput,recall,all}``.

Each command runs the real engine with the plugin on the bundled model and writes, under
``--out``, ``<name>.json`` (settings, machine, results), ``<name>.md`` (a table) and PNG plots.
"""

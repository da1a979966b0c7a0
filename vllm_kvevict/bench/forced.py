"""Teacher forcing through decode steps: a logits processor that makes the sampler emit given
tokens, so their (raw) log-probabilities are those of the model under the eviction policy.

vLLM returns ``logprobs`` of the raw logits (``logprobs_mode=raw_logprobs``, the default), i.e.
before logits processors run, so masking here changes what is sampled but not the reported
log-probability of the forced token.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCED_TOKENS_KEY = "kvevict_forced_tokens"


class ForcedTokens(AdapterLogitsProcessor):
    """Per request: ``SamplingParams(extra_args={"kvevict_forced_tokens": [...]})``."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if not forced:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            step = len(output_ids)
            if step < len(forced):
                token = forced[step]
                logits.fill_(float("-inf"))
                logits[token] = 0.0
            return logits

        return force

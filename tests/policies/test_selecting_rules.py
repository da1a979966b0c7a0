"""Selecting policies' scoring rules."""
import pytest
import torch

from vllm_kvevict.algorithms.digest import score_pages
from vllm_kvevict.policies import POLICY_REGISTRY
from vllm_kvevict.policies.base import PageSelectionPolicy

SELECTING = [name for name, policy in POLICY_REGISTRY.items()
             if isinstance(policy, PageSelectionPolicy)]


@pytest.mark.parametrize("name", SELECTING)
def test_a_policy_claiming_the_digest_bound_scores_by_it(name):
    """``digest_bound_score`` hands scoring to the CUDA kernel, which computes the digest upper
    bound averaged over query heads: a policy may claim it only if that is its score."""
    policy = POLICY_REGISTRY[name]
    torch.manual_seed(0)
    query = torch.randn(3, 8, 16)
    hi = torch.randn(3, 5, 2, 16)
    lo = hi - torch.rand(3, 5, 2, 16)
    claims = policy.digest_bound_score
    matches = torch.allclose(policy.score(query, hi, lo), score_pages(query, hi, lo))
    assert claims == matches

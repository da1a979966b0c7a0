"""The life of a page under a selecting policy (ArkVale): fill -> backup -> evict -> recall.

Plain torch; vLLM glue (``vllm_kvevict.engine``) only feeds it the batch and the KV cache.

* **Fill.** vLLM writes a request's tokens into the blocks the scheduler gave it; logical page
  ``p`` is written into the block at position ``p`` of the request's block table.
* **Backup.** In the step a page fills, each layer copies it to a host page and stores its digest
  (``[hi, lo]`` per KV head, kept on the device for every page, resident or not).
* **Evict.** The scheduler frees the blocks of positions ``PageLayout.evicted_pages``; whatever a
  freed block held in each layer is no longer resident (its host copy stays).
* **Anchor.** When the prompt ends (arkvale), per layer, the pages its last queries attend to
  most (exact attention, all pages still resident) are pinned for the request's life in the
  budget left besides sinks, window and top-k.
* **Recall.** Each decode step, per layer, the policy scores every backed-up page with the query;
  sinks + window + anchors + the top-k pages are kept. Kept pages that are not resident are
  copied from host into the owned blocks holding the lowest-scored pages that were not kept.

Because layers choose different pages, one block holds different logical pages in different
layers: :class:`RequestPages` keeps, per layer, which page each owned block holds. With per-head
selection (arkvale's default) each KV head scores, anchors, keeps and recalls on its own, and
each head's slice of a block holds the page that head chose: the table is then per layer and KV
head, and everything below holds per head. Keys carry their original RoPE positions, so
attention over any set of blocks is attention over the pages they hold, in any order, as long
as the page being filled comes last; a head reads only its own slice of each block.

Invariants (per request, per layer, per placement):

* between steps (after the scheduler's frees), every owned block at a full position holds a
  distinct backed-up page; the block of the page being filled holds that page;
* sink pages and window pages are always held at their own positions; anchors are always held;
* with nothing evicted, every block holds its own page and nothing is selected or recalled, so
  the result is the stock computation.

Plan once per step, run per layer: :meth:`PageRuntime.plan_step` turns the batch into padded
tensors on the host and moves them in one copy (:mod:`.plan`); each layer then runs one scoring
pass, one keep mask and one masked page copy for all selecting rows (:mod:`.runtime`), through
:mod:`.ops` (compiled kernels on CPU, the Triton kernels on CUDA, with no host synchronisation
in a layer; plain torch as their reference). Also here: how backends store a block
(:mod:`.formats`), the host store (:mod:`.store`; its CPU digests on huge pages, :mod:`.memory`),
the per-request page tables (:mod:`.requests`) and a benchmark probe (:mod:`.probe`).
"""
from vllm_kvevict.pages.formats import BlockFormat, CPUBlockFormat, FlashBlockFormat, key_tiles
from vllm_kvevict.pages.plan import RowSelection, SelectionBatch, StepPlan
from vllm_kvevict.pages.probe import SelectionProbe
from vllm_kvevict.pages.requests import (PageStats, RequestPages, RequestRegistry, RowInput,
                                         own_row_blocks)
from vllm_kvevict.pages.runtime import PageRuntime
from vllm_kvevict.pages.store import HostPageStore, HostStoreFull

__all__ = ["BlockFormat", "CPUBlockFormat", "FlashBlockFormat", "HostPageStore", "HostStoreFull",
           "PageRuntime", "PageStats", "RequestPages", "RequestRegistry", "RowInput",
           "RowSelection", "SelectionBatch", "SelectionProbe", "StepPlan", "key_tiles",
           "own_row_blocks"]

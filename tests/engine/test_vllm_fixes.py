"""Work-arounds for vLLM 0.32 defects (``vllm_kvevict.engine.vllm_fixes``)."""
import numpy as np
import pytest


def _load_llvmlite():
    """Run a compiled CPU kernel, as a CPU worker does at its first selecting step."""
    from vllm_kvevict.kernels import cpu

    keep = np.zeros((1, 0), dtype=np.bool_)
    cpu.attended_blocks(keep, np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.int64),
                        np.zeros(1, dtype=np.int64), np.full(1, -1, dtype=np.int64),
                        np.zeros((1, 1), dtype=np.int64))


def test_vllms_kernel_scan_fails_on_llvmlite_unpatched():
    """The defect itself: if this starts passing, vLLM fixed it and the work-around can go."""
    from vllm.triton_utils import dispatcher

    from vllm_kvevict.engine.patching import _ORIGINAL

    _load_llvmlite()
    scan = getattr(dispatcher._rebind_kernels, _ORIGINAL, dispatcher._rebind_kernels)
    with pytest.raises(AttributeError):
        scan([])


def test_a_worker_starting_after_compiled_kernels_ran_scans_fine(plugin):
    """What a CPU worker's start runs (``register_triton_kernel_overrides``), in a process where
    the compiled kernels already ran (a second engine in the process, or one forked from it)."""
    import sys

    from vllm.triton_utils import dispatcher

    _load_llvmlite()
    dispatcher._rebind_kernels([])
    assert "llvmlite.binding.ffi" in sys.modules and "numba" in sys.modules

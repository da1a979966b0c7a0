"""Per-layer decode attention with the Triton kernels: sparse (selected pages) vs dense.

For each context length, batch size and budget: attention over ``budget / page_size`` selected
pages per request, over all pages with the same kernel (dense), and torch's
``scaled_dot_product_attention`` over contiguous K/V; digest scoring + top-k as a share of the
step; achieved memory bandwidth of the sparse kernel as a fraction of the device's peak.

Real timings need CUDA. On CPU (``--quick`` smoke runs) the same code runs through Triton's
interpreter and the timings say nothing about kernels.
"""
from __future__ import annotations

import os
import platform
import time

# Published peak DRAM bandwidth (bytes/s) by device-name fragment.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12}


def _environment(device) -> dict:
    import torch
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": name,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "triton": triton.__version__, "model": "synthetic",
            "vllm": "not used", "timings_meaningful": device.type == "cuda"}


def _peak(name: str) -> float | None:
    for fragment, peak in PEAK_BANDWIDTH.items():
        if fragment in name:
            return peak
    return None


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after warm-up."""
    import torch

    from vllm_kvevict.bench.common import median

    fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return median(times)
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return median(times)


def _one_config(context, batch, budget, page_size, num_q_heads, num_kv_heads, head_dim,
                repeats, device, peak) -> dict:
    import torch

    from vllm_kvevict.kernels.digest import build_digests
    from vllm_kvevict.kernels.scoring import score_batch, selected_blocks, top_pages
    from vllm_kvevict.kernels.sparse_decode import sparse_paged_decode

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pages = context // page_size
    gen = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn((2, batch * pages, page_size, num_kv_heads, head_dim), generator=gen,
                     device=device, dtype=dtype)
    key_cache, value_cache = kv[0], kv[1]
    block_table = torch.randperm(batch * pages, generator=gen, device=device).view(batch, pages)
    query = torch.randn((batch, num_q_heads, head_dim), generator=gen, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), context, device=device)
    num_pages = torch.full((batch,), pages, device=device)
    hi, lo = build_digests(key_cache, torch.arange(batch * pages, device=device))
    keep = budget // page_size
    sink, window = 1, 1
    scale = head_dim ** -0.5

    def select():
        scores = score_batch(query, hi, lo, block_table, num_pages, sink, window)
        chosen, _ = top_pages(scores, keep)
        return selected_blocks(chosen, block_table, seq_lens, page_size)

    blocks, tokens = select()
    all_tokens = torch.full((batch, pages), page_size, dtype=torch.int32, device=device)
    sparse_s = _timed(lambda: sparse_paged_decode(query, key_cache, value_cache, blocks, tokens,
                                                  scale), device, repeats)
    dense_s = _timed(lambda: sparse_paged_decode(query, key_cache, value_cache, block_table,
                                                 all_tokens, scale), device, repeats)
    scoring_s = _timed(select, device, repeats)
    # Contiguous K/V for torch's attention: [batch, kv_heads, context, head_dim].
    k = key_cache[block_table].reshape(batch, context, num_kv_heads, head_dim).transpose(1, 2)
    v = value_cache[block_table].reshape(batch, context, num_kv_heads, head_dim).transpose(1, 2)
    k, v = k.contiguous(), v.contiguous()
    q4 = query[:, :, None]
    sdpa_s = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, k, v, scale=scale, enable_gqa=True), device, repeats)
    del kv
    k = v = None  # freed before the next size
    read_bytes = 2 * batch * keep * page_size * num_kv_heads * head_dim * query.element_size()
    bandwidth = read_bytes / sparse_s
    step = scoring_s + sparse_s
    return {"context": context, "batch": batch, "budget": budget,
            "sparse_ms": 1000 * sparse_s, "dense_ms": 1000 * dense_s, "sdpa_ms": 1000 * sdpa_s,
            "scoring_ms": 1000 * scoring_s, "scoring_share": scoring_s / step,
            "speedup_vs_dense": dense_s / step, "speedup_vs_sdpa": sdpa_s / step,
            "bandwidth_gb_s": bandwidth / 1e9,
            "bandwidth_fraction": bandwidth / peak if peak else None}


def run(model_path, out_dir: str, contexts: list[int], batches: list[int], budgets: list[int],
        page_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
        repeats: int) -> dict:
    """Writes ``{out_dir}/kernels.{json,md,png}`` (``model_path`` is unused: synthetic K/V)."""
    import torch

    from vllm_kvevict.bench.common import markdown_table, write_results

    try:
        from tqdm import tqdm
    except ImportError:  # GPU machines may lack it
        def tqdm(items, desc):
            return items

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _environment(device)
    peak = _peak(env["device"])
    configs = [(c, b, g) for c in contexts for b in batches for g in budgets if g < c]
    rows = []
    for context, batch, budget in tqdm(configs, desc="kernels"):
        rows.append(_one_config(context, batch, budget, page_size, num_q_heads, num_kv_heads,
                                head_dim, repeats, device, peak))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings = {"contexts": contexts, "batches": batches, "budgets": budgets,
                "page_size": page_size, "num_q_heads": num_q_heads,
                "num_kv_heads": num_kv_heads, "head_dim": head_dim, "repeats": repeats,
                "dtype": "bfloat16" if device.type == "cuda" else "float32",
                "peak_bandwidth_bytes_s": peak}
    payload = {"environment": env, "settings": settings, "results": rows}
    note = ("" if env["timings_meaningful"] else
            "**CPU run through Triton's interpreter: a smoke run, the timings are not kernel "
            "timings.**\n\n")
    table = markdown_table(
        ["context", "batch", "budget", "sparse ms", "dense ms", "sdpa ms", "scoring ms",
         "scoring share", "vs dense", "vs sdpa", "GB/s", "of peak"],
        [[r["context"], r["batch"], r["budget"], f"{r['sparse_ms']:.3f}", f"{r['dense_ms']:.3f}",
          f"{r['sdpa_ms']:.3f}", f"{r['scoring_ms']:.3f}", f"{100 * r['scoring_share']:.0f}%",
          f"{r['speedup_vs_dense']:.1f}x", f"{r['speedup_vs_sdpa']:.1f}x",
          f"{r['bandwidth_gb_s']:.0f}",
          "-" if r["bandwidth_fraction"] is None else f"{100 * r['bandwidth_fraction']:.0f}%"]
         for r in rows])
    write_results(out_dir, "kernels", payload,
                  note + f"Per-layer decode on {env['device']}: {num_q_heads} query / "
                  f"{num_kv_heads} KV heads, head dim {head_dim}, pages of {page_size}. "
                  "'vs dense' and 'vs sdpa' divide their time by sparse + scoring.\n\n" + table)
    plot(rows, out_dir)
    return payload


def plot(rows: list[dict], out_dir: str) -> None:
    """Step time (scoring + sparse) vs dense, per context, one line per batch and budget."""
    try:
        import matplotlib
    except ImportError:  # GPU machines may lack it: re-plot from kernels.json elsewhere
        print("kernels: matplotlib missing, no PNG", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for batch in sorted({r["batch"] for r in rows}):
        for budget in sorted({r["budget"] for r in rows}):
            line = [r for r in rows if r["batch"] == batch and r["budget"] == budget]
            if line:
                ax.plot([r["context"] for r in line], [r["speedup_vs_dense"] for r in line],
                        marker="o", label=f"batch {batch}, budget {budget}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("dense time / (scoring + sparse)")
    ax.axhline(1, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/kernels.png", dpi=110)
    plt.close(fig)

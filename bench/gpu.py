"""The GPU check of the kernels: correctness on the device, then timings, as one script.

    python -m bench.gpu --out gpu.json [--model-dir DIR]   # on a CUDA machine, under 5 minutes
    python -m bench.gpu --dry-run --out gpu.json           # anywhere: tiny shapes, Triton interpreter

Per kernel it checks the Triton output against the pure-torch reference on random cases
(fp32 and bf16), then times it against the reference and, for tree attention, against
torch's scaled_dot_product_attention with an explicit mask over already gathered K/V, at
SmolLM2's verify shapes and an 8B-class shape (32 heads, 8 KV heads, head dim 128). The
bandwidth floor of tree attention is the time to read its K/V once at the copy bandwidth
measured on the same device. With --model-dir (an HF-format SmolLM2 directory) it also times
batch-1 greedy decode of the engine against transformers' eager `generate`. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The interpreter must be chosen before any kernel is decorated, i.e. before kernels.triton.*.
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bench.decode import machine_info  # noqa: E402
from bench.kernel_cases import random_case, verify_case  # noqa: E402
from kernels.h2o import h2o_accumulate_reference  # noqa: E402
from kernels.paged_attention import gather_blocks, paged_attention_reference  # noqa: E402
from kernels.spec_sampling import chain_accept_reference  # noqa: E402

# (name, heads, kv_heads, head_dim, prefixes, tree nodes, batches)
ATTENTION_SHAPES = {
    "smollm2": (9, 3, 64, (512, 2048), (16, 64), (1, 8)),
    "8b": (32, 8, 128, (2048, 8192), (16, 64), (1, 4, 16)),
}
DRY_SHAPES = {"tiny": (4, 2, 16, (20,), (5,), (1, 2))}


def timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median seconds of fn() over iters calls, after warm-up (CUDA events on the GPU)."""
    for _ in range(min(3, iters)):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, dry: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = (1 << 20) if dry else (1 << 28)  # floats: 4 MiB or 1 GiB
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 3 if dry else 20)
    return 2 * src.numel() * src.element_size() / seconds


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def check_kernels(device: torch.device, cases: int) -> dict[str, Any]:
    from kernels.triton.h2o import h2o_accumulate_triton
    from kernels.triton.paged_attention import paged_attention_triton
    from kernels.triton.spec_sampling import chain_accept_triton

    out: dict[str, Any] = {}
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        worst = 0.0
        for seed in range(cases):
            c = random_case(seed, dtype)
            args = [t.to(device) for t in (c.q, c.k_cache, c.v_cache)]
            layout = type(c.layout)(
                **{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(c.layout).items()}
            )
            ref = paged_attention_reference(*(a.float() for a in args), layout)
            worst = max(worst, relative_error(paged_attention_triton(*args, layout), ref))
        name = str(dtype).removeprefix("torch.")
        out[f"tree_attention_{name}"] = {"cases": cases, "max_rel_error": worst, "ok": worst <= tolerance}
    mismatches = 0
    gen = torch.Generator().manual_seed(0)
    for seed in range(cases):
        B, N, V = 1 + seed % 4, seed % 7, (50, 5000)[seed % 2]
        p = (3 * torch.randn(B, N + 1, V, generator=gen)).softmax(-1)
        q = (3 * torch.randn(B, N, V, generator=gen)).softmax(-1)
        tok = (
            torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, N)
            if N
            else torch.zeros(B, 0).long()
        )
        args = [tok, torch.randint(0, N + 1, (B,), generator=gen), p, q, torch.rand(B, N, generator=gen),
                torch.rand(B, generator=gen)]  # fmt: skip
        ref = chain_accept_reference(*args)
        got = chain_accept_triton(*(a.to(device) for a in args))
        mismatches += int(not (torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])))
    out["fused_sampling"] = {"cases": cases, "mismatches": mismatches, "ok": mismatches == 0}
    worst = 0.0
    for seed in range(cases):
        attn = torch.randn(2, 8, 3, 100 + seed, generator=gen).softmax(-1)
        start = torch.rand(2, 4, 100 + seed, generator=gen)
        ref = h2o_accumulate_reference(start.clone(), attn)
        worst = max(worst, relative_error(h2o_accumulate_triton(start.to(device), attn.to(device)), ref))
    out["h2o_accumulate"] = {"cases": cases, "max_rel_error": worst, "ok": worst <= 1e-5}
    return out


def time_attention(device: torch.device, shapes: dict, bandwidth: float, iters: int) -> list[dict[str, Any]]:
    from kernels.triton.paged_attention import paged_attention_triton

    rows = []
    for name, (heads, kv_heads, dim, prefixes, node_counts, batches) in shapes.items():
        for prefix in prefixes:
            for nodes in node_counts:
                for batch in batches:
                    c = verify_case(batch, heads, kv_heads, dim, prefix, nodes, torch.bfloat16, str(device))
                    k, v = gather_blocks(c.k_cache, c.layout), gather_blocks(c.v_cache, c.layout)
                    mask = c.layout.dense_mask()

                    def sdpa(k=k, v=v, mask=mask, c=c) -> torch.Tensor:
                        return torch.nn.functional.scaled_dot_product_attention(
                            c.q, k, v, attn_mask=mask, enable_gqa=True
                        )

                    kernel_s = timed(
                        lambda c=c: paged_attention_triton(c.q, c.k_cache, c.v_cache, c.layout), device, iters
                    )
                    ref_s = timed(
                        lambda c=c: paged_attention_reference(c.q, c.k_cache, c.v_cache, c.layout),
                        device,
                        iters,
                    )
                    sdpa_s = timed(sdpa, device, iters)
                    kv_bytes = 2 * k.numel() * k.element_size()
                    rows.append({
                        "shape": name, "batch": batch, "prefix": prefix, "nodes": nodes, "dtype": "bfloat16",
                        "triton_s": kernel_s, "reference_s": ref_s, "sdpa_masked_s": sdpa_s,
                        "speedup_vs_sdpa": sdpa_s / kernel_s, "speedup_vs_reference": ref_s / kernel_s,
                        "bandwidth_floor_fraction": kv_bytes / bandwidth / kernel_s,
                    })  # fmt: skip
    return rows


def time_small_kernels(device: torch.device, dry: bool, iters: int) -> list[dict[str, Any]]:
    from kernels.triton.h2o import h2o_accumulate_triton
    from kernels.triton.spec_sampling import chain_accept_triton

    rows = []
    V = 64 if dry else 49152  # SmolLM2's vocabulary
    for B in (1, 2) if dry else (1, 16):
        N = 4 if dry else 8
        p = torch.rand(B, N + 1, V, device=device).softmax(-1)
        q = torch.rand(B, N, V, device=device).softmax(-1)
        args = (torch.randint(0, V, (B, N), device=device), torch.full((B,), N, device=device), p, q,
                torch.rand(B, N, device=device), torch.rand(B, device=device))  # fmt: skip
        t = timed(lambda a=args: chain_accept_triton(*a), device, iters)
        r = timed(lambda a=args: chain_accept_reference(*a), device, iters)
        rows.append({"kernel": "fused_sampling", "batch": B, "drafted": N, "vocab": V, "triton_s": t,
                     "reference_s": r, "speedup_vs_reference": r / t})  # fmt: skip
    K = 40 if dry else 8192
    attn = torch.rand(1, 32, 1, K, device=device).softmax(-1)
    scores = torch.zeros(1, 8, K, device=device)
    t = timed(lambda: h2o_accumulate_triton(scores, attn), device, iters)
    r = timed(lambda: h2o_accumulate_reference(scores, attn), device, iters)
    rows.append(
        {
            "kernel": "h2o_accumulate",
            "keys": K,
            "triton_s": t,
            "reference_s": r,
            "speedup_vs_reference": r / t,
        }
    )
    return rows


def time_decode(model_dir: Path, device: torch.device, tokens: int) -> dict[str, Any]:
    """Batch-1 greedy decode: the engine vs transformers' eager generate, same weights, same GPU."""
    import transformers

    from services.core.engine import Engine

    prompt = list(range(100, 132))
    engine = Engine.from_dir(model_dir, device=device)
    seq = engine.new_sequence()

    def engine_decode() -> None:
        seq.truncate(0)
        logits = engine.prefill(seq, prompt)
        for _ in range(tokens):
            logits = engine.decode(seq, int(logits.argmax()))

    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        .to(device)
        .eval()
    )
    ids = torch.tensor([prompt], device=device)

    def hf_generate() -> None:
        hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    engine_s, hf_s = timed(engine_decode, device, 3), timed(hf_generate, device, 3)
    return {
        "tokens": tokens,
        "engine_tokens_per_s": tokens / engine_s,
        "transformers_tokens_per_s": tokens / hf_s,
        "speedup_vs_transformers": hf_s / engine_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu.json"), help="JSON result (default: %(default)s)")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter"
    )
    ap.add_argument("--model-dir", type=Path, help="HF-format SmolLM2 directory: also time batch-1 decode")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        ap.error("no CUDA device: run with --dry-run to exercise the script on CPU")
    dry = args.dry_run
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(torch.get_num_threads()), "dry_run": dry}
    if device.type == "cuda":
        result["machine"]["device"] = torch.cuda.get_device_name(device)
    result["correctness"] = check_kernels(device, 5 if dry else 50)
    bandwidth = copy_bandwidth(device, dry)
    result["copy_bandwidth_bytes_per_s"] = bandwidth
    iters = 1 if dry else 20
    result["tree_attention"] = time_attention(
        device, DRY_SHAPES if dry else ATTENTION_SHAPES, bandwidth, iters
    )
    result["small_kernels"] = time_small_kernels(device, dry, iters)
    if args.model_dir is not None:
        result["decode"] = time_decode(args.model_dir, device, 8 if dry else 128)
    result["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'check':<26}{'ok':>6}")
    for name, r in result["correctness"].items():
        print(f"{name:<26}{str(r['ok']):>6}")
    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = ("shape", "B", "prefix", "nodes", "triton ms", "sdpa ms", "x sdpa", "floor")
    print(f"{header[0]:<8}" + "".join(f"{h:>10}" for h in header[1:]))
    for r in result["tree_attention"]:
        cells = (
            r["batch"],
            r["prefix"],
            r["nodes"],
            f"{r['triton_s'] * 1e3:.3f}",
            f"{r['sdpa_masked_s'] * 1e3:.3f}",
        )
        cells += (f"{r['speedup_vs_sdpa']:.2f}", f"{r['bandwidth_floor_fraction']:.1%}")
        print(f"{r['shape']:<8}" + "".join(f"{c:>10}" for c in cells))
    for r in result["small_kernels"]:
        print(
            f"{r['kernel']:<16} triton {r['triton_s'] * 1e6:9.1f} us"
            f"  x{r['speedup_vs_reference']:.2f} vs reference"
        )
    if "decode" in result:
        d = result["decode"]
        print(
            f"decode: engine {d['engine_tokens_per_s']:.1f} tok/s, transformers "
            f"{d['transformers_tokens_per_s']:.1f} tok/s, x{d['speedup_vs_transformers']:.2f}"
        )
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0 if all(r["ok"] for r in result["correctness"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Greedy decode throughput: our engine vs transformers' LlamaForCausalLM.generate, same process.

Both sides load the same weights (the HF-format model directory), see the same chat-templated
prompts, use the same torch thread count and must produce exactly `max_new_tokens` tokens:
ours through `services.core.generation.generate` with `ignore_eos`, transformers with
`do_sample=False, max_new_tokens=N, min_new_tokens=N` and no EOS id (so neither side stops early
nor masks EOS: with an EOS id set, transformers' min-length processor would forbid EOS as the
greedy choice while ours emits it, and the token streams would differ for a reason unrelated
to the engines). Runs are interleaved per prompt, alternating which engine goes first, after a
warm-up of both. Results are ratios measured in one run (DESIGN section 7); nothing here is a
test assertion.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS: list[str] = [
    "Write a short poem about the sea at night.",
    "Explain in simple terms how a hash table works.",
    "def fibonacci(n):\n    # Complete this Python function and explain its complexity.",
    "What is 17 * 23? Show your work step by step.",
    "Translate to French: 'The weather is lovely today, let us go for a walk.'",
    "List five tips for writing clear technical documentation.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Résumé en une phrase: pourquoi le ciel est-il bleu? 🌍",
]

SCHEMA_VERSION = 1


@dataclass
class Run:
    """One timed generation of one prompt by one engine."""

    engine: str
    prompt_index: int
    repeat: int
    prompt_tokens: int
    tokens: list[int]
    ttft_s: float  # prompt in -> first generated token available (prefill + first pick)
    total_s: float  # prompt in -> last generated token available
    order: int  # 0 = this engine ran first for this prompt/repeat

    @property
    def decode_s(self) -> float:
        return self.total_s - self.ttft_s


@dataclass
class EngineStats:
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n_tokens = sum(len(r.tokens) for r in self.runs)
        n_decode = sum(len(r.tokens) - 1 for r in self.runs)
        wall = sum(r.total_s for r in self.runs)
        decode = sum(r.decode_s for r in self.runs)
        ttfts = [r.ttft_s for r in self.runs]
        return {
            "runs": len(self.runs),
            "prompt_tokens": sum(r.prompt_tokens for r in self.runs),
            "total_tokens": n_tokens,
            "wall_s": wall,
            "decode_tokens": n_decode,
            "decode_s": decode,
            "tokens_per_s_decode": n_decode / decode if decode > 0 else None,
            "tokens_per_s_end_to_end": n_tokens / wall if wall > 0 else None,
            "ttft_s_mean": statistics.fmean(ttfts) if ttfts else None,
            "ttft_s_median": statistics.median(ttfts) if ttfts else None,
            # The fastest repeat of each prompt: the least disturbed by other load on the machine.
            "tokens_per_s_decode_best": self.best_decode_rate(),
        }

    def best_decode_rate(self) -> float | None:
        best: dict[int, Run] = {}
        for r in self.runs:
            if r.prompt_index not in best or r.decode_s < best[r.prompt_index].decode_s:
                best[r.prompt_index] = r
        seconds = sum(r.decode_s for r in best.values())
        return sum(len(r.tokens) - 1 for r in best.values()) / seconds if seconds > 0 else None


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": "cpu",
        # 1-minute load average: other processes on the machine skew wall-clock numbers.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def load_prompts_file(path: str | Path) -> list[str]:
    """JSONL: each line a JSON string or an object with a "prompt" (or "text") field."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(item, dict):
            item = item.get("prompt", item.get("text"))
        if not isinstance(item, str) or not item:
            raise ValueError(
                f'{path}:{n}: expected a JSON string or {{"prompt": "..."}} with a non-empty prompt'
            )
        prompts.append(item)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class _TimingStreamer:
    """transformers streamer that timestamps each put(); the first put is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _run_ours(
    engine: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], float, float]:
    from services.core.generation import generate
    from services.core.params import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=0)
    seq = engine.new_sequence()
    tokens: list[int] = []
    ttft = None
    try:
        t0 = time.perf_counter()
        for step in generate(engine, tokenizer, seq, prompt_ids, params):
            tokens.extend(step.token_ids)
            if ttft is None and tokens:
                ttft = time.perf_counter() - t0
        total = time.perf_counter() - t0
    finally:
        seq.release()
    return tokens, ttft if ttft is not None else total, total


def _run_hf(
    hf: Any, prompt_ids: list[int], max_new_tokens: int, gen_config: Any
) -> tuple[list[int], float, float]:
    import torch

    x = torch.tensor([prompt_ids])
    streamer = _TimingStreamer()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            generation_config=gen_config,
            streamer=streamer,
        )
        total = time.perf_counter() - t0
    tokens = out[0, len(prompt_ids) :].tolist()
    # times[0] is the prompt put(); times[1] the first generated token.
    ttft = streamer.times[1] - t0 if len(streamer.times) > 1 else total
    return tokens, ttft, total


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _write_png(result: dict[str, Any], path: Path) -> str | None:
    """Bar chart next to the JSON; returns a note when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); PNG skipped"
    ours, hf = result["engines"]["specmesh"], result["engines"]["transformers"]
    per = result["per_prompt"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    idx = list(range(len(per)))
    w = 0.4
    ax1.bar([i - w / 2 for i in idx], [p["specmesh_tokens_per_s_decode"] for p in per], w, label="specmesh")
    ax1.bar(
        [i + w / 2 for i in idx],
        [p["transformers_tokens_per_s_decode"] for p in per],
        w,
        label="transformers",
    )
    ax1.set_xticks(idx, [f"p{i}" for i in idx])
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title(f"per prompt (max_new_tokens={result['config']['max_new_tokens']})")
    ax1.legend()
    kinds = ["decode", "end_to_end"]
    ax2.bar([k - w / 2 for k in range(2)], [ours[f"tokens_per_s_{k}"] for k in kinds], w, label="specmesh")
    ax2.bar([k + w / 2 for k in range(2)], [hf[f"tokens_per_s_{k}"] for k in kinds], w, label="transformers")
    ax2.set_xticks(range(2), ["decode", "end-to-end"])
    median = result["speedup_vs_hf_median_pair"]
    ax2.set_title(
        f"overall: {result['speedup_vs_hf']:.2f}x decode"
        + (f" (median {median:.2f}x)" if median is not None else "")
    )
    m, cfg = result["machine"], result["config"]
    fig.suptitle(
        f"{cfg['model']} greedy decode, CPU x{m['torch_threads']} threads, "
        f"torch {m['torch']}, transformers {m['transformers']} ({cfg['hf_attn_implementation']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def format_summary(result: dict[str, Any]) -> str:
    rows = [("engine", "tokens", "wall s", "decode tok/s", "e2e tok/s", "TTFT ms")]
    for name, s in result["engines"].items():
        rows.append(
            (
                name,
                str(s["total_tokens"]),
                f"{s['wall_s']:.2f}",
                f"{s['tokens_per_s_decode']:.1f}",
                f"{s['tokens_per_s_end_to_end']:.1f}",
                f"{1000 * s['ttft_s_mean']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    median = result["speedup_vs_hf_median_pair"]
    lines.append(
        f"speedup vs transformers: {result['speedup_vs_hf']:.2f}x decode, "
        f"{result['speedup_vs_hf_end_to_end']:.2f}x end-to-end"
        + (f", {median:.2f}x median per prompt" if median is not None else "")
        + (
            f", {result['speedup_vs_hf_best_of_repeats']:.2f}x best of {result['config']['repeats']} repeats"
            if result["config"]["repeats"] > 1
            else ""
        )
    )
    llama = result.get("llama_cpp", {})
    if llama.get("available"):
        lines.append(
            f"llama.cpp llama-bench (same GGUF, {llama.get('n_threads')} threads): "
            f"{llama['tokens_per_s_decode']:.1f} tok/s decode (tg{llama['decode_tokens']}), "
            f"{llama.get('tokens_per_s_prefill', float('nan')):.0f} tok/s prefill; ours / llama.cpp "
            f"{result['speedup_vs_llama_cpp']:.2f}x"
        )
    elif llama:
        lines.append(f"llama.cpp baseline: not measured ({llama['why']})")
    m = result["machine"]
    if m.get("load_average_1m") is not None:
        lines.append(
            f"machine: {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, 1-min load average "
            f"{m['load_average_1m_at_start']:.2f} at start, {m['load_average_1m']:.2f} at end"
        )
    lines.append(
        f"greedy identical: {result['greedy_identical']}"
        + ("" if result["greedy_identical"] else f" (mismatches: {result['mismatches']})")
    )
    return "\n".join(lines)


def run_decode_bench(
    model: str,
    prompts: list[str] | None,
    max_new_tokens: int,
    repeats: int,
    out: Path,
    threads: int | None,
    *,
    hf_attn_implementation: str = "sdpa",
    progress: bool = True,
    png: bool = True,
    weights: str = "fp32",
    llama_bench: str | None = "auto",
    gguf: Path | None = None,
) -> dict[str, Any]:
    """Measure greedy decode tokens/s of our engine and of transformers; write JSON (+ PNG) to `out`.

    prompts: user messages (chat template applied), default DEFAULT_PROMPTS. threads: torch
    intra-op threads for the run (restored afterwards), default torch's current setting.
    weights: our engine's weights configuration, fp32 or q4_1 (services.core.quant); the
    transformers baseline is always the fp32 checkpoint. llama_bench: llama.cpp's llama-bench
    binary for its native decode on the model's source GGUF (`gguf`, default: found and checked by
    sha256) as a third baseline (bench.llama_cpp); "auto" finds one if built, None skips it.
    Returns the result dict that is also written to `out`.
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts")
    if llama_bench not in (None, "auto") and not (
        Path(llama_bench).is_file() and os.access(llama_bench, os.X_OK)
    ):
        from bench.llama_cpp import BUILD_HINT

        raise ValueError(f"llama-bench {llama_bench}: not an executable file ({BUILD_HINT})")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = _bench(
            model, prompts, max_new_tokens, repeats, Path(out), hf_attn_implementation, progress, png, weights
        )
    finally:
        torch.set_num_threads(previous_threads)
    result["llama_cpp"] = _llama_cpp_baseline(
        llama_bench,
        gguf,
        Path(result["config"]["model_dir"]),
        result["machine"]["torch_threads"],
        max_new_tokens,
    )
    if "tokens_per_s_decode" in result["llama_cpp"]:
        ours = result["engines"]["specmesh"]["tokens_per_s_decode"]
        result["speedup_vs_llama_cpp"] = ours / result["llama_cpp"]["tokens_per_s_decode"]
    Path(out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _llama_cpp_baseline(
    binary: str | None, gguf: Path | None, model_dir: Path, threads: int, n_gen: int
) -> dict[str, Any]:
    """llama.cpp's decode on the same GGUF and threads, or {"available": False, "why": ...}."""
    from bench import llama_cpp

    if binary is None:
        return {"available": False, "why": "skipped (--no-llama-bench)"}
    found = llama_cpp.find_llama_bench() if binary == "auto" else binary  # checked before the runs
    if found is None:
        return {"available": False, "why": f"no llama-bench: {llama_cpp.BUILD_HINT}"}
    path, note = llama_cpp.source_gguf(model_dir, gguf)
    if path is None:
        return {"available": False, "why": note}
    measured = llama_cpp.run_llama_bench(found, path, threads, n_gen=n_gen)
    return {"available": True, "binary": found, "gguf": str(path), "gguf_note": note} | measured


def _bench(
    model: str,
    prompts: list[str],
    max_new_tokens: int,
    repeats: int,
    out: Path,
    hf_attn_implementation: str,
    progress: bool,
    png: bool,
    weights: str,
) -> dict[str, Any]:
    import torch
    import transformers
    from tqdm import tqdm

    from kernels.linear_choice import CACHE_FILE
    from services.core.engine import Engine
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer

    threads_used = torch.get_num_threads()

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model_dir = resolve_model(model)
    engine = Engine.from_dir(model_dir)
    if weights == "q4_1" and not engine.use_q4_weights(model_dir):
        raise RuntimeError("weights q4_1 need torch's CPU int4 kernel, which this torch build lacks")
    # As the services run it: packed weight copies, matmul paths measured on this machine.
    engine.pack_weights()
    engine.choose_linear_paths(Path(model_dir) / CACHE_FILE)
    tokenizer = Tokenizer.from_dir(model_dir)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    hf = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=hf_attn_implementation
    ).eval()
    # No EOS on the HF side (see the module docstring); min_new_tokens is then a no-op kept for clarity.
    hf.generation_config.eos_token_id = None
    gen_config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        use_cache=True,
    )
    attn_impl = hf.config._attn_implementation

    prompt_ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    limit = engine.max_context
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i}: {len(ids)} + {max_new_tokens} tokens exceed the context of {limit}"
            )

    # Warm-up: both engines, a short run each (first-call allocations, thread pools, rope tables).
    warm = min(max_new_tokens, 8)
    _run_ours(engine, tokenizer, prompt_ids[0], warm)
    warm_config = copy.deepcopy(gen_config)
    warm_config.max_new_tokens = warm_config.min_new_tokens = warm
    _run_hf(hf, prompt_ids[0], warm, warm_config)

    stats = {"specmesh": EngineStats(), "transformers": EngineStats()}
    bar = tqdm(total=len(prompts) * repeats, desc="decode bench", unit="prompt", disable=not progress)
    for i, ids in enumerate(prompt_ids):
        for r in range(repeats):
            order = ["specmesh", "transformers"] if (i + r) % 2 == 0 else ["transformers", "specmesh"]
            for pos, name in enumerate(order):
                gc.collect()
                if name == "specmesh":
                    toks, ttft, total = _run_ours(engine, tokenizer, ids, max_new_tokens)
                else:
                    toks, ttft, total = _run_hf(hf, ids, max_new_tokens, gen_config)
                stats[name].runs.append(Run(name, i, r, len(ids), toks, ttft, total, pos))
            bar.update(1)
    bar.close()

    per_prompt = []
    mismatches = []
    for i, ids in enumerate(prompt_ids):
        mine = [x for x in stats["specmesh"].runs if x.prompt_index == i]
        theirs = [x for x in stats["transformers"].runs if x.prompt_index == i]
        ref = mine[0].tokens
        deterministic = all(x.tokens == ref for x in mine) and all(
            x.tokens == theirs[0].tokens for x in theirs
        )
        diff = _first_diff(ref, theirs[0].tokens)
        if diff is not None:
            mismatches.append(
                {
                    "prompt_index": i,
                    "first_diff_index": diff,
                    "specmesh_token": ref[diff] if diff < len(ref) else None,
                    "transformers_token": theirs[0].tokens[diff] if diff < len(theirs[0].tokens) else None,
                }
            )

        def rate(runs: list[Run]) -> float | None:
            d = sum(x.decode_s for x in runs)
            return sum(len(x.tokens) - 1 for x in runs) / d if d > 0 else None

        per_prompt.append(
            {
                "prompt_index": i,
                "prompt": prompts[i],
                "prompt_tokens": len(ids),
                "generated_tokens": len(ref),
                "specmesh_tokens_per_s_decode": rate(mine),
                "transformers_tokens_per_s_decode": rate(theirs),
                "specmesh_ttft_s": statistics.fmean(x.ttft_s for x in mine),
                "transformers_ttft_s": statistics.fmean(x.ttft_s for x in theirs),
                "greedy_identical": diff is None,
                "deterministic_across_repeats": deterministic,
                "text": tokenizer.decode(ref),
            }
        )

    ours, base = stats["specmesh"].summary(), stats["transformers"].summary()
    # Per (prompt, repeat) pair: robust to bursts of load from other processes, which hit
    # whichever engine happens to be running and dominate the totals on a shared machine.
    pair_ratios = []
    for a, b in zip(stats["specmesh"].runs, stats["transformers"].runs, strict=True):
        if a.decode_s > 0 and b.decode_s > 0 and len(a.tokens) > 1:
            pair_ratios.append(((len(a.tokens) - 1) / a.decode_s) / ((len(b.tokens) - 1) / b.decode_s))
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "decode",
        "config": {
            "model": model,
            "model_dir": str(model_dir),
            "weights_digest": engine.digest,
            "dtype": "float32",
            "max_new_tokens": max_new_tokens,
            "repeats": repeats,
            "num_prompts": len(prompts),
            "prompt_format": "chat template, one user message, generation prompt appended",
            "hf_attn_implementation": attn_impl,
            "hf_generate": {
                "do_sample": False,
                "max_new_tokens": max_new_tokens,
                "min_new_tokens": max_new_tokens,
                "eos_token_id": None,
                "mode": "eager (no torch.compile)",
            },
            "ours_generate": "services.core.generation.generate, greedy, ignore_eos",
            "ours_weights": engine.weights,
            "ours_packed_weights": engine.packed_bytes > 0,
            "ours_linear_paths": engine.linear_choice,
            "interleaving": "per prompt and repeat, engine order alternates; one warm-up run of each first",
        },
        "machine": machine_info(threads_used) | {"load_average_1m_at_start": load_before},
        "engines": {"specmesh": ours, "transformers": base},
        "speedup_vs_hf": ours["tokens_per_s_decode"] / base["tokens_per_s_decode"],
        "speedup_vs_hf_end_to_end": ours["tokens_per_s_end_to_end"] / base["tokens_per_s_end_to_end"],
        "speedup_vs_hf_median_pair": statistics.median(pair_ratios) if pair_ratios else None,
        "speedup_vs_hf_best_of_repeats": ours["tokens_per_s_decode_best"] / base["tokens_per_s_decode_best"],
        "greedy_identical": not mismatches,
        "mismatches": mismatches,
        "per_prompt": per_prompt,
        "runs": [
            {k: v for k, v in asdict(x).items() if k != "tokens"} | {"decode_s": x.decode_s}
            for s in stats.values()
            for x in s.runs
        ],
        "json": str(out),
        "png": None,
        "png_note": None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if png:
        png_path = out.with_suffix(".png")
        note = _write_png(result, png_path)
        result["png"], result["png_note"] = (None, note) if note else (str(png_path), None)
    else:
        result["png_note"] = "PNG disabled"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result

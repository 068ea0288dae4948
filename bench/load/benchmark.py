"""`specmesh bench load`: closed-loop streaming load through the real stack, with and without
dynamic batching in the same run.

For each batching mode the local stack (target, draft, gateway as processes, no Redis) starts
with ``SPECMESH_BATCHING`` set accordingly, serves a warm-up (a few requests one at a time, then
one request on each of --concurrency streams at once), and then runs each concurrency
level (1, 8, ..., --concurrency) for --duration seconds: every worker streams one greedy
request after another, prompts of mixed lengths (short chat questions, code, and three of them
joined into one long prompt) and policies alternating between `target` and `speculative`.
Reported per level: errors, p50/p99 time to first token and per output token, aggregate
tokens/s; per mode: ``throughput_gain_8_vs_1`` and the services' resident memory after the
warm-up and at the end. The warm-up ends at the highest concurrency because the KV pool is
preallocated as virtual memory: the pages that many sessions at once touch become resident once
and stay, and memory growth past that point (a leak) is what the end-of-run figure checks. A
level is a fixed window: streams still open when it ends are cut off
(cancelled, counted as cut_at_end, their tokens so far counted), so every level costs the same
time whatever the per-stream latency.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.load.config import MODES, LoadBenchConfig
from bench.load.driver import make_request, run_level
from bench.load.stats import Stream, gain, summarize_level

SERVICES = ("target", "draft", "gateway")


def mixed_prompts(cfg: LoadBenchConfig, tokenizer) -> list[list[int]]:
    """Token ids of the prompt files' prompts plus long ones (three prompts joined per chat turn)."""
    from bench.spec.prompts import encode_prompts, load_prompt_sets

    sets = load_prompt_sets(list(cfg.prompt_files), None)
    prompts = list(encode_prompts(sets, tokenizer).values())
    texts = [item.prompt for ps in sets for item in ps.items]
    for i in range(0, len(texts) - 2, 3):
        joined = "\n\n".join(texts[i : i + 3]) + "\n\nAnswer all three questions above."
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": joined}]))
    return prompts


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def stack_rss(stack) -> dict[str, float | None]:
    return {c.name: rss_mib(c.proc.pid) for c in stack.children if c.name in SERVICES and c.proc}


def _progress(total: float, label: str):
    from tqdm import tqdm

    return tqdm(total=round(total), desc=label, unit="s", file=sys.stderr, leave=False)


def run_mode(cfg: LoadBenchConfig, batching: bool, prompts: list[list[int]], log: io.TextIOBase) -> dict:
    from specmesh.stack import LocalStack, LogSink, StackConfig

    env = {"SPECMESH_BATCHING": "true" if batching else "false", "OTEL_TRACES_EXPORTER": "none"}
    env["OTEL_METRICS_EXPORTER"] = "none"
    config = StackConfig(
        model=cfg.target_model,
        draft_model=cfg.draft_model,
        gateway_port=0,
        redis=False,
        target_threads=cfg.target_threads,
        draft_threads=cfg.draft_threads,
        env=env,
    )
    stack = LocalStack(config, LogSink(log, color=False))
    mode = "batching" if batching else "no-batching"
    print(f"[{mode}] starting the stack ...", file=sys.stderr, flush=True)
    stack.start()
    try:
        policies, counter = cfg.policies, itertools.count()

        def request() -> tuple[Any, str]:
            i = next(counter)
            policy = policies[i % len(policies)]
            return make_request(prompts[i % len(prompts)], policy, cfg.max_new_tokens, seed=i), policy

        warm: list[Stream] = []
        for _ in range(cfg.warmup_requests * len(policies)):  # one request at a time
            warm += asyncio.run(run_level(stack.gateway, 1, None, request, cfg.timeout_s))[0]
        rss_sequential = stack_rss(stack)
        print(f"[{mode}] warm-up: {cfg.concurrency} streams at once ...", file=sys.stderr, flush=True)
        warm += asyncio.run(run_level(stack.gateway, cfg.concurrency, None, request, cfg.timeout_s))[0]
        rss_warm = stack_rss(stack)
        levels = []
        for concurrency in cfg.levels:
            bar = _progress(cfg.duration_s, f"[{mode}] {concurrency} streams")
            started = time.perf_counter()

            def tick(_: Stream, bar=bar, started=started) -> None:
                bar.n = min(bar.total, round(time.perf_counter() - started))
                bar.refresh()

            streams, elapsed = asyncio.run(
                run_level(stack.gateway, concurrency, cfg.duration_s, request, cfg.timeout_s, tick)
            )
            bar.n = bar.total
            bar.close()
            level = summarize_level(concurrency, streams, elapsed)
            level["rss_mib"] = stack_rss(stack)  # where any growth happened
            levels.append(level)
            print(_level_line(mode, level), file=sys.stderr, flush=True)
        rss_end = stack_rss(stack)
    finally:
        stack.stop()
    return {
        "batching": batching,
        "warmup": {"requests": len(warm), "errors": sum(s.error is not None for s in warm)},
        "levels": levels,
        "errors": sum(lv["errors"] for lv in levels),
        "throughput_gain_8_vs_1": gain(levels, 8),
        f"throughput_gain_{cfg.levels[-1]}_vs_1": gain(levels, cfg.levels[-1]),
        "rss_mib_after_sequential_warmup": rss_sequential,
        "rss_mib_after_warmup": rss_warm,
        "rss_mib_end": rss_end,
        "rss_growth": {
            k: round(rss_end[k] / rss_warm[k] - 1, 4) if rss_warm.get(k) and rss_end.get(k) else None
            for k in rss_warm
        },
    }


def _level_line(mode: str, lv: dict) -> str:
    return (
        f"[{mode}] {lv['concurrency']:>3} streams: {lv['tokens_per_s']} tok/s, {lv['requests']} requests, "
        f"{lv['errors']} errors, TTFT p50/p99 {lv['ttft_ms']['p50']}/{lv['ttft_ms']['p99']} ms, "
        f"per token p50/p99 {lv['per_token_ms']['p50']}/{lv['per_token_ms']['p99']} ms"
    )


def run_load_bench(cfg: LoadBenchConfig) -> dict[str, Any]:
    from bench.decode import machine_info
    from bench.spec.provenance import git_info, loadavg, torch_threads
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer

    load_start, commit = loadavg(), git_info()
    prompts = mixed_prompts(cfg, Tokenizer.from_dir(Path(resolve_model(cfg.target_model))))
    log_path = Path(cfg.out).with_suffix(".stack.log")
    modes: dict[str, Any] = {}
    with open(log_path, "w", encoding="utf-8") as log:
        for batching in MODES[cfg.batching]:
            modes["batching" if batching else "no_batching"] = run_mode(cfg, batching, prompts, log)
    lengths = sorted(len(p) for p in prompts)
    result = {
        "benchmark": "load",
        "config": {
            "levels": list(cfg.levels),
            "duration_s": cfg.duration_s,
            "max_new_tokens": cfg.max_new_tokens,
            "policies": list(cfg.policies),
            "prompt_files": [str(p) for p in cfg.prompt_files],
            "prompts": len(prompts),
            "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
            "target_model": cfg.target_model,
            "draft_model": cfg.draft_model,
        },
        "modes": modes,
        "machine": machine_info(torch_threads() or 0)
        | {"loadavg_start": load_start, "loadavg_end": loadavg(), **commit},
        "stack_log": str(log_path),
    }
    if "batching" in modes and "no_batching" in modes:
        result["batching_vs_no_batching"] = {
            str(a["concurrency"]): round(a["tokens_per_s"] / b["tokens_per_s"], 3)
            if b["tokens_per_s"]
            else None
            for a, b in zip(modes["batching"]["levels"], modes["no_batching"]["levels"], strict=True)
        }
    out = Path(cfg.out)
    note = write_png(result, out.with_suffix(".png"))
    result["png"] = None if note else str(out.with_suffix(".png"))
    result["png_note"] = note
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"load benchmark on {result['machine'].get('cpu_model')} (levels {result['config']['levels']})"]
    for name, mode in result["modes"].items():
        lines.append(
            f"{name}: throughput_gain_8_vs_1 {mode['throughput_gain_8_vs_1']}, errors {mode['errors']}, "
            f"RSS after warm-up {mode['rss_mib_after_warmup']} MiB, at the end {mode['rss_mib_end']} MiB"
        )
        lines += ["  " + _level_line(name, lv) for lv in mode["levels"]]
    if "batching_vs_no_batching" in result:
        lines.append(f"batching / no batching tokens/s per level: {result['batching_vs_no_batching']}")
    return "\n".join(lines)


def write_png(result: dict[str, Any], path: Path) -> str | None:
    """Aggregate tokens/s and p50 per-token latency per level, one line per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); PNG skipped"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, mode in result["modes"].items():
        xs = [lv["concurrency"] for lv in mode["levels"]]
        ax1.plot(xs, [lv["tokens_per_s"] or 0 for lv in mode["levels"]], marker="o", label=name)
        ax2.plot(xs, [lv["per_token_ms"]["p50"] or 0 for lv in mode["levels"]], marker="o", label=name)
    for ax, title in ((ax1, "aggregate tokens/s"), (ax2, "p50 time per output token, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"bench load on {result['machine'].get('cpu_model')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None

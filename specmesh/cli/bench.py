"""`specmesh bench ...`: benchmarks that print a summary and write JSON (+ PNG).

Subcommands:
  decode   greedy decode tokens/s of our engine vs transformers, same process, same weights
  spec     speculative decoding vs the target alone (specmesh/cli/bench_spec.py, when present)
  kv       KV prefix reuse through Redis: TTFT cold / memory / Redis, bytes/s, chat (bench_kv.py)
  h2o      target perplexity under H2O KV budgets vs the full cache, on real texts
  image    image decoding methods (ar, exact_sd, lantern, gsd): speed, accuracy, Frechet distance
  load     concurrent streams through the gateway, with and without batching (specmesh/cli/bench_load.py)
  route    token routing (policy r2r) vs target, draft and speculative (specmesh/cli/bench_route.py)
  attribute  ReAGent vs gradient x input vs random attribution (specmesh/cli/bench_attribute.py)
  detect   machine-text detectors: AUROC, TPR at 1% FPR, batching throughput (specmesh/cli/bench_detect.py)
  membership  Min-K%, Min-K%++, DC-PDD on a model with known training data (bench_membership.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark (decode) and write JSON + PNG",
        description="Benchmarks. Each prints a summary table and writes JSON (and a PNG chart next to it "
        "when matplotlib is installed). Numbers are ratios against a baseline measured in the same run.",
    )
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    _add_decode(bench_sub)
    _add_h2o(bench_sub)
    try:  # `bench spec` lives in its own module
        from specmesh.cli.bench_spec import add_spec_parser
    except ModuleNotFoundError as e:
        if e.name != "specmesh.cli.bench_spec":
            raise
    else:
        add_spec_parser(bench_sub)
    from specmesh.cli.bench_kv import add_kv_parser

    add_kv_parser(bench_sub)
    from specmesh.cli import bench_image
    from specmesh.cli.bench_attribute import add_attribute_parser
    from specmesh.cli.bench_detect import add_detect_parser
    from specmesh.cli.bench_load import add_load_parser
    from specmesh.cli.bench_membership import add_membership_parser
    from specmesh.cli.bench_route import add_route_parser

    bench_image.add_parser(bench_sub)
    add_load_parser(bench_sub)
    add_route_parser(bench_sub)
    add_attribute_parser(bench_sub)
    add_detect_parser(bench_sub)
    add_membership_parser(bench_sub)


def _add_decode(bench_sub: argparse._SubParsersAction) -> None:
    d = bench_sub.add_parser(
        "decode",
        help="greedy decode tokens/s: specmesh engine vs transformers LlamaForCausalLM.generate",
        description="Greedy decode throughput of the specmesh engine against transformers' "
        "LlamaForCausalLM.generate (eager, no torch.compile) on the same weights and chat-templated "
        "prompts, in one process with the same torch thread count. Runs are interleaved per prompt "
        "after a warm-up; both sides generate exactly --max-new-tokens tokens (EOS does not stop "
        "either). Reports decode-only and end-to-end tokens/s, time to first token, the speedup and "
        "whether the greedy tokens are identical (exit status 1 if they are not).",
        epilog="Example: specmesh bench decode --model smollm2-135m-instruct --out decode.json",
    )
    d.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model name in the model store or a path to an HF-format model directory (default: %(default)s)",
    )
    d.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    d.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default: %(default)s)"
    )
    d.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each prompt per engine (default: %(default)s)"
    )
    d.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads for both engines (default: torch's)"
    )
    d.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help='prompts, one per line: a JSON string or {"prompt": "..."} (default: 8 built-in prompts)',
    )
    d.add_argument(
        "--hf-attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="transformers attention implementation (default: %(default)s)",
    )
    d.add_argument(
        "--weights",
        choices=("fp32", "q4_1"),
        default="fp32",
        help="our engine's weights: fp32, or q4_1 (the GGUF's 4-bit groups, bf16 activations; its "
        "greedy output is reported against transformers' fp32, not required to equal it) "
        "(default: %(default)s)",
    )
    llama = d.add_mutually_exclusive_group()
    llama.add_argument(
        "--llama-bench",
        metavar="PATH",
        default="auto",
        help="llama.cpp's llama-bench, run on the model's source GGUF with the same threads as a "
        "baseline (default: $SPECMESH_LLAMA_BENCH, ~/.cache/specmesh/tools/llama.cpp/llama-bench or "
        "PATH, if any; build it with bench/tools/build_llama_bench.sh)",
    )
    llama.add_argument(
        "--no-llama-bench", dest="llama_bench", action="store_const", const=None, help="skip llama.cpp"
    )
    d.add_argument(
        "--gguf", type=Path, default=None, help="GGUF for llama-bench (default: the model's source)"
    )
    d.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=run_decode)


def _add_h2o(bench_sub: argparse._SubParsersAction) -> None:
    h = bench_sub.add_parser(
        "h2o",
        help="target perplexity under H2O KV budgets (100/50/20/10%%) on real texts",
        description="Teacher-forced perplexity of the target on real texts (first --tokens tokens of each) "
        "with the full KV cache and with H2O budgets (heavy hitters by accumulated attention plus a recent "
        "window, per layer and KV head; arXiv 2306.14048) of 50%%, 20%% and 10%% of the text. Reports "
        "ppl_rel_increase against the full cache of the same run. Default texts: the zlib and xz FAQs and "
        "two stdlib modules (bench/h2o.py).",
        epilog="Example: specmesh bench h2o --out h2o.json",
    )
    h.add_argument("--model", default="smollm2-135m-instruct", help="target model (default: %(default)s)")
    h.add_argument("--out", type=Path, required=True, help="JSON output path; the PNG goes next to it (.png)")
    h.add_argument("--texts", type=Path, nargs="+", help="text files (.gz read too) instead of the defaults")
    h.add_argument("--tokens", type=int, default=1536, help="tokens scored per text (default: %(default)s)")
    h.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    h.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    h.add_argument("--no-progress", action="store_true", help="no progress bar")
    h.set_defaults(func=run_h2o)


def run_h2o(args: argparse.Namespace) -> int:
    _import_bench_decode()  # puts the source checkout's bench/ on the path when needed
    from bench import h2o

    result = h2o.run_h2o_bench(
        args.model,
        args.out,
        texts=args.texts,
        tokens=args.tokens,
        threads=args.threads,
        progress=not args.no_progress,
        png=not args.no_png,
    )
    print(h2o.format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    return 0


def _import_bench_decode():
    try:
        from bench import decode
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.decode"):
            raise
        # bench/ sits at the repository root and is not part of the installed packages:
        # fall back to the source checkout this CLI was loaded from.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from bench import decode
    return decode


def _run_decode_bench(decode, args: argparse.Namespace, prompts: list[str] | None) -> dict:
    return decode.run_decode_bench(
        args.model,
        prompts,
        args.max_new_tokens,
        args.repeats,
        args.out,
        args.threads,
        hf_attn_implementation=args.hf_attn,
        progress=not args.no_progress,
        png=not args.no_png,
        weights=args.weights,
        llama_bench=args.llama_bench,
        gguf=args.gguf,
    )


def run_decode(args: argparse.Namespace) -> int:
    decode = _import_bench_decode()

    prompts = decode.load_prompts_file(args.prompts) if args.prompts else None
    try:
        result = _run_decode_bench(decode, args, prompts)
    except ValueError as exc:
        print(f"specmesh bench decode: {exc}", file=sys.stderr)
        return 2
    print(decode.format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    if result["png_note"] and not args.no_png:
        print(f"note: {result['png_note']}")
    return 0 if result["greedy_identical"] or args.weights != "fp32" else 1

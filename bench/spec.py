"""Speculative decoding through the real gRPC stack vs the target alone and vs transformers.

For every prompt set (JSONL, one ``{"prompt": ..., "chat": true|false}`` per line) the same
prompts go through the gateway with ``policy=target`` (the baseline), ``policy=speculative`` for
each draft strategy (optionally with the adaptive budget, and optionally again without the
prompt-lookup tokens merged into model-drafted trees) and optionally ``policy=draft``; and,
in this process, through transformers: plain ``LlamaForCausalLM.generate`` and assisted
generation (``assistant_model=`` the same draft weights). Every path sees the same prompt token
ids (chat prompts rendered through the target's chat template here and sent to the gateway as
token ids), the same ``max_new_tokens`` and sampling, and one seed per prompt shared by all
paths, so T > 0 runs are reproducible.

Runs are interleaved per prompt (all configurations of prompt i, then prompt i + 1) and the order
of the configurations rotates from prompt to prompt, after one warm-up request of each: load
from other processes on a shared machine then hits every configuration alike instead of whichever
ran during a busy minute. Wall time is measured by the client, per request, and summed.

Conventions (DESIGN.md section 7): tau = (accepted + rounds) / rounds over all requests of a
run (mean tokens per target verification round, counting the correction/bonus token; 1.0 for the
target alone); acceptance rate = accepted / drafted; ``speedup_vs_target`` = target wall time /
candidate wall time over the same prompts, measured in the same run through the same stack;
``speedup_vs_hf_assisted`` = tokens/s of the candidate / tokens/s of transformers' assisted
generation (which runs in-process and pays no gRPC or process hops). Nothing here is a test
assertion on time.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.decode import _first_diff, machine_info
from services.core.strategies import STRATEGY_NAMES, Strategy

SCHEMA_VERSION = 1
STRATEGIES = STRATEGY_NAMES  # chain, static_tree, ... (services.core.strategies)
DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_DRAFT = "smollm2-135m-instruct-draft"
TARGET_RUN = "target"
DRAFT_RUN = "draft"
HF_GENERATE = "hf_generate"
HF_ASSISTED = "hf_assisted"
OVERHEAD_NOTE = (
    "specmesh runs go through the real gRPC stack: this process -> gateway -> draft and target "
    "services, each a separate process on loopback (with Redis when the stack starts it); their "
    "wall time is measured by the client and includes serialization, the process hops and the "
    "gateway's orchestration. transformers (hf_generate, hf_assisted) runs in this process with "
    "no RPC at all, target and assistant sharing one torch thread pool."
)
OMP_NOTE = (
    "OMP_WAIT_POLICY={policy} for this process (transformers) and every stack process: on a shared "
    "machine the OpenMP default (spin-waiting threads) collapses multi-threaded torch throughput "
    "whenever other processes compete for the cores (measured here: transformers generate with 2 "
    "threads at load ~5 ran at ~2 tokens/s spinning vs ~11 tokens/s passive); both sides get the "
    "same setting."
)
OMP_POLICIES = ("passive", "active", "inherit")
T_POSITIVE_NOTE = (
    "temperature > 0: outputs are samples, so speculative and target-only outputs legitimately "
    "differ (lossless means the same distribution, not the same tokens); greedy_identical is not "
    "checked. Runs that stop at EOS also differ in length, so compare speedup_vs_target_tokens_per_s "
    "(time per token) alongside speedup_vs_target (wall time for the same prompts)."
)


# --- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    chat: bool
    source: str | None = None


@dataclass
class PromptSet:
    name: str
    path: str
    items: list[PromptItem]


def load_prompt_set(path: str | Path, limit: int | None = None, name: str | None = None) -> PromptSet:
    """JSONL, one ``{"prompt": str, "chat": bool}`` per line (``chat`` defaults to true; a bare JSON
    string is a chat prompt); blank lines are skipped; the first `limit` prompts are kept."""
    path = Path(path)
    items: list[PromptItem] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f'{path}:{n}: expected {{"prompt": "...", "chat": true|false}}')
        chat = obj.get("chat", True)
        if not isinstance(chat, bool):
            raise ValueError(f'{path}:{n}: "chat" must be true or false, got {chat!r}')
        source = obj.get("source")
        items.append(PromptItem(obj["prompt"], chat, source if isinstance(source, str) else None))
    if not items:
        raise ValueError(f"{path}: no prompts")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        items = items[:limit]
    return PromptSet(name or path.stem, str(path), items)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base, name, k = p.stem, p.stem, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


# --- run configurations and records ----------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    name: str
    kind: str  # "stack" | "hf"
    policy: str | None = None  # stack: target | draft | speculative
    strategy: str | None = None  # speculative: one of STRATEGIES
    adaptive: bool = False
    lookup_tokens: int | None = None  # speculative: None = the gateway's default, 0 = off
    assisted: bool = False  # hf: assistant_model given

    @property
    def speculative(self) -> bool:
        return self.policy == "speculative"


def normalize_strategy(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return key


def plan_runs(
    strategies: Sequence[str], *, adaptive: bool, draft_policy: bool, hf: bool, compare_lookup: bool = False
) -> list[RunConfig]:
    """compare_lookup: each model strategy also runs with lookup_tokens=0 (suffix ``:no-lookup``)."""
    runs = [RunConfig(TARGET_RUN, "stack", "target")]
    for s in strategies:
        variants = [(f"speculative:{s}", False)] + ([(f"speculative:{s}:adaptive", True)] if adaptive else [])
        for name, adapt in variants:
            runs.append(RunConfig(name, "stack", "speculative", s, adaptive=adapt))
            if compare_lookup and Strategy(s).uses_model:
                runs.append(
                    RunConfig(f"{name}:no-lookup", "stack", "speculative", s, adaptive=adapt, lookup_tokens=0)
                )
    if draft_policy:
        runs.append(RunConfig(DRAFT_RUN, "stack", "draft"))
    if hf:
        runs.append(RunConfig(HF_GENERATE, "hf"))
        runs.append(RunConfig(HF_ASSISTED, "hf", assisted=True))
    return runs


@dataclass
class Record:
    """One timed request of one configuration on one prompt."""

    run: str
    set: str
    prompt_index: int
    prompt_tokens: int
    seed: int
    order: int  # position of this configuration among the prompt's runs (0 = first)
    tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    rounds: int = 0  # stack: verification rounds; hf: target forward calls
    drafted: int = 0
    accepted: int = 0
    draft_forwards: int | None = None  # hf assisted: assistant forward calls
    cached_prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def key(self) -> tuple[str, int]:
        return (self.set, self.prompt_index)


# --- the gRPC client -------------------------------------------------------------------------


class StackClient:
    """Blocking Gateway.Generate calls, timed on this side of the wire."""

    def __init__(self, address: str, timeout: float) -> None:
        import grpc

        from specmesh.v1 import gateway_pb2_grpc

        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def list_models(self) -> list[dict[str, Any]]:
        from specmesh.v1 import gateway_pb2

        response = self.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=60)
        return [
            {"name": m.name, "digest": m.digest, "parameters": m.parameters, "max_context": m.max_context}
            for m in response.models
        ]

    def request(
        self,
        run: RunConfig,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        ignore_eos: bool,
    ) -> Any:
        from gateway.budget import strategy_value
        from gateway.config import policy_value
        from specmesh.v1 import common_pb2, gateway_pb2

        sampling = common_pb2.SamplingParams(
            temperature=temperature,
            top_k=0,
            top_p=0.0,
            seed=seed,
            max_new_tokens=max_new_tokens,
            ignore_eos=ignore_eos,
        )
        spec = None
        if run.speculative:
            assert run.strategy is not None
            spec = gateway_pb2.SpecOptions(
                strategy=strategy_value(run.strategy),
                adaptive=run.adaptive,
                budget=common_pb2.TreeBudget(lookup_tokens=run.lookup_tokens),
            )
        return gateway_pb2.GatewayGenerateRequest(
            prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt_ids))),
            sampling=sampling,
            policy=policy_value(run.policy),
            spec=spec,
        )

    def generate(self, request: Any, record: Record) -> Record:
        import grpc

        from specmesh.v1 import common_pb2

        try:
            t0 = time.perf_counter()
            response = self.stub.Generate(request, timeout=self.timeout)
            record.wall_s = time.perf_counter() - t0
        except grpc.RpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
            return record
        s = response.spec_stats
        record.tokens = list(response.token_ids)
        record.rounds, record.drafted, record.accepted = s.rounds, s.drafted_tokens, s.accepted_tokens
        record.cached_prompt_tokens = response.usage.cached_prompt_tokens
        record.finish_reason = (
            common_pb2.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
        )
        return record


# --- transformers in-process -----------------------------------------------------------------


class _CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1


class HFRunner:
    """transformers' LlamaForCausalLM.generate, plain and with ``assistant_model`` (the draft)."""

    def __init__(
        self,
        target_dir: Path,
        draft_dir: Path,
        *,
        threads: int,
        temperature: float,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        ignore_eos: bool,
        attn_implementation: str = "sdpa",
        num_assistant_tokens: int | None = None,
    ) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

        def load(d: Path) -> Any:
            return transformers.LlamaForCausalLM.from_pretrained(
                d, dtype=torch.float32, attn_implementation=attn_implementation
            ).eval()

        self.target = load(target_dir)
        self.draft = load(draft_dir)
        eos = None if ignore_eos else list(eos_token_ids)
        for m in (self.target, self.draft):
            m.generation_config.eos_token_id = eos
            m.generation_config.pad_token_id = pad_token_id
        if num_assistant_tokens is not None:
            self.draft.generation_config.num_assistant_tokens = num_assistant_tokens
        sample = temperature > 0
        kwargs: dict[str, Any] = {
            "do_sample": sample,
            "max_new_tokens": max_new_tokens,
            "eos_token_id": eos,
            "pad_token_id": pad_token_id,
            "use_cache": True,
        }
        if sample:
            # top_k=0: transformers otherwise applies its default top_k=50, which the stack does not.
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        self.generation_config = transformers.GenerationConfig(**kwargs)
        self.generate_kwargs = kwargs
        self.threads = threads
        self.attn_implementation = self.target.config._attn_implementation
        defaults = transformers.GenerationConfig._get_default_generation_params()
        gc_draft = self.draft.generation_config
        keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        self.assisted_settings = {
            k: getattr(gc_draft, k, None) if getattr(gc_draft, k, None) is not None else defaults.get(k)
            for k in keys
        }
        self._target_calls, self._draft_calls = _CallCounter(), _CallCounter()
        self.target.register_forward_hook(self._target_calls)
        self.draft.register_forward_hook(self._draft_calls)

    def generate(self, prompt_ids: Sequence[int], seed: int, assisted: bool, record: Record) -> Record:
        import torch

        x = torch.tensor([list(prompt_ids)])
        self._target_calls.calls = self._draft_calls.calls = 0
        kwargs = {"assistant_model": self.draft} if assisted else {}
        try:
            with torch.inference_mode():
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                out = self.target.generate(
                    x, attention_mask=torch.ones_like(x), generation_config=self.generation_config, **kwargs
                )
                record.wall_s = time.perf_counter() - t0
        except Exception as exc:  # a transformers failure must not lose the stack's results
            record.error = f"{type(exc).__name__}: {exc}"
            return record
        record.tokens = out[0, len(prompt_ids) :].tolist()
        record.rounds = self._target_calls.calls
        record.draft_forwards = self._draft_calls.calls if assisted else None
        eos = self.generate_kwargs["eos_token_id"] or []
        record.finish_reason = "eos" if record.tokens and record.tokens[-1] in eos else "length"
        return record


# --- aggregation ---------------------------------------------------------------------------------


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(run: RunConfig, records: Sequence[Record]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    tokens = sum(len(r.tokens) for r in ok)
    wall = sum(r.wall_s for r in ok)
    rounds = sum(r.rounds for r in ok)
    drafted = sum(r.drafted for r in ok)
    accepted = sum(r.accepted for r in ok)
    s: dict[str, Any] = {
        "kind": run.kind,
        "policy": run.policy,
        "strategy": run.strategy,
        "adaptive": run.adaptive,
        "lookup_tokens": run.lookup_tokens,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "wall_s": wall,
        "tokens_per_s": _div(tokens, wall),
        "wall_s_per_request_median": statistics.median(r.wall_s for r in ok) if ok else None,
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
    }
    if run.policy == "draft":  # the draft alone: nothing is verified, so no tau / acceptance
        s.update(drafted_tokens=drafted, tau=None, acceptance_rate=None)
    elif run.kind == "stack":
        s.update(
            rounds=rounds,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
            # tau counts the correction/bonus token of every round (1.0 for the target alone)
            tau=_div(accepted + rounds, rounds),
            acceptance_rate=_div(accepted, drafted),
            tokens_per_round=_div(tokens, rounds),
            cached_prompt_tokens=sum(r.cached_prompt_tokens for r in ok),
        )
    else:
        s.update(
            target_forwards=rounds,
            draft_forwards=sum(r.draft_forwards or 0 for r in ok) if run.assisted else None,
            # transformers reports no acceptance counts; tokens per target forward is its tau
            # (the last round may be cut by max_new_tokens / EOS, as in tokens_per_round above)
            tokens_per_target_forward=_div(tokens, rounds),
            tau=None,
            acceptance_rate=None,
        )
    return s


def compare(base: Sequence[Record], cand: Sequence[Record]) -> dict[str, Any]:
    """Ratios of `cand` against `base` over the prompts both completed."""
    b = {r.key: r for r in base if r.ok}
    c = {r.key: r for r in cand if r.ok}
    common = sorted(b.keys() & c.keys())
    if not common:
        return {"prompts": 0, "wall_ratio": None, "tokens_per_s_ratio": None, "median_prompt": None}
    bw, cw = sum(b[k].wall_s for k in common), sum(c[k].wall_s for k in common)
    bt, ct = sum(len(b[k].tokens) for k in common), sum(len(c[k].tokens) for k in common)
    per = [
        (len(c[k].tokens) / c[k].wall_s) / (len(b[k].tokens) / b[k].wall_s)
        for k in common
        if c[k].wall_s > 0 and b[k].wall_s > 0 and c[k].tokens and b[k].tokens
    ]
    tps_b, tps_c = _div(bt, bw), _div(ct, cw)
    return {
        "prompts": len(common),
        "wall_ratio": _div(bw, cw),
        "tokens_per_s_ratio": _div(tps_c or 0.0, tps_b or 0.0) if tps_b and tps_c else None,
        "median_prompt": statistics.median(per) if per else None,
    }


def summarize_group(runs: Sequence[RunConfig], records: Sequence[Record]) -> dict[str, Any]:
    """Per-run summaries with speedups, and the best speculative run, over `records`."""
    by_run: dict[str, list[Record]] = {r.name: [] for r in runs}
    for rec in records:
        by_run[rec.run].append(rec)
    out: dict[str, Any] = {}
    for run in runs:
        s = summarize(run, by_run[run.name])
        vs_t = compare(by_run[TARGET_RUN], by_run[run.name])
        s["speedup_vs_target"] = vs_t["wall_ratio"]
        s["speedup_vs_target_tokens_per_s"] = vs_t["tokens_per_s_ratio"]
        s["speedup_vs_target_median_prompt"] = vs_t["median_prompt"]
        for hf_name, key in (
            (HF_ASSISTED, "speedup_vs_hf_assisted"),
            (HF_GENERATE, "speedup_vs_hf_generate"),
        ):
            if hf_name in by_run and run.name != hf_name:
                vs = compare(by_run[hf_name], by_run[run.name])
                s[key] = vs["tokens_per_s_ratio"]
                s[f"{key}_median_prompt"] = vs["median_prompt"]
        out[run.name] = s
    spec = [r.name for r in runs if r.speculative and out[r.name]["tokens_per_s"]]
    best = max(spec, key=lambda n: out[n]["tokens_per_s"]) if spec else None
    group: dict[str, Any] = {"runs": out, "best_speculative": None}
    if best is not None:
        b = out[best]
        group["best_speculative"] = {
            "run": best,
            "tokens_per_s": b["tokens_per_s"],
            "tau": b["tau"],
            "acceptance_rate": b["acceptance_rate"],
            "speedup_vs_target": b["speedup_vs_target"],
            "speedup_vs_target_tokens_per_s": b["speedup_vs_target_tokens_per_s"],
            "speedup_vs_hf_assisted": b.get("speedup_vs_hf_assisted"),
            "speedup_vs_hf_generate": b.get("speedup_vs_hf_generate"),
        }
    group["speedup_vs_target"] = group["best_speculative"]["speedup_vs_target"] if best else None
    group["speedup_vs_hf_assisted"] = group["best_speculative"]["speedup_vs_hf_assisted"] if best else None
    return group


def greedy_mismatches(runs: Sequence[RunConfig], records: Sequence[Record]) -> list[dict[str, Any]]:
    """Every speculative output that differs from the target-only output of the same prompt."""
    target = {r.key: r for r in records if r.run == TARGET_RUN and r.ok}
    names = {r.name for r in runs if r.speculative}
    out = []
    for rec in records:
        if rec.run not in names or not rec.ok or rec.key not in target:
            continue
        ref = target[rec.key].tokens
        diff = _first_diff(ref, rec.tokens)
        if diff is not None:
            out.append(
                {
                    "set": rec.set,
                    "prompt_index": rec.prompt_index,
                    "run": rec.run,
                    "first_diff_index": diff,
                    "target_token": ref[diff] if diff < len(ref) else None,
                    "run_token": rec.tokens[diff] if diff < len(rec.tokens) else None,
                    "target_length": len(ref),
                    "run_length": len(rec.tokens),
                }
            )
    return out


# Logit gap under which a greedy mismatch counts as a floating-point near-tie. Target-only decoding
# (1-2 token forwards, BLAS) and verification (3+ tokens, oneDNN-packed weights) sum in different
# orders; in fp32 over 30 layers their logits differ by ~1e-5 to 1e-3 (services/core/model.py,
# `linear`), so two candidates closer than this can swap. A wider gap is not explained by rounding.
NEAR_TIE_LOGIT_GAP = 1e-2


def greedy_identity(runs: Sequence[RunConfig], records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """Per speculative run: outputs compared with the target-only output of the same prompt (both
    requests completed) and how many of them are identical token for token."""
    target = {r.key: r.tokens for r in records if r.run == TARGET_RUN and r.ok}
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        if not run.speculative:
            continue
        pairs = [(target[r.key], r.tokens) for r in records if r.run == run.name and r.ok and r.key in target]
        same = sum(ref == toks for ref, toks in pairs)
        out[run.name] = {"compared": len(pairs), "identical": same, "fraction": _div(same, len(pairs))}
    return out


def identical_fraction(identity: dict[str, dict[str, Any]]) -> float | None:
    """Identical outputs over outputs compared, all speculative runs together."""
    return _div(sum(v["identical"] for v in identity.values()), sum(v["compared"] for v in identity.values()))


def add_logit_margins(
    mismatches: list[dict[str, Any]],
    records: Sequence[Record],
    prompt_ids: dict[tuple[str, int], list[int]],
    next_logits: Callable[[list[int]], Sequence[float]],
) -> None:
    """Annotate each mismatch with the target's logits at its first divergence: the top-2 margin
    and the gap between the target-only token and the speculative one (``near_tie`` when that gap
    is under NEAR_TIE_LOGIT_GAP). `next_logits(ids)` is the target's next-token logits after `ids`.
    A divergence where one output has ended (EOS) has no token pair to compare and gets None."""
    target = {r.key: r.tokens for r in records if r.run == TARGET_RUN and r.ok}
    for m in mismatches:
        m.update(target_top2_margin=None, target_vs_run_logit_gap=None, near_tie=None)
        if m["target_token"] is None or m["run_token"] is None:
            continue
        key = (m["set"], m["prompt_index"])
        logits = list(next_logits(prompt_ids[key] + target[key][: m["first_diff_index"]]))
        top1, top2 = sorted(logits, reverse=True)[:2]
        gap = logits[m["target_token"]] - logits[m["run_token"]]
        m.update(
            target_top2_margin=top1 - top2,
            target_vs_run_logit_gap=gap,
            near_tie=abs(gap) < NEAR_TIE_LOGIT_GAP,
        )


def hf_next_logits(model: Any) -> Callable[[list[int]], list[float]]:
    """`next_logits` for add_logit_margins from a transformers causal LM (fp32, one full forward):
    an arithmetic independent of both specmesh paths, so it shows how close the two tokens are."""
    import torch

    def next_logits(ids: list[int]) -> list[float]:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -1].float().tolist()

    return next_logits


# --- machine / provenance ---------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_info(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# --- output --------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def format_summary(result: dict[str, Any]) -> str:
    lines: list[str] = []
    groups = [(name, g) for name, g in result["sets"].items()]
    if len(groups) > 1:
        groups.append(("overall", result["overall"]))
    for name, group in groups:
        head = ("run", "tokens", "wall s", "tok/s", "tau", "accept", "x target", "x tgt tok/s", "x HF-asst")
        rows = [head]
        for run, s in group["runs"].items():
            rows.append(
                (
                    run,
                    str(s["output_tokens"]) + (f" ({s['failed']} failed)" if s["failed"] else ""),
                    _fmt(s["wall_s"], ".2f"),
                    _fmt(s["tokens_per_s"], ".1f"),
                    _fmt(s["tau"], ".2f")
                    if s["tau"] is not None
                    else _fmt(s.get("tokens_per_target_forward"), ".2f", "*"),
                    _fmt(s["acceptance_rate"], ".1%"),
                    _fmt(s["speedup_vs_target"], ".2f", "x"),
                    _fmt(s["speedup_vs_target_tokens_per_s"], ".2f", "x"),
                    _fmt(s.get("speedup_vs_hf_assisted"), ".2f", "x"),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        table = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        n = group["num_prompts"]
        lines.append(f"== {name} ({n} prompts) ==")
        lines += [table[0], "-" * len(table[0]), *table[1:]]
        best = group["best_speculative"]
        if best:
            lines.append(
                f"best speculative: {best['run']}: {_fmt(best['tokens_per_s'], '.1f')} tok/s, "
                f"tau {_fmt(best['tau'], '.2f')}, {_fmt(best['speedup_vs_target'], '.2f')}x vs target, "
                f"{_fmt(best['speedup_vs_hf_assisted'], '.2f')}x vs HF assisted"
            )
        lines.append("")
    lines.append("* transformers: tokens per target forward (no acceptance counts available)")
    gi = result["greedy_identical"]
    if gi is None:
        lines.append(f"greedy identical: n/a (temperature {result['config']['temperature']} > 0)")
    else:
        lines.append(
            f"greedy identical: {gi}"
            + ("" if gi else f" ({len(result['mismatches'])} mismatching outputs, see 'mismatches')")
        )
        lines += _identity_lines(result)
    m = result["machine"]
    lines.append(f"load average: start {m['loadavg_start']}, end {m['loadavg_end']} ({m['cpu_count']} CPUs)")
    return "\n".join(lines)


def _identity_lines(result: dict[str, Any]) -> list[str]:
    """Identical fraction per speculative run, and each mismatch with the target's logit margins."""
    lines = []
    for run, v in (result.get("greedy_identity") or {}).items():
        lines.append(
            f"  {run}: {v['identical']}/{v['compared']} outputs identical ({_fmt(v['fraction'], '.1%')})"
        )
    for m in result["mismatches"]:
        tie = {True: "near-tie", False: "NOT a near-tie", None: "no token pair"}[m.get("near_tie")]
        lines.append(
            f"  mismatch {m['set']}[{m['prompt_index']}] {m['run']}: first difference at token "
            f"{m['first_diff_index']} ({m['target_token']} vs {m['run_token']}), target top-2 margin "
            f"{_fmt(m.get('target_top2_margin'), '.2e')}, "
            f"logit gap {_fmt(m.get('target_vs_run_logit_gap'), '.2e')}: {tie}"
        )
    return lines


def _write_png(result: dict[str, Any], path: Path) -> str | None:
    """Bar charts next to the JSON; returns a note when they cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); PNG skipped"
    sets = list(result["sets"])
    runs = list(result["overall"]["runs"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(runs) * len(sets) + 3), 8))
    width = 0.8 / len(sets)
    xs = range(len(runs))
    for j, name in enumerate(sets):
        group = result["sets"][name]["runs"]
        offs = [x - 0.4 + width * (j + 0.5) for x in xs]
        ax1.bar(offs, [group[r]["tokens_per_s"] or 0 for r in runs], width, label=name)
        ax2.bar(offs, [group[r]["speedup_vs_target"] or 0 for r in runs], width, label=name)
    short = {"speculative:": "spec:\n", ":adaptive": "\n+adaptive", ":no-lookup": "\n-lookup"}
    labels = []
    for r in runs:
        for long, abbreviated in short.items():
            r = r.replace(long, abbreviated)
        labels.append(r)
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.legend()
    ax1.set_ylabel("tokens/s (client wall time)")
    ax2.set_ylabel("speedup vs target (wall time)")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    cfg, m = result["config"], result["machine"]
    fig.suptitle(
        f"{cfg['target_model']} + draft {cfg['draft_model']}, T={cfg['temperature']}, "
        f"max_new_tokens={cfg['max_new_tokens']}, CPU x{m['cpu_count']} "
        f"(load {m['loadavg_start']} -> {m['loadavg_end']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- the benchmark -------------------------------------------------------------------------------


def distinct_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` different TCP ports that are free now: the sockets stay bound until all are picked.

    LocalStack's own choice asks the OS for one free port per child without holding them, and
    can get the same port twice (then the gateway fails to bind while the readiness probe of its
    address is answered by the target).
    """
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
    return ports


def _rotate(runs: Sequence[RunConfig], k: int) -> list[RunConfig]:
    k %= len(runs)
    return [*runs[k:], *runs[:k]]


def run_spec_bench(
    prompt_files: Sequence[str | Path],
    *,
    out: str | Path,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    gateway: str | None = None,
    target_model: str = DEFAULT_TARGET,
    draft_model: str = DEFAULT_DRAFT,
    strategies: Iterable[str] = STRATEGIES,
    adaptive: bool = False,
    compare_lookup: bool = False,
    draft_policy: bool = False,
    limit: int | None = None,
    seed: int = 0,
    hf: bool = True,
    target_threads: int | None = None,
    draft_threads: int | None = None,
    draft_int8: bool = True,
    omp_spincount: int | None = 10000,
    hf_threads: int | None = None,
    hf_num_assistant_tokens: int | None = None,
    ignore_eos: bool = False,
    redis: bool = True,
    request_timeout: float = 600.0,
    omp_wait_policy: str = "inherit",
    stack_log: str | Path | None = None,
    progress: bool = True,
    png: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; write JSON (+ PNG) to `out` and return the result."""
    from tqdm import tqdm

    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not prompt_files:
        raise ValueError("no prompt files")
    if omp_wait_policy not in OMP_POLICIES:
        raise ValueError(f"omp_wait_policy must be one of {', '.join(OMP_POLICIES)}, got {omp_wait_policy!r}")
    child_env: dict[str, str] = {}
    omp_in_process: bool | None = None
    omp_previous = os.environ.get("OMP_WAIT_POLICY")
    if omp_wait_policy != "inherit":
        # read by the OpenMP runtime when torch loads it: effective in this process only if torch
        # was not imported yet (it always is for the stack's children)
        omp_in_process = "torch" not in sys.modules
        child_env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    strategies = [normalize_strategy(s) for s in strategies]
    strategies = list(dict.fromkeys(strategies))
    cores = os.cpu_count() or 1
    target_threads = target_threads or cores
    draft_threads = draft_threads or cores
    hf_threads = hf_threads or target_threads
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loadavg_start = _loadavg()
    started = time.time()
    repo = Path(__file__).resolve().parents[1]
    git_start = git_info(repo)  # the code the stack is started from

    paths = [Path(p) for p in prompt_files]
    sets = [load_prompt_set(p, limit, n) for p, n in zip(paths, _unique_names(paths), strict=True)]
    target_dir = resolve_model(target_model)
    tokenizer = Tokenizer.from_dir(target_dir)
    prompt_ids: dict[tuple[str, int], list[int]] = {}
    for ps in sets:
        for i, item in enumerate(ps.items):
            ids = (
                tokenizer.encode_chat([{"role": "user", "content": item.prompt}])
                if item.chat
                else tokenizer.encode(item.prompt)
            )
            if not ids:
                raise ValueError(f"{ps.path}: prompt {i} encodes to no tokens")
            prompt_ids[(ps.name, i)] = ids

    runs = plan_runs(
        strategies, adaptive=adaptive, draft_policy=draft_policy, hf=hf, compare_lookup=compare_lookup
    )
    notes = [OVERHEAD_NOTE]
    if omp_wait_policy != "inherit":
        notes.append(OMP_NOTE.format(policy=omp_wait_policy.upper()))
    elif gateway is None and omp_spincount is not None:
        from specmesh.stack import OMP_SPIN_NOTE

        notes.append(f"GOMP_SPINCOUNT={omp_spincount} for every stack process. " + OMP_SPIN_NOTE)
        if not omp_in_process:
            notes.append(
                "torch was imported before the benchmark set OMP_WAIT_POLICY: in-process runs use the "
                "policy it was imported with"
            )
    if temperature > 0:
        notes.append(T_POSITIVE_NOTE)
    if gateway:
        notes.append(
            "--gateway given: the stack was started elsewhere; its models, thread counts and default "
            "options (e.g. an --adaptive gateway makes every speculative run adaptive) are not "
            "controlled by this benchmark"
        )

    hf_runner: HFRunner | None = None
    hf_info: dict[str, Any] | None = None
    stack_cm = None
    stack_log_path = None
    log_file = None
    client: StackClient | None = None
    records: list[Record] = []
    hf_error: str | None = None
    try:
        os.environ.update(child_env)  # restored in `finally`
        if gateway is None:
            from specmesh.stack import LocalStack, LogSink, StackConfig, find_redis_server

            if redis and find_redis_server() is None:
                notes.append("no Redis-compatible server found: the stack ran without Redis")
                redis = False
            stack_log_path = Path(stack_log) if stack_log else out.with_suffix(".stack.log")
            log_file = open(stack_log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
            gateway_port, target_port, draft_port, redis_port = distinct_free_ports(4)
            config = StackConfig(
                model=target_model,
                draft_model=draft_model,
                gateway_port=gateway_port,
                target_port=target_port,
                draft_port=draft_port,
                redis=redis,
                redis_port=redis_port,
                env=child_env,
                target_threads=target_threads,
                draft_threads=draft_threads,
                draft_int8=draft_int8,
                omp_spincount=omp_spincount,
                warmup=True,
            )
            stack_cm = LocalStack(config, LogSink(log_file, color=False))
            print(f"starting the local stack (logs: {stack_log_path}) ...", file=sys.stderr, flush=True)
            try:
                stack_cm.start()
            except Exception:
                log_file.flush()
                tail = stack_log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
                print("\n".join(tail), file=sys.stderr)
                raise
            address = stack_cm.gateway
        else:
            address = gateway
        client = StackClient(address, request_timeout)
        served = client.list_models()
        if served and target_model not in {m["name"] for m in served}:
            notes.append(
                f"the gateway serves {[m['name'] for m in served]}, not {target_model!r}: prompts were "
                f"tokenized with {target_model!r}'s tokenizer"
            )

        if hf:
            draft_dir = resolve_model(draft_model)
            try:
                hf_runner = HFRunner(
                    target_dir,
                    draft_dir,
                    threads=hf_threads,
                    temperature=temperature,
                    max_new_tokens=max_new_tokens,
                    eos_token_ids=tokenizer.eos_token_ids,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                    ignore_eos=ignore_eos,
                    num_assistant_tokens=hf_num_assistant_tokens,
                )
            except Exception as exc:  # e.g. a draft transformers cannot load: keep the stack's runs
                hf_error = f"{type(exc).__name__}: {exc}"
                notes.append(f"transformers baselines skipped: loading the models failed ({hf_error})")
                print(f"warning: transformers baselines skipped: {hf_error}", file=sys.stderr)
                runs = [r for r in runs if r.kind != "hf"]
                hf = False
        if hf_runner is not None:
            hf_info = {
                "target_dir": str(target_dir),
                "draft_dir": str(draft_dir),
                "threads": hf_threads,
                "attn_implementation": hf_runner.attn_implementation,
                "generate_kwargs": hf_runner.generate_kwargs,
                "assisted_settings": hf_runner.assisted_settings,
                "mode": "eager (no torch.compile), float32, batch 1, in this process",
            }

        def one(run: RunConfig, key: tuple[str, int], seed_: int, order: int, n_tokens: int) -> Record:
            ids = prompt_ids[key]
            rec = Record(run.name, key[0], key[1], len(ids), seed_, order)
            if run.kind == "hf":
                assert hf_runner is not None
                return hf_runner.generate(ids, seed_, run.assisted, rec)
            assert client is not None
            req = client.request(
                run, ids, max_new_tokens=n_tokens, temperature=temperature, seed=seed_, ignore_eos=ignore_eos
            )
            return client.generate(req, rec)

        # warm-up: every configuration once, short, on the first prompt (not recorded)
        first = (sets[0].name, 0)
        warm_tokens = min(max_new_tokens, 8)
        warm_errors = []
        for run in tqdm(runs, desc="warm-up", unit="run", disable=not progress):
            if run.kind == "hf":
                assert hf_runner is not None
                hf_runner.generation_config.max_new_tokens = warm_tokens
                rec = one(run, first, seed, 0, warm_tokens)
                hf_runner.generation_config.max_new_tokens = max_new_tokens
            else:
                rec = one(run, first, seed, 0, warm_tokens)
            if rec.error:
                warm_errors.append(f"{run.name}: {rec.error}")
        if warm_errors:
            raise RuntimeError("warm-up requests failed:\n  " + "\n  ".join(warm_errors))

        set_load: dict[str, dict[str, Any]] = {}
        g = 0
        for ps in sets:
            set_load[ps.name] = {"loadavg_start": _loadavg()}
            bar = tqdm(total=len(ps.items) * len(runs), desc=f"{ps.name}", unit="req", disable=not progress)
            for i in range(len(ps.items)):
                for order, run in enumerate(_rotate(runs, g)):
                    gc.collect()
                    rec = one(run, (ps.name, i), seed + i, order, max_new_tokens)
                    records.append(rec)
                    if rec.error:
                        tqdm.write(f"{ps.name}[{i}] {run.name}: {rec.error}", file=sys.stderr)
                    bar.update(1)
                g += 1
            bar.close()
            set_load[ps.name]["loadavg_end"] = _loadavg()
    finally:
        if client is not None:
            client.close()
        if stack_cm is not None:
            stack_cm.stop()
        if log_file is not None:
            log_file.close()
        if omp_wait_policy != "inherit":  # the OpenMP runtime has read it by now; leave no trace
            if omp_previous is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = omp_previous

    # --- results ---
    sets_out: dict[str, Any] = {}
    for ps in sets:
        recs = [r for r in records if r.set == ps.name]
        group = summarize_group(runs, recs)
        per_prompt = []
        for i, item in enumerate(ps.items):
            mine = {r.run: r for r in recs if r.prompt_index == i}
            tgt = mine.get(TARGET_RUN)
            per_prompt.append(
                {
                    "prompt_index": i,
                    "prompt": item.prompt,
                    "chat": item.chat,
                    "source": item.source,
                    "prompt_tokens": len(prompt_ids[(ps.name, i)]),
                    "seed": seed + i,
                    "target_text": tokenizer.decode(tgt.tokens) if tgt and tgt.ok else None,
                    "runs": {
                        name: {k: v for k, v in asdict(r).items() if k not in ("run", "set", "prompt_index")}
                        | {"tokens_per_s": _div(len(r.tokens), r.wall_s)}
                        for name, r in mine.items()
                    },
                }
            )
        sets_out[ps.name] = {
            "prompts_file": ps.path,
            "num_prompts": len(ps.items),
            "chat_prompts": sum(it.chat for it in ps.items),
            **set_load.get(ps.name, {}),
            **group,
            "per_prompt": per_prompt,
        }
    overall = summarize_group(runs, records)
    overall["num_prompts"] = sum(len(ps.items) for ps in sets)

    mismatches = greedy_mismatches(runs, records) if temperature == 0 else []
    identity = greedy_identity(runs, records) if temperature == 0 else None
    if mismatches:
        model = hf_runner.target if hf_runner is not None else _load_hf_target(target_dir)
        add_logit_margins(mismatches, records, prompt_ids, hf_next_logits(model))
    failed = [
        {"set": r.set, "prompt_index": r.prompt_index, "run": r.run, "error": r.error}
        for r in records
        if not r.ok
    ]
    if temperature == 0:
        target_ok = {r.key for r in records if r.run == TARGET_RUN and r.ok}
        spec_complete = all(
            r.ok and r.key in target_ok for r in records if r.run in {x.name for x in runs if x.speculative}
        )
        greedy_identical: bool | None = not mismatches and spec_complete
        greedy_note = (
            None
            if spec_complete
            else "some target or speculative requests failed, so identity could not be checked everywhere"
        )
    else:
        greedy_identical, greedy_note = None, T_POSITIVE_NOTE
    hf_vs_target = None
    if hf and temperature == 0:
        ref = {r.key: r.tokens for r in records if r.run == TARGET_RUN and r.ok}
        hf_recs = [r for r in records if r.run in (HF_GENERATE, HF_ASSISTED)]
        hf_vs_target = {
            name: sum(1 for r in hf_recs if r.run == name and r.ok and ref.get(r.key) == r.tokens)
            for name in (HF_GENERATE, HF_ASSISTED)
        }

    threads_info = {
        "omp_wait_policy": omp_wait_policy,
        "omp_wait_policy_in_process": omp_in_process,
        "target_threads": target_threads if gateway is None else None,
        "draft_threads": draft_threads if gateway is None else None,
        "draft_int8": draft_int8 if gateway is None else None,
        "omp_spincount": omp_spincount if gateway is None else None,
        "hf_threads": hf_threads if hf else None,
        "bench_process_torch_threads": _torch_threads(),
    }
    machine = machine_info(threads_info["bench_process_torch_threads"] or 0) | {
        "loadavg_start": loadavg_start,
        "loadavg_end": _loadavg(),
        "threads": threads_info,
        **git_start,
    }
    git_end = git_info(repo)
    if git_end != git_start:
        machine["git_at_end"] = git_end
        notes.append("the checkout changed while the benchmark ran (see machine.git_at_end)")
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "spec",
        "config": {
            "prompt_files": [str(p) for p in paths],
            "target_model": target_model,
            "target_dir": str(target_dir),
            "draft_model": draft_model,
            "gateway": gateway or "started by this benchmark (specmesh.stack.LocalStack)",
            "redis": redis if gateway is None else None,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": 0,
            "top_p": None,
            "ignore_eos": ignore_eos,
            "seed": seed,
            "seeding": "prompt i of every set uses seed + i, the same seed for every configuration",
            "limit": limit,
            "strategies": strategies,
            "adaptive": adaptive,
            "compare_lookup": compare_lookup,
            "draft_policy": draft_policy,
            "runs": [asdict(r) for r in runs],
            "prompt_format": "chat=true: the target's chat template with one user message and the "
            "generation prompt; chat=false: the raw text. Sent to the gateway as token ids.",
            "interleaving": "per prompt, every configuration in a rotating order, after one short "
            "warm-up request of each",
            "timing": "client-side wall time per request (Gateway.Generate, unary), summed per run",
            "hf": hf_info,
            "hf_error": hf_error,
            "request_timeout_s": request_timeout,
        },
        "machine": machine,
        "notes": notes,
        "greedy_identical": greedy_identical,
        "greedy_identical_note": greedy_note,
        "greedy_identical_fraction": identical_fraction(identity) if identity is not None else None,
        "greedy_identity": identity,
        "near_tie_logit_gap": NEAR_TIE_LOGIT_GAP,
        "mismatches": mismatches,
        "hf_outputs_equal_to_target": hf_vs_target,
        "failed_requests": failed,
        "overall": overall,
        "sets": sets_out,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "stack_log": str(stack_log_path) if stack_log_path else None,
        "json": str(out),
        "png": None,
        "png_note": None,
    }
    if png:
        png_path = out.with_suffix(".png")
        note = _write_png(result, png_path)
        result["png"], result["png_note"] = (None, note) if note else (str(png_path), None)
    else:
        result["png_note"] = "PNG disabled"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _load_hf_target(target_dir: Path) -> Any:
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()

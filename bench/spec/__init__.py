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

Greedy identity (T = 0): every speculative output is compared with the target-only output of
the same prompt; ``greedy_identical_fraction`` is the share that match token for token, and each
mismatch carries the target's logit margins at its first divergence (bench.spec.identity).

Modules, one job each: ``config`` (options and their checks), ``prompts`` (prompt sets),
``runs`` (configurations and records), ``client`` / ``hf`` (the two ways of generating),
``measure`` (the stack's lifetime and the interleaved loop), ``stats`` (aggregation),
``identity`` (greedy comparison), ``provenance`` (machine and commit), ``result`` (the JSON
document), ``report`` (the printed table), ``plot`` (the PNG); ``benchmark`` runs them in order.
"""

from __future__ import annotations

from bench.spec.benchmark import run_spec_bench
from bench.spec.config import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    SCHEMA_VERSION,
    STRATEGIES,
    SpecBenchConfig,
    normalize_strategy,
)
from bench.spec.hf import hf_next_logits
from bench.spec.identity import (
    NEAR_TIE_LOGIT_GAP,
    add_logit_margins,
    greedy_identity,
    greedy_mismatches,
    identical_fraction,
)
from bench.spec.prompts import PromptItem, PromptSet, load_prompt_set
from bench.spec.report import format_summary, identity_lines
from bench.spec.runs import Record, RunConfig, plan_runs
from bench.spec.stats import compare, summarize, summarize_group

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "NEAR_TIE_LOGIT_GAP",
    "SCHEMA_VERSION",
    "STRATEGIES",
    "PromptItem",
    "PromptSet",
    "Record",
    "RunConfig",
    "SpecBenchConfig",
    "add_logit_margins",
    "compare",
    "format_summary",
    "greedy_identity",
    "greedy_mismatches",
    "hf_next_logits",
    "identical_fraction",
    "identity_lines",
    "load_prompt_set",
    "normalize_strategy",
    "plan_runs",
    "run_spec_bench",
    "summarize",
    "summarize_group",
]

"""`specmesh train draft`: a speculative-decoding draft for a Llama target.

Recipe (measured on SmolLM2-135M-Instruct, see README.md beside this file and train_report.json):

1. Slice: the draft starts as the target's first layers (plus, by default, its last
   layer) with the target's embedding, final norm and tied head. The embedding/head stay
   frozen (shared with the target), the slice layers and the final norm train.
2. Target-labelled data, streamed (the draft is data-limited, not step-limited):
   a. chat: the target answers real chat prompts (greedy and sampled) in large batches;
      every generated position keeps the target's top-k log-probabilities;
   b. corpus: token-level distillation over real text (CPython stdlib, man pages, docs),
      the target labelling each batch (forward only, bf16) just before the draft trains on it.
3. Loss: sparse KL (cross-entropy to the target's renormalised top-k distribution) over a
   truncated draft vocabulary, the most frequent target tokens, saved as draft_vocab.json
   so the draft service can restrict its head at run time.
4. Periodic evaluation: greedy agreement of the draft's next token with the target's own
   greedy chat answers on held-out prompts (alpha), plus a T=1 acceptance lower bound.

CUDA when available (bf16, large batches), otherwise a CPU run bounded by `minutes`.
`minutes=0` (or `untrained=True`) only slices and saves: seconds, for tests.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from services.core.errors import InvalidArgument
from services.core.loaders.hf_dir import load_hf_dir
from services.core.model_store import (
    DRAFT_VOCAB_FILE,
    _check_name,
    count_parameters,
    model_root,
    resolve_model,
)
from services.core.tokenizer import Tokenizer

from .calibration import calibrate_norm_scale, calibration_batches
from .checkpoint import draft_provenance, rewrite_report, save_draft
from .device import autocast, cast_copy, label_dtype, pick_device
from .distill import distill
from .evaluation import decode_cost, evaluate, expected_tau
from .labels import answer_prompts, held_out_answers
from .pack import load_pack, tokenizer_sha256
from .progress import Budget, Progress
from .recipe import DraftRecipe
from .slicing import slice_config, slice_state
from .sources import chain, corpus_chunks, prompt_pool, token_documents
from .tmodel import TrainLlama
from .vocab import always_kept, choose_draft_vocab

ALPHA_DEFINITION = (
    "alpha: greedy agreement of the draft's next token with the target's greedy chat "
    "answers on held-out prompts (teacher-forced); accept_t1_lb: sum_x min(p,q) over the "
    "target's top-k, a lower bound of the T=1 acceptance rate"
)


def train_draft(
    target: str | Path,
    name: str,
    *,
    minutes: float = 25.0,
    device: str = "auto",
    recipe: DraftRecipe | None = None,
    root: str | Path | None = None,
    untrained: bool = False,
    progress: bool = True,
    prompts: Sequence[str] | None = None,
    documents: Iterator[str] | None = None,
    data_packs: Sequence[str | Path] = (),
    measure_cost: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train (or, with minutes=0 / untrained, only slice) a draft of `target`; returns its dir.

    `data_packs` (files from `specmesh train pack`) replace the default chat prompts and corpus,
    for machines that lack the sources; `prompts` / `documents` replace them directly (tests).
    """
    _check_name(name)
    t0 = time.time()
    target_dir = resolve_model(target, root)
    out_dir = (Path(root) if root is not None else model_root()) / name
    if out_dir.resolve() == target_dir.resolve():
        raise InvalidArgument("the draft name must differ from the target's", field="name")
    dev = pick_device(device)
    recipe = recipe or DraftRecipe.for_device(dev)
    torch.manual_seed(recipe.seed)
    cfg, state = load_hf_dir(target_dir)
    layers = recipe.layer_indices(cfg.num_hidden_layers)
    dcfg = slice_config(cfg, len(layers))
    dstate = slice_state(state, layers)
    provenance = draft_provenance(target_dir, layers)
    report: dict[str, Any] = {
        "target": target_dir.name,
        "recipe": asdict(recipe) | {"layers_from_target": layers},
        "draft_parameters": count_parameters(dcfg),
        "target_parameters": count_parameters(cfg),
        "device": str(dev),
        "data_packs": [Path(p).name for p in data_packs],
    }
    if untrained or minutes <= 0:
        report.update(trained=False, minutes=0.0, tokens_seen=0)
        provenance["trained"] = False
        out = save_draft(out_dir, dcfg, dstate, target_dir, provenance, report)
        log(f"untrained slice draft (target layers {layers}) saved to {out} in {time.time() - t0:.1f}s")
        return out

    rng = random.Random(recipe.seed)
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)  # sampling runs on the device
    tok = Tokenizer.from_dir(target_dir)
    packs = [load_pack(p, tokenizer_sha256(target_dir)) for p in data_packs]
    eos_ids = list(tok.eos_token_ids) or [cfg.eos_token_ids[0]]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]

    # target copies: exact fp32 for the held-out answers, fast (bf16) for labelling
    target_fp32 = TrainLlama(cfg)
    target_fp32.load_hf(state)
    target_fp32.to(dev).eval().requires_grad_(False)
    ldtype = label_dtype(dev)
    teacher = target_fp32 if ldtype == torch.float32 else cast_copy(target_fp32, ldtype)

    pool = prompt_pool(prompts, packs, recipe)

    def encode(q: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": q}])[:512]

    eval_prompts = [encode(q) for q in pool[: recipe.n_eval]]
    train_prompts = pool[recipe.n_eval :]
    log(f"generating {len(eval_prompts)} held-out greedy target answers (fp32) on {dev}")
    eval_set = held_out_answers(
        target_fp32, eval_prompts, recipe=recipe, eos_ids=eos_ids, pad_id=pad_id, generator=gen
    )
    if teacher is not target_fp32:
        del target_fp32

    draft = TrainLlama(dcfg)
    draft.load_hf(dstate)
    draft.to(dev)
    train_autocast = autocast(dev)  # bf16 matmuls, fp32 master weights (CPU too, where bf16 is native)
    eval_autocast = autocast(dev) if dev.type == "cuda" else contextlib.nullcontext
    base = evaluate(draft, eval_set, None, autocast=eval_autocast())
    log(f"untrained slice {layers}: alpha={base['alpha']:.3f} over {base['eval_tokens']} answer tokens")

    budget = Budget(time.time(), minutes * 60.0)
    bar = Progress(budget, enabled=progress)

    # phase A: target-generated chat answers (greedy and sampled), with top-k labels
    bar.phase("draft: target answers")
    answers = answer_prompts(
        teacher,
        train_prompts,
        encode,
        recipe=recipe,
        rng=rng,
        deadline=budget.at(recipe.gen_frac),
        eos_ids=eos_ids,
        pad_id=pad_id,
        generator=gen,
        tick=bar.tick,
    )
    chat = answers.examples
    gen_minutes = budget.elapsed_minutes()
    log(f"{len(chat)} target answers, {answers.tokens} answer tokens in {gen_minutes:.1f} min")

    # truncated draft vocabulary from what the target emits (chat answers + labelled corpus sample)
    chunks = corpus_chunks(
        token_documents(documents, packs, tok.encode, recipe.seed), recipe.seq_len, eos_ids[0], rng
    )
    vocab, vocab_sample = choose_draft_vocab(
        recipe.draft_vocab_size, cfg.vocab_size, chat, chunks, always_kept(tok, eos_ids), dev
    )
    calib, calib_chunks = calibration_batches(teacher, chunks, chat, recipe, rng, dev)
    chunks = chain(vocab_sample + calib_chunks, chunks)
    vocab_t, vocab_map = (vocab.tensor, vocab.column) if vocab is not None else (None, None)
    norm_scale = calibrate_norm_scale(draft, calib, vocab_t, vocab_map) if calib else 1.0
    log(f"final norm rescaled by {norm_scale} (calibrated on {len(calib)} labelled batches)")
    base_v = evaluate(draft, eval_set, vocab_t, autocast=eval_autocast())

    # phase B: distillation
    result = distill(
        draft,
        teacher,
        chat,
        chunks,
        vocab,
        recipe,
        rng=rng,
        dev=dev,
        budget=budget,
        progress=bar,
        eval_set=eval_set,
        untrained_eval=base_v,
        train_autocast=train_autocast,
        eval_autocast=eval_autocast,
    )
    report.update(
        trained=True,
        minutes=round(result.minutes, 2),
        wall_minutes_total=round((time.time() - t0) / 60, 2),
        label_dtype=str(ldtype).removeprefix("torch."),
        steps=result.steps,
        tokens_seen=result.corpus_tokens + result.chat_tokens,
        distinct_labelled_tokens=result.corpus_tokens + answers.tokens,
        chat={
            "answers": len(chat),
            "answer_tokens": answers.tokens,
            "tokens_trained": result.chat_tokens,
            "generation_minutes": round(gen_minutes, 2),
            "extra_sampled_passes": answers.extra_passes,
            "prompts_available": len(train_prompts),
        },
        corpus_tokens=result.corpus_tokens,
        draft_vocab_size=len(vocab.ids) if vocab else cfg.vocab_size,
        final_norm_scale=norm_scale,
        eval={
            "prompts": len(eval_set),
            "untrained_alpha_full_vocab": base["alpha"],
            "untrained": base_v,
            "final": result.final,
            "expected_tau_chain": {
                str(g): round(expected_tau(result.final["alpha"], g), 3) for g in (2, 4, 6, 8)
            },
            "definition": ALPHA_DEFINITION,
        },
        history=result.history,
        final_loss=result.final_loss,
        skipped_nonfinite_steps=result.skipped_nonfinite,
        timing_s={k: round(v, 1) for k, v in result.timing.items()},
        torch_threads=torch.get_num_threads(),
    )
    provenance["trained"] = True
    provenance["draft_vocab"] = DRAFT_VOCAB_FILE if vocab else None
    state_out = draft.hf_state_dict()
    out = save_draft(out_dir, dcfg, state_out, target_dir, provenance, report, vocab.ids if vocab else None)
    if measure_cost:
        del teacher, draft
        t_cost = decode_cost(target_dir)
        d_cost = decode_cost(out)
        report["decode_step_seconds"] = {
            "target": t_cost,
            "draft_full_vocab": d_cost,
            "ratio": d_cost / t_cost,
        }
        rewrite_report(out, report)
    log(
        f"draft saved to {out}: alpha {result.final['alpha']:.3f} (untrained {base_v['alpha']:.3f}), "
        f"{report['tokens_seen']} tokens seen, {result.minutes:.1f} min"
    )
    return out

"""`specmesh train draft`: a speculative-decoding draft for a Llama target.

Recipe (measured on SmolLM2-135M-Instruct, see bench/prompts/README.md and train_report.json):

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
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument
from services.core.loaders.hf_dir import load_hf_dir
from services.core.model_store import (
    DRAFT_VOCAB_FILE,
    _check_name,
    count_parameters,
    model_root,
    resolve_model,
    write_manifest,
)
from services.core.tokenizer import Tokenizer
from services.draft.training.pack import load_pack, pack_documents, tokenizer_sha256
from services.draft.training.tmodel import TrainLlama, generate_batch

REPORT_FILE = "train_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


@dataclass
class DraftRecipe:
    """Everything that defines a run; saved verbatim in train_report.json."""

    num_layers: int = 4  # draft depth
    keep_last: int = 0  # how many of them come from the END of the target (the rest from the start)
    draft_vocab_size: int = 16384  # 0 = full vocabulary
    top_k: int = 16  # stored target top-k per position
    seq_len: int = 256  # corpus chunk length
    corpus_batch: int = 8  # chunks per corpus step
    chat_batch: int = 16  # answers per chat step
    gen_batch: int = 48  # prompts decoded together by the target
    max_new_tokens: int = 128  # per generated chat answer
    sample_frac: float = 0.34  # share of chat answers sampled (the rest greedy)
    temperature: float = 0.8  # for the sampled answers
    gen_frac: float = 0.4  # share of the time budget spent generating chat answers
    chat_frac: float = 0.5  # share of training steps on chat answers (the rest on corpus)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    train_embeddings: bool = False
    n_eval: int = 32  # held-out chat prompts for alpha
    eval_max_new_tokens: int = 96
    eval_every_s: float = 180.0
    seed: int = 0
    max_steps: int = 0  # stop after this many training steps (0 = when the time budget is spent)

    @classmethod
    def for_device(cls, device: torch.device, **overrides: Any) -> DraftRecipe:
        if device.type == "cuda":
            base = dict(
                seq_len=512,
                corpus_batch=64,
                chat_batch=96,
                gen_batch=384,
                max_new_tokens=192,
                gen_frac=0.3,
                chat_frac=0.4,
                lr=6e-4,
                draft_vocab_size=16384,
                n_eval=64,
                eval_every_s=60.0,
            )
        else:
            base = dict(gen_batch=96)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def layer_indices(self, target_layers: int) -> list[int]:
        n = self.num_layers
        if not 1 <= n <= target_layers:
            raise InvalidArgument(f"--layers must be in [1, {target_layers}], got {n}", field="layers")
        last = min(self.keep_last, n - 1) if n > 1 else 0
        return list(range(n - last)) + list(range(target_layers - last, target_layers))


# --- model surgery and saving ---------------------------------------------------------------------


def slice_state(state: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """HF state of a draft made of the target's `layers` (renumbered 0..n-1) + embedding/norm/head."""
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(layers):
        p = f"model.layers.{old}."
        for k, v in state.items():
            if k.startswith(p):
                out[f"model.layers.{new}." + k[len(p) :]] = v
    return out


def slice_config(cfg: LlamaConfig, n_layers: int) -> LlamaConfig:
    d = cfg.to_hf_dict()
    d["num_hidden_layers"] = n_layers
    d.pop("specmesh", None)
    return LlamaConfig.from_hf_dict(d)


def save_draft(
    out_dir: Path,
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    target_dir: Path,
    provenance: dict[str, Any],
    report: dict[str, Any],
    draft_vocab: list[int] | None = None,
) -> Path:
    """Write a standard HF Llama dir atomically (temp dir + rename): weights, config, the
    target's tokenizer files, draft_vocab.json, train_report.json, manifest.json last."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = config.to_hf_dict()
        hf["specmesh"] = provenance
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (target_dir / name).is_file():
                shutil.copyfile(target_dir / name, tmp / name)
        if draft_vocab is not None:
            vocab_doc = {
                "token_ids": draft_vocab,
                "order": "most frequent target token first; restrict the head to a prefix of this list",
                "vocab_size": config.vocab_size,
            }
            (tmp / DRAFT_VOCAB_FILE).write_text(json.dumps(vocab_doc) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        write_manifest(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-old-", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- labelled data ----------------------------------------------------------------------------------


@dataclass
class ChatExample:
    tokens: torch.Tensor  # [L] prompt + answer[:-1] (model input)
    start: int  # first labelled position (last prompt token)
    topk_ids: torch.Tensor  # [L - start, k] int32
    topk_logp: torch.Tensor  # [L - start, k] float16
    answer: list[int] = field(default_factory=list)


def generate_chat(
    target: TrainLlama,
    prompts: Sequence[list[int]],
    *,
    greedy: bool,
    recipe: DraftRecipe,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
    max_new_tokens: int | None = None,
    deadline: float | None = None,
) -> list[ChatExample]:
    gens = generate_batch(
        target,
        prompts,
        max_new_tokens=max_new_tokens or recipe.max_new_tokens,
        eos_ids=eos_ids,
        temperature=0.0 if greedy else recipe.temperature,
        top_k_store=recipe.top_k,
        generator=generator,
        pad_id=pad_id,
        deadline=deadline,
    )
    out = []
    for p, g in zip(prompts, gens, strict=True):
        if not g.tokens:
            continue
        seq = list(p) + g.tokens
        out.append(ChatExample(torch.tensor(seq[:-1]), len(p) - 1, g.topk_ids, g.topk_logp, g.tokens))
    return out


def corpus_chunks(
    token_docs: Iterator[list[int]], seq_len: int, eos_id: int, rng: random.Random, max_chunks: int = 12
) -> Iterator[list[int]]:
    """Fixed-length token chunks of documents joined by eos; each document contributes at most
    `max_chunks` chunks, from a random offset."""
    buf: list[int] = []
    for doc in token_docs:
        ids = list(doc) + [eos_id]
        span = seq_len * max_chunks
        if len(ids) > span:
            off = rng.randrange(len(ids) - span)
            ids = ids[off : off + span]
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


@torch.no_grad()
def label_tokens(target: TrainLlama, tokens: torch.Tensor, k: int, rows: int = 1024):
    """Target top-k log-probs for every position of tokens [B, T] -> ([B, T, k] int32, [B, T, k] f16)."""
    hidden = target(tokens)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, lps = [], []
    for i in range(0, flat.shape[0], rows):
        logits = target.logits(flat[i : i + rows]).float()
        top, idx = logits.topk(k, dim=-1)
        lps.append((top - logits.logsumexp(-1, keepdim=True)).half())
        ids.append(idx.int())
    B, T = tokens.shape
    return torch.cat(ids).view(B, T, k), torch.cat(lps).view(B, T, k)


def build_draft_vocab(counts: Counter, size: int, vocab: int, always: Iterable[int]) -> list[int]:
    """The `size` most frequent ids (forced ids first), frequency order, padded with unseen ids."""
    forced = [i for i in dict.fromkeys(always) if 0 <= i < vocab]
    ids = forced + [i for i, _ in counts.most_common() if i not in set(forced)]
    if len(ids) < size:
        seen = set(ids)
        ids += [i for i in range(vocab) if i not in seen][: size - len(ids)]
    return ids[:size]


# --- loss and evaluation ----------------------------------------------------------------------------


def sparse_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, vocab_map: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of draft logits [N, Vd] to the target's top-k distribution, renormalised over the
    ids the draft vocabulary holds (`vocab_map`: global id -> draft column or -1; None = identity).
    Equals KL(p_topk || q) up to a constant."""
    local = topk_ids.long() if vocab_map is None else vocab_map[topk_ids.long()]
    valid = local >= 0
    p = topk_logp.float().masked_fill(~valid, float("-inf")).softmax(-1)
    keep = valid.any(-1)
    logq = logits.float().log_softmax(-1).gather(-1, local.clamp(min=0))
    per_row = -(p * logq).masked_fill(~valid, 0.0).sum(-1)
    return per_row[keep].mean() if bool(keep.any()) else logits.sum() * 0.0


@torch.no_grad()
def evaluate(
    draft: TrainLlama,
    examples: Sequence[ChatExample],
    vocab: torch.Tensor | None,
    batch: int = 16,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """alpha = share of answer positions where the draft's argmax equals the target's greedy token
    (teacher-forced on the target's own greedy answers); `accept_t1_lb` = mean sum_x min(p, q) over
    the target's top-k (a lower bound of the T=1 acceptance rate)."""
    draft.eval()
    dev = next(draft.parameters()).device
    hit = hit_full = n = covered = 0
    acc = 0.0
    in_vocab = None
    if vocab is not None:
        in_vocab = torch.zeros(draft.config.vocab_size, dtype=torch.bool, device=dev)
        in_vocab[vocab] = True
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        T = max(len(e.tokens) for e in chunk)
        toks = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, e in enumerate(chunk):
            toks[b, : len(e.tokens)] = e.tokens
        with autocast or contextlib.nullcontext():
            hidden = draft(toks.to(dev)).float()
        for b, e in enumerate(chunk):
            h = hidden[b, e.start : len(e.tokens)]
            full = draft.logits(h).float()
            target_tok = torch.tensor(e.answer[: h.shape[0]], device=dev)
            hit_full += int((full.argmax(-1) == target_tok).sum())
            if vocab is not None:
                sub = full[:, vocab]
                pred = vocab[sub.argmax(-1)]
                q_full = torch.full_like(full, 0.0)
                q_full[:, vocab] = sub.softmax(-1)
            else:
                pred = full.argmax(-1)
                q_full = full.softmax(-1)
            hit += int((pred == target_tok).sum())
            covered += int(in_vocab[target_tok].sum()) if in_vocab is not None else len(target_tok)
            ids = e.topk_ids[: h.shape[0]].long().to(dev)
            p = e.topk_logp[: h.shape[0]].float().exp().to(dev)
            acc += float(torch.minimum(p, q_full.gather(-1, ids)).sum())
            n += h.shape[0]
    draft.train()
    return {
        "alpha": hit / max(n, 1),
        "alpha_full_vocab": hit_full / max(n, 1),
        "accept_t1_lb": acc / max(n, 1),
        "vocab_coverage": covered / max(n, 1),
        "eval_tokens": n,
    }


@torch.no_grad()
def calibrate_norm_scale(
    draft: TrainLlama,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    vocab: torch.Tensor | None,
    vocab_map: torch.Tensor | None,
    grid: Sequence[float] = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.125, 0.09, 0.0625),
) -> float:
    """Rescale the draft's final norm by the factor (from `grid`) with the lowest distillation loss.

    A slice's final norm was fitted to the target's last-layer residual stream; on an early
    layer's stream its logits are far too sharp (loss ~18 nats on SmolLM2's first 4 layers, ~8.7
    after rescaling by 1/4). Adam moves the norm weights ~lr per step, so this one-off fix saves
    thousands of steps. batches: (tokens [B, T], mask [B, T], topk ids, topk logp) on the device.
    """
    hidden = [(draft(t)[m].float(), ids[m], lps[m]) for t, m, ids, lps in batches]
    w = draft.lm_head.weight.float() if vocab is None else draft.lm_head.weight[vocab].float()
    losses = {}
    for s in grid:
        tot = 0.0
        for h, ids, lps in hidden:
            tot += float(sparse_kl((h * s) @ w.t(), ids, lps, vocab_map)) * h.shape[0]
        losses[s] = tot
    best = min(losses, key=losses.get)
    draft.model.norm.weight.mul_(best)
    return best


def expected_tau(alpha: float, gamma: int) -> float:
    """Mean tokens per verification round of a chain of `gamma` drafts with i.i.d. acceptance alpha."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def decode_cost(model_dir: Path, steps: int = 24, prompt_len: int = 32, threads: int | None = None) -> float:
    """Median seconds of one Engine decode step after a short prefill."""
    from services.core.engine import Engine

    eng = Engine.from_dir(model_dir, max_kv_tokens=4096)
    seq = eng.new_sequence()
    eng.prefill(seq, list(range(10, 10 + prompt_len)))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        eng.decode(seq, 100 + i)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


# --- the run ----------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda requested but no CUDA device is available", field="device")
    return torch.device(name)


def _label_dtype(dev: torch.device) -> torch.dtype:
    if dev.type == "cuda":
        return torch.bfloat16
    bf16_ok = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if bf16_ok else torch.float32


def _pad_batch(examples: Sequence[ChatExample], k: int):
    T = max(len(e.tokens) for e in examples)
    B = len(examples)
    toks = torch.zeros(B, T, dtype=torch.long)
    ids = torch.zeros(B, T, k, dtype=torch.int32)
    lps = torch.zeros(B, T, k, dtype=torch.float16)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        L = len(e.tokens)
        n = min(L - e.start, e.topk_ids.shape[0])
        toks[b, :L] = e.tokens
        ids[b, e.start : e.start + n] = e.topk_ids[:n]
        lps[b, e.start : e.start + n] = e.topk_logp[:n]
        mask[b, e.start : e.start + n] = True
    return toks, ids, lps, mask


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
    provenance: dict[str, Any] = {
        "kind": "draft",
        "draft_of": target_dir.name,
        "target_config_sha256": _sha256_text((target_dir / "config.json").read_text()),
        "layers_from_target": layers,
        "license": (json.loads((target_dir / "config.json").read_text()).get("specmesh") or {}).get(
            "license"
        ),
        "source": "specmesh train draft",
    }
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

    from tqdm import tqdm

    from services.draft.training import data

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
    ldtype = _label_dtype(dev)
    teacher = target_fp32 if ldtype == torch.float32 else _cast_copy(target_fp32, ldtype)

    if prompts is not None:
        pool = list(prompts)
    elif packs:
        pool = list(dict.fromkeys(q for pk in packs for q in pk.prompts))  # packs may share prompts
    else:
        pool = data.chat_prompts(seed=recipe.seed)
    if len(pool) <= recipe.n_eval:
        raise InvalidArgument(
            f"need more than n_eval={recipe.n_eval} chat prompts, got {len(pool)}", "prompts"
        )

    def encode(q: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": q}])[:512]

    eval_prompts = [encode(q) for q in pool[: recipe.n_eval]]
    train_prompts = pool[recipe.n_eval :]
    log(f"generating {len(eval_prompts)} held-out greedy target answers (fp32) on {dev}")
    eval_set = []
    for i in range(0, len(eval_prompts), recipe.gen_batch):
        eval_set += generate_chat(
            target_fp32,
            eval_prompts[i : i + recipe.gen_batch],
            greedy=True,
            recipe=recipe,
            eos_ids=eos_ids,
            pad_id=pad_id,
            generator=gen,
            max_new_tokens=recipe.eval_max_new_tokens,
        )
    if teacher is not target_fp32:
        del target_fp32

    draft = TrainLlama(dcfg)
    draft.load_hf(dstate)
    draft.to(dev)
    train_autocast = _autocast(dev)  # bf16 matmuls, fp32 master weights (CPU too, where bf16 is native)
    eval_autocast = _autocast(dev) if dev.type == "cuda" else contextlib.nullcontext
    base = evaluate(draft, eval_set, None, autocast=eval_autocast())
    log(f"untrained slice {layers}: alpha={base['alpha']:.3f} over {base['eval_tokens']} answer tokens")

    budget = minutes * 60.0
    t_budget = time.time()
    deadline = t_budget + budget
    bar = tqdm(total=int(budget), unit="s", desc="draft", disable=not progress, dynamic_ncols=True)

    def tick(**post: Any) -> None:
        bar.n = min(int(time.time() - t_budget), int(budget))
        bar.set_postfix(post, refresh=True)

    # phase A: target-generated chat answers (greedy and sampled), with top-k labels
    chat: list[ChatExample] = []
    chat_tokens = 0
    gen_deadline = t_budget + recipe.gen_frac * budget
    order = list(range(len(train_prompts)))
    rng.shuffle(order)
    cursor = 0
    passes = 0
    bar.set_description("draft: target answers")
    while time.time() < gen_deadline and train_prompts:
        if cursor >= len(order):  # every prompt answered: another pass, sampled only (new answers)
            rng.shuffle(order)
            cursor, passes = 0, passes + 1
        # sort a window of prompts by length so each decode batch has little padding
        window = [encode(train_prompts[j]) for j in order[cursor : cursor + recipe.gen_batch * 4]]
        cursor += len(window)
        window.sort(key=len)
        for i in range(0, len(window), recipe.gen_batch):
            if time.time() >= gen_deadline:
                break
            greedy = passes == 0 and rng.random() >= recipe.sample_frac
            new = generate_chat(
                teacher,
                window[i : i + recipe.gen_batch],
                greedy=greedy,
                recipe=recipe,
                eos_ids=eos_ids,
                pad_id=pad_id,
                generator=gen,
                deadline=gen_deadline,
            )
            chat += new
            chat_tokens += sum(len(e.answer) for e in new)
            tick(answers=len(chat), tokens=chat_tokens)
    gen_minutes = (time.time() - t_budget) / 60
    log(f"{len(chat)} target answers, {chat_tokens} answer tokens in {gen_minutes:.1f} min")

    # truncated draft vocabulary from what the target emits (chat answers + labelled corpus sample)
    if packs:
        token_docs = pack_documents(packs, seed=recipe.seed)
    else:
        docs = documents if documents is not None else data.corpus_documents(seed=recipe.seed)
        token_docs = (tok.encode(text) for text in docs)
    chunks = corpus_chunks(token_docs, recipe.seq_len, eos_ids[0], rng)
    counts: Counter = Counter()
    sample_chunks: list[list[int]] = []
    for e in chat:
        counts.update(e.topk_ids[:, 0].tolist())
    vocab_list: list[int] | None = None
    vocab_t = vocab_map = None
    if 0 < recipe.draft_vocab_size < cfg.vocab_size:
        for _ in range(64):
            c = next(chunks, None)
            if c is None:
                break
            sample_chunks.append(c)
            counts.update(c)
        always = [
            *eos_ids,
            *(tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>") if tok.token_to_id(t)),
        ]
        vocab_list = build_draft_vocab(counts, recipe.draft_vocab_size, cfg.vocab_size, always)
        vocab_t = torch.tensor(vocab_list, device=dev)
        vocab_map = torch.full((cfg.vocab_size,), -1, dtype=torch.long, device=dev)
        vocab_map[vocab_t] = torch.arange(len(vocab_list), device=dev)
    calib = []
    for _ in range(4):
        c = next(chunks, None)
        if c is None:
            break
        sample_chunks.append(c)
        t = torch.tensor([c], device=dev)
        calib.append((t, torch.ones_like(t, dtype=torch.bool), *label_tokens(teacher, t, recipe.top_k)))
    chunks = _chain(sample_chunks, chunks)
    if chat:
        c_toks, c_ids, c_lps, c_mask = (
            x.to(dev) for x in _pad_batch(rng.sample(chat, min(8, len(chat))), recipe.top_k)
        )
        calib.append((c_toks, c_mask, c_ids, c_lps))
    norm_scale = calibrate_norm_scale(draft, calib, vocab_t, vocab_map) if calib else 1.0
    log(f"final norm rescaled by {norm_scale} (calibrated on {len(calib)} labelled batches)")
    base_v = evaluate(draft, eval_set, vocab_t, autocast=eval_autocast())

    # phase B: distillation
    draft.requires_grad_(True)
    if not recipe.train_embeddings:
        draft.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    bar.set_description("draft: distill")
    t_train = time.time()
    train_budget = max(deadline - t_train, 1e-3)
    step = corpus_tokens = chat_trained = 0
    next_eval = time.time() + recipe.eval_every_s
    history = [{"t_min": round((time.time() - t_budget) / 60, 2), "step": 0, "tokens": 0, **base_v}]
    chat_order: list[int] = []
    timing = {"data_s": 0.0, "label_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    ema = None
    corpus_done = False
    skipped = 0
    while time.time() < deadline and not (recipe.max_steps and step >= recipe.max_steps):
        use_chat = chat and (corpus_done or rng.random() < recipe.chat_frac)
        t_data = time.time()
        if use_chat:
            if len(chat_order) < recipe.chat_batch:
                chat_order += rng.sample(range(len(chat)), len(chat))
            batch = [chat[chat_order.pop()] for _ in range(min(recipe.chat_batch, len(chat)))]
            toks, ids, lps, mask = _pad_batch(batch, recipe.top_k)
            toks, ids, lps, mask = toks.to(dev), ids.to(dev), lps.to(dev), mask.to(dev)
            chat_trained += int(mask.sum())
        else:
            rows = [c for c in (next(chunks, None) for _ in range(recipe.corpus_batch)) if c is not None]
            if not rows:
                corpus_done = True
                if not chat:
                    break
                continue
            toks = torch.tensor(rows, device=dev)
            t_label = time.time()
            timing["data_s"] += t_label - t_data
            ids, lps = label_tokens(teacher, toks, recipe.top_k)
            t_data = time.time()
            timing["label_s"] += t_data - t_label
            mask = torch.ones(toks.shape, dtype=torch.bool, device=dev)
            corpus_tokens += toks.numel()
        t_step = time.time()
        if use_chat:
            timing["data_s"] += t_step - t_data
        frac = (time.time() - t_train) / train_budget
        lr = (
            recipe.lr
            * min(1.0, (step + 1) / recipe.warmup_steps)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        with train_autocast():
            hidden = draft(toks)
            h = hidden[mask]
            logits = draft.logits(h, vocab_t)
        loss = sparse_kl(logits, ids[mask], lps[mask], vocab_map)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lv = loss.item()
        if not (math.isfinite(lv) and math.isfinite(float(gnorm))):
            skipped += 1  # one non-finite batch must not poison the weights
            continue
        opt.step()
        step += 1
        timing["train_s"] += time.time() - t_step
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        tick(
            loss=f"{ema:.3f}",
            chat_tok=chat_trained,
            corpus_tok=corpus_tokens,
            alpha=f"{history[-1]['alpha']:.3f}",
        )
        if time.time() >= next_eval and time.time() < deadline - 30:
            t_ev = time.time()
            ev = evaluate(draft, eval_set, vocab_t, autocast=eval_autocast())
            timing["eval_s"] += time.time() - t_ev
            history.append(
                {
                    "t_min": round((time.time() - t_budget) / 60, 2),
                    "step": step,
                    "tokens": corpus_tokens + chat_trained,
                    "loss": ema,
                    **ev,
                }
            )
            bar.write(
                f"[{history[-1]['t_min']:.1f} min] step {step} loss {ema:.3f} alpha {ev['alpha']:.3f} "
                f"(full vocab {ev['alpha_full_vocab']:.3f}) accept@T1>={ev['accept_t1_lb']:.3f}"
            )
            next_eval = time.time() + recipe.eval_every_s
    bar.n = int(budget)
    bar.close()
    final = evaluate(draft, eval_set, vocab_t, autocast=eval_autocast())
    total_min = (time.time() - t_budget) / 60
    history.append(
        {"t_min": round(total_min, 2), "step": step, "tokens": corpus_tokens + chat_trained, **final}
    )
    distinct = corpus_tokens + chat_tokens
    report.update(
        trained=True,
        minutes=round(total_min, 2),
        wall_minutes_total=round((time.time() - t0) / 60, 2),
        label_dtype=str(ldtype).removeprefix("torch."),
        steps=step,
        tokens_seen=corpus_tokens + chat_trained,
        distinct_labelled_tokens=distinct,
        chat={
            "answers": len(chat),
            "answer_tokens": chat_tokens,
            "tokens_trained": chat_trained,
            "generation_minutes": round(gen_minutes, 2),
            "extra_sampled_passes": passes,
            "prompts_available": len(train_prompts),
        },
        corpus_tokens=corpus_tokens,
        draft_vocab_size=len(vocab_list) if vocab_list else cfg.vocab_size,
        final_norm_scale=norm_scale,
        eval={
            "prompts": len(eval_set),
            "untrained_alpha_full_vocab": base["alpha"],
            "untrained": base_v,
            "final": final,
            "expected_tau_chain": {str(g): round(expected_tau(final["alpha"], g), 3) for g in (2, 4, 6, 8)},
            "definition": "alpha: greedy agreement of the draft's next token with the target's greedy chat "
            "answers on held-out prompts (teacher-forced); accept_t1_lb: sum_x min(p,q) over the "
            "target's top-k, a lower bound of the T=1 acceptance rate",
        },
        history=history,
        final_loss=ema,
        skipped_nonfinite_steps=skipped,
        timing_s={k: round(v, 1) for k, v in timing.items()},
        torch_threads=torch.get_num_threads(),
    )
    provenance["trained"] = True
    provenance["draft_vocab"] = DRAFT_VOCAB_FILE if vocab_list else None
    state_out = draft.hf_state_dict()
    out = save_draft(out_dir, dcfg, state_out, target_dir, provenance, report, vocab_list)
    if measure_cost:
        del teacher, draft
        t_cost = decode_cost(target_dir)
        d_cost = decode_cost(out)
        report["decode_step_seconds"] = {
            "target": t_cost,
            "draft_full_vocab": d_cost,
            "ratio": d_cost / t_cost,
        }
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(out)
    log(
        f"draft saved to {out}: alpha {final['alpha']:.3f} (untrained {base_v['alpha']:.3f}), "
        f"{report['tokens_seen']} tokens seen, {total_min:.1f} min"
    )
    return out


def _autocast(dev: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if dev.type == "cuda" or _label_dtype(dev) == torch.bfloat16:
        return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _cast_copy(model: TrainLlama, dtype: torch.dtype) -> TrainLlama:
    m = TrainLlama(model.config)
    m.load_state_dict(model.state_dict())
    return m.to(next(model.parameters()).device, dtype).eval().requires_grad_(False)


def _chain(first: list[list[int]], rest: Iterator[list[int]]) -> Iterator[list[int]]:
    yield from first
    yield from rest


def _sha256_text(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()

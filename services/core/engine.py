"""Engine: one loaded model, its KV block pool, and the forward passes services need.

Every method takes sequences (SequenceKV) and token ids and returns logits; sessions,
sampling and stop rules live with the callers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from kernels.linear import BUCKET_ROWS, PATHS
from kernels.linear_choice import choose_plans, machine_key, shape_name
from services.core.attention_batch import AttentionBatch
from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument, OutOfRange
from services.core.kv import BlockPool, SequenceKV
from services.core.model import LlamaModel, SmallBatchLinear
from services.core.model_store import count_parameters
from services.core.spec import ancestor_mask, tree_depths, validate_tree


class BlockSource(Protocol):
    """Sealed blocks computed elsewhere (services.runtime.kv_store: Redis)."""

    def fetch(self, pool: BlockPool, keys: list[bytes]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) [layers, kv_heads, block_size, head_dim] of the longest run of `keys` found, in
        order: stops at the first miss, so the result is a prefix of `keys`."""
        ...


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        *,
        name: str = "model",
        digest: str = "",
        block_size: int = 16,
        max_kv_tokens: int = 65536,
        prefix_cache_tokens: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.name = name
        self.digest = digest
        self.vocab_ids: torch.Tensor | None = None  # set by restrict_vocab: logits column -> token id
        self.packed_bytes = 0  # memory held by oneDNN-packed weight copies (pack_weights)
        self.int8_bytes = 0  # memory held by int8 weight copies (quantize_int8)
        self.linear_choice: dict[str, Any] = {}  # matmul paths chosen by choose_linear_paths
        self.weights = "fp32"  # or "q4_1" (use_q4_weights)
        # The dtype attention computes in (None: the model's): float64 under q4_1, see use_q4_weights.
        self.attention_dtype: torch.dtype | None = None
        # Set by services.runtime.batching: merges concurrent callers' forwards into one.
        self.forward_hook = None
        dtype = next(model.parameters()).dtype
        # Preallocated at max_kv_tokens: virtual memory on CPU until used (see BlockPool), device
        # memory at once elsewhere.
        self.pool = BlockPool(
            self.config,
            block_size=block_size,
            max_blocks=max(1, max_kv_tokens // block_size),
            dtype=dtype,
            device=self.device,
            digest=digest,
            # unreferenced sealed blocks kept for prefix reuse (None: as many as the pool holds)
            max_cached_blocks=None if prefix_cache_tokens is None else prefix_cache_tokens // block_size,
        )
        self.remote: BlockSource | None = None  # consulted by prefill_cached after the pool

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, name: str | None = None, **kw
    ) -> Engine:
        from services.core.loaders.hf_dir import load_hf_dir

        model_dir = Path(model_dir)
        config, state = load_hf_dir(model_dir)
        with torch.device("meta"):
            model = LlamaModel(config)
        model.load_hf_state_dict({k: v.to(dtype) for k, v in state.items()})
        return cls(model, name=name or model_dir.name, digest=weights_digest(model_dir), **kw)

    @classmethod
    def from_config(cls, config: LlamaConfig, *, seed: int = 0, **kw) -> Engine:
        """Random weights (tests of the math only)."""
        torch.manual_seed(seed)
        model = LlamaModel(config)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return cls(model, **kw)

    def pack_weights(self) -> int:
        """Keep a oneDNN-packed copy of every projection (CPU fp32; see model.linear) so that
        verification and draft-tree forwards of 3 to 16 tokens cost little more than a decode
        step, and larger ones (big trees, prefill) less than through F.linear. Costs a second
        copy of the projection weights; returns its bytes."""
        self.packed_bytes = sum(m.pack() for m in self.model.modules() if isinstance(m, SmallBatchLinear))
        return self.packed_bytes

    def use_q4_weights(self, model_dir: Path) -> int:
        """Serve the projections from the model's published 4-bit weights (q4_1.safetensors in
        the store; see services.core.quant) with bf16 activations: another weights
        configuration, so its KV never shares blocks with the fp32 one. Returns the
        projections switched (0 where the CPU int4 kernel is missing).

        Attention then computes in float64: rounding its fp32 output to bf16 at the next
        product would otherwise amplify the ulp-level differences between a decode step and a
        verification forward into different greedy tokens (kernels.attention). Measured on the
        2-core Xeon over 8 benchmark prompts, 48 tokens each: decode vs tree-verify logits
        differed by up to 0.50 with 2 argmax flips in fp32, 7e-5 and none in float64; a decode
        step at a 300-token context costs 20.9 ms instead of 19.6 (7% more)."""
        from services.core.quant import Q4_FILE, load_q4

        switched = self.model.use_q4_weights(load_q4(Path(model_dir) / Q4_FILE))
        if switched:
            self.weights = "q4_1"
            self.attention_dtype = torch.float64
            self.pool.rename(self.digest + "+q4_1")
        return switched

    def choose_linear_paths(self, cache_file: Path | None = None) -> dict[str, Any]:
        """Give every fp32 projection the matmul path per row bucket measured fastest on this
        machine (kernels.linear_choice; cached in cache_file). Call after pack_weights, on the
        engine thread. SPECMESH_LINEAR_PATH=linear|mm_t|packed forces one path everywhere,
        `default` keeps the built-in plan. Returns what was chosen (also in self.linear_choice)."""
        layers = [
            m
            for m in self.model.modules()
            if isinstance(m, SmallBatchLinear) and m.int8 is None and m.int4 is None
        ]
        if self.device.type != "cpu" or not layers:
            return {}
        forced = os.environ.get("SPECMESH_LINEAR_PATH", "auto").strip().lower() or "auto"
        if forced not in (*PATHS, "default", "auto"):
            raise ValueError(
                f"SPECMESH_LINEAR_PATH={forced!r}: expected auto, default or one of {', '.join(PATHS)}"
            )
        choice: dict[str, Any] = {
            "source": forced,
            "machine": machine_key(),
            "bucket_rows": list(BUCKET_ROWS),
        }
        if forced != "auto":
            for m in layers:
                m.plan = None if forced == "default" else (forced,) * len(BUCKET_ROWS)
        else:
            shapes = sorted({tuple(m.weight.shape) for m in layers})
            packed = all(m.packed is not None for m in layers)
            choices, choice["source"] = choose_plans(shapes, packed, cache_file)
            for m in layers:
                m.plan = choices[tuple(m.weight.shape)].plan
            choice["plans"] = {shape_name(s): list(c.plan) for s, c in choices.items()}
            choice["timings_us"] = {shape_name(s): c.timings_us for s, c in choices.items()}
        self.linear_choice = choice
        return choice

    def quantize_int8(self) -> int:
        """Compute every projection, the head included, with int8 weights (see
        model.int8_weight): for drafts, whose outputs need not equal the fp32 model's. Returns
        the int8 copies' bytes (0 where the quantized CPU kernels are unavailable)."""
        layers = [m for m in self.model.modules() if isinstance(m, SmallBatchLinear)]
        self.int8_bytes = sum(m.quantize_int8() for m in layers)
        if self.int8_bytes:  # other KV than the fp32 weights give: never share blocks with it
            self.pool.rename(self.digest + "+int8")
        return self.int8_bytes

    def restrict_vocab(self, token_ids: list[int]) -> None:
        """Compute logits only for `token_ids` (a draft's truncated vocabulary): every logits
        tensor this engine returns is then [..., len(token_ids)], column j meaning token_ids[j].
        Drafts stay lossless: they sample from, and report, the distribution over this subset."""
        if not token_ids or len(set(token_ids)) != len(token_ids):
            raise InvalidArgument("needs distinct token ids", "vocab")
        self.check_tokens(token_ids, "vocab")
        ids = torch.tensor(token_ids, dtype=torch.long)
        weight = self.model.lm_head.weight.detach()[ids.to(self.device)].clone()
        head = SmallBatchLinear(weight.shape[1], len(token_ids))
        head.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.model.lm_head = head
        self.vocab_ids = ids
        if self.packed_bytes:
            self.pack_weights()
        if self.int8_bytes:
            self.quantize_int8()

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def new_sequence(self) -> SequenceKV:
        return SequenceKV(self.pool)

    def check_tokens(self, ids: list[int], field: str) -> None:
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise OutOfRange(f"token id {t} at index {i} is outside the vocabulary [0, {vocab})", field)

    def check_room(self, current: int, adding: int, field: str) -> None:
        if current + adding > self.max_context:
            raise OutOfRange(
                f"{current} + {adding} tokens exceed the model context of {self.max_context}", field
            )

    def forward(
        self, seqs: list[SequenceKV], token_lists: list[list[int]], **kw
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """forward_now(), or, when a batcher is attached (services.runtime.batching), the same
        result computed in one forward with other callers' sequences."""
        if self.forward_hook is not None:
            return self.forward_hook(seqs, token_lists, **kw)
        return self.forward_now(seqs, token_lists, **kw)

    @torch.inference_mode()
    def forward_now(
        self,
        seqs: list[SequenceKV],
        token_lists: list[list[int]],
        *,
        positions: list[list[int]] | None = None,
        tree_masks: list[torch.Tensor | None] | None = None,
        logit_rows: list[list[int]] | None = None,
        last_only: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Append token_lists[b] to seqs[b] in one batched forward.

        Returns per-sequence logits and final hidden states [n_b, hidden], on the CPU whatever
        the engine's device (callers sample and serialise there). Logits are [n_b, V], or only
        the rows logit_rows[b] (indices into token_lists[b]; last_only = the last row), which
        skips the vocabulary projection where nobody needs it. Positions default to
        consecutive; given ones are relative to each sequence's committed length. tree_masks:
        see AttentionBatch.build (those tokens become tree nodes in scratch, not committed).
        """
        n_new = [len(t) for t in token_lists]
        if min(n_new) < 1:
            raise InvalidArgument("every sequence in a forward needs at least one token", "tokens")
        T = max(n_new)
        try:
            batch = AttentionBatch.build(seqs, token_lists, tree_masks, self.attention_dtype)
        except BaseException:  # e.g. the pool is full for a later sequence of the batch
            for s in seqs:
                s.truncate(s.length)
            raise
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)  # [B, T], built on the CPU, moved once
        pos = torch.zeros(len(seqs), T, dtype=torch.long)  # [B, T]
        for b, ids in enumerate(token_lists):
            tokens[b, : len(ids)] = torch.tensor(ids)
            rel = positions[b] if positions is not None else range(len(ids))
            pos[b, : len(ids)] = torch.tensor(list(rel)) + batch.past[b]
            pos[b, len(ids) :] = pos[b, len(ids) - 1]
        if last_only:
            logit_rows = [[n - 1] for n in n_new]
        flat = None
        if logit_rows is not None:
            flat = torch.tensor([b * T + r for b, rs in enumerate(logit_rows) for r in rs], dtype=torch.long)
            flat = flat.to(self.device)
        try:
            logits, hidden = self.model(tokens.to(self.device), pos.to(self.device), batch, logit_rows=flat)
        except BaseException:
            for s in seqs:  # nothing was committed: return the blocks reserved for this forward
                s.truncate(s.length)
            raise
        batch.commit()
        logits, hidden = logits.cpu(), hidden.cpu()  # no-ops on the CPU
        if logit_rows is not None:
            per_seq = list(logits.split([len(rs) for rs in logit_rows]))
        else:
            per_seq = [logits[b, :n] for b, n in enumerate(n_new)]
        return per_seq, [hidden[b, :n] for b, n in enumerate(n_new)]

    def prefill(self, seq: SequenceKV, ids: list[int]) -> torch.Tensor:
        """Append ids; return the next-token logits [V]."""
        return self.forward([seq], [ids], last_only=True)[0][0][0]

    def prefill_cached(self, seq: SequenceKV, ids: list[int]) -> tuple[torch.Tensor, int]:
        """prefill(), first adopting cached blocks for a prefix of ids (see adopt_cached).
        Returns the next-token logits [V] and how many tokens came from a cache. The last token
        is always computed: its logits are the result."""
        cached = self.adopt_cached(seq, ids)
        return self.prefill(seq, ids[cached:]), cached

    def adopt_cached(self, seq: SequenceKV, ids: list[int]) -> int:
        """Append cached full blocks for the longest block-aligned prefix of ids, leaving at
        least one token to compute, so sessions with a common prefix share those blocks (see
        SequenceKV.adopt_cached): the pool's own first, then the blocks that follow from
        `remote` (another replica computed them). Returns how many tokens were adopted."""
        cached = seq.adopt_cached(ids)
        if self.remote is not None:
            keys = seq.continuation_keys(ids[cached:])
            found = self.remote.fetch(self.pool, keys) if keys else []
            if found:
                for key, (k, v) in zip(keys, found, strict=False):  # found: a prefix of keys
                    if not self.pool.insert_cached(key, k, v):
                        break
                cached += seq.adopt_cached(ids[cached:])
        return cached

    def extend(self, seq: SequenceKV, ids: list[int]) -> torch.Tensor:
        """Append ids; return logits at every new position [n, V]."""
        return self.forward([seq], [ids])[0][0]

    def decode(self, seq: SequenceKV, token: int) -> torch.Tensor:
        return self.forward([seq], [[token]])[0][0][0]

    def forward_tree(
        self,
        seq: SequenceKV,
        tokens: list[int],
        parents: list[int],
        *,
        logit_rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward new tree nodes after the committed tokens: (logits, hidden) of the new nodes.

        `parents` describes the whole tree, whose first seq.scratch_len nodes are already in
        the sequence's scratch; the new nodes are its last len(tokens) entries, so a tree can
        grow level by level. Node i sits at position length + depth(i) and attends to the
        committed tokens, its ancestors and itself; its KV lands in scratch slot i. Keep a path
        with `accept_path` or drop the tree with seq.truncate(seq.length) (or drop_scratch).
        logit_rows: indices among the new nodes (default all).
        """
        validate_tree(parents)
        n_old = seq.scratch_len
        if n_old + len(tokens) != len(parents):
            raise InvalidArgument(
                f"tree has {len(parents)} nodes but {n_old} are cached and {len(tokens)} are new",
                "tree.parents",
            )
        depths = tree_depths(parents)[n_old:]
        mask = ancestor_mask(parents)[n_old:]  # [new, all tree nodes]
        logits, hidden = self.forward(
            [seq],
            [tokens],
            positions=[depths],
            tree_masks=[mask],
            logit_rows=None if logit_rows is None else [logit_rows],
        )
        return logits[0], hidden[0]

    def accept_path(self, seq: SequenceKV, nodes: list[int]) -> None:
        """Commit tree nodes `nodes` (indices into the tree, root to node) after the committed
        tokens, copying their KV out of scratch, and drop the rest of the tree."""
        seq.accept_scratch(nodes)

    def parameter_count(self) -> int:
        """Parameters of the model its config defines, what `specmesh models list` reports: a
        copy made at load time (a draft's restricted head, rows of the tied embedding) is no
        parameter of its own (it made the draft's ModelInfo say 51.9M against the list's 42.5M)."""
        return count_parameters(self.config)


def weights_digest(model_dir: Path) -> str:
    """sha256 identifying the weights: of manifest.json when present, else of config + tensor files."""
    manifest = model_dir / "manifest.json"
    h = hashlib.sha256()
    if manifest.exists():
        h.update(manifest.read_bytes())
    else:
        h.update(json.dumps(json.loads((model_dir / "config.json").read_text()), sort_keys=True).encode())
        for f in sorted(model_dir.glob("*.safetensors")):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    return h.hexdigest()

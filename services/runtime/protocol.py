"""Protobuf <-> domain conversions shared by every servicer (no torch on this path)."""

from __future__ import annotations

from services.core.errors import InvalidArgument, OutOfRange
from services.core.params import GenerationParams, KVBudget, SamplingConfig
from services.core.tokenizer import Tokenizer
from specmesh.v1 import common_pb2

FINISH_TO_PROTO = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos": common_pb2.FINISH_REASON_EOS,
    "stop_string": common_pb2.FINISH_REASON_STOP_STRING,
}


def sampling_config(pb: common_pb2.SamplingParams) -> SamplingConfig:
    # Unset top_p arrives as 0, which (like 1) means "off".
    return SamplingConfig(temperature=pb.temperature, top_k=pb.top_k, top_p=pb.top_p or 1.0)


def generation_params(pb: common_pb2.SamplingParams, seed: int | None = None) -> GenerationParams:
    return GenerationParams(
        sampling=sampling_config(pb),
        max_new_tokens=pb.max_new_tokens,
        stop_strings=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        seed=pb.seed if pb.HasField("seed") else seed,
    )


def prompt_ids(
    pb: common_pb2.Prompt, tokenizer: Tokenizer, field: str = "prompt", max_tokens: int | None = None
) -> list[int]:
    """Token ids of a Prompt; text and chat go through the model's tokenizer / chat template.

    With `max_tokens`, text too long to fit in that many tokens is refused (OUT_OF_RANGE) before
    it is tokenized, so a huge prompt costs a length check, not seconds of tokenization.
    """
    kind = pb.WhichOneof("kind")
    if max_tokens is not None and kind in ("text", "chat"):
        chars = len(pb.text) if kind == "text" else sum(len(m.content) for m in pb.chat.messages)
        limit = max_tokens * tokenizer.max_token_bytes
        if chars > limit:
            raise OutOfRange(
                f"{chars} characters cannot fit in the model context of {max_tokens} tokens "
                f"(at most {limit} characters)",
                f"{field}.{kind}",
            )
    if kind is None:
        raise InvalidArgument("is empty: set text, token_ids or chat", field)
    if kind == "text":
        if not pb.text:
            raise InvalidArgument("text is empty", f"{field}.text")
        return tokenizer.encode(pb.text)
    if kind == "chat":
        if not pb.chat.messages:
            raise InvalidArgument("chat has no messages", f"{field}.chat.messages")
        for i, m in enumerate(pb.chat.messages):
            if m.role not in ("system", "user", "assistant"):
                raise InvalidArgument(
                    f"message {i} has role {m.role!r}; use system, user or assistant",
                    f"{field}.chat.messages",
                )
        return tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in pb.chat.messages])
    ids = list(pb.token_ids.ids)
    if not ids:
        raise InvalidArgument("token_ids is empty", f"{field}.token_ids.ids")
    return ids


def kv_budget(pb: common_pb2.KVBudget, prefix: str = "kv_budget") -> KVBudget:
    return KVBudget.checked(pb.max_tokens, pb.recent_share, prefix)

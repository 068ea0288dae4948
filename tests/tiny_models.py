"""Tiny random-weight Llama configs for testing the math (never what a user sees)."""

from services.core.config import LlamaConfig


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    base.update(overrides)
    return LlamaConfig(**base)

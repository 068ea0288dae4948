"""Tokenizer, chat template and streaming detokenization.

The gateway imports this module, so it must never import torch (directly or through
`services.core` siblings): only `tokenizers` (Rust) and jinja2.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from services.core.errors import InvalidArgument, NotFound


class _TemplateRaised(Exception):
    """Raised by a template's own `raise_exception(...)`; its message is meant for the caller."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # HF's tojson keeps non-ASCII characters as-is (jinja's default escapes them and HTML).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_str(v: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or AddedToken dicts.
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


# Key of the effective tokenizer config that carries generation_config.json's eos ids (not a
# tokenizer_config.json key in HF's layout; read_tokenizer_sources folds them in).
GENERATION_EOS_KEY = "generation_eos_token_id"


def read_tokenizer_sources(model_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """A model directory's tokenizer.json text and its effective tokenizer config:
    tokenizer_config.json with ``chat_template.jinja`` (newer HF layout) folded into
    ``chat_template`` and generation_config.json's ``eos_token_id`` under `GENERATION_EOS_KEY`."""
    d = Path(model_dir)
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise NotFound(f"{d} has no tokenizer.json", field="model_dir")
    cfg_path = d / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if (d / "chat_template.jinja").is_file():
        cfg["chat_template"] = (d / "chat_template.jinja").read_text()
    gen_path = d / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if eos is not None:
            cfg[GENERATION_EOS_KEY] = eos
    return tj.read_text(encoding="utf-8"), cfg


def encode_sources(tokenizer: Tokenizer) -> tuple[bytes, bytes, str]:
    """(tokenizer.json bytes, effective config JSON bytes, their sha256) for the wire."""
    text, cfg = tokenizer.sources()
    tj, cj = text.encode("utf-8"), json.dumps(cfg, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return tj, cj, sources_sha256(tj, cj)


def sources_sha256(tokenizer_json: bytes, tokenizer_config_json: bytes) -> str:
    """Hex sha256 of tokenizer_json, a NUL byte (JSON text never holds one raw), then the config."""
    return hashlib.sha256(tokenizer_json + b"\0" + tokenizer_config_json).hexdigest()


def decode_sources(tokenizer_json: bytes, tokenizer_config_json: bytes, sha256: str) -> Tokenizer:
    """Rebuild a tokenizer from `encode_sources`' output, refusing one whose digest differs."""
    got = sources_sha256(tokenizer_json, tokenizer_config_json)
    if got != sha256:
        raise InvalidArgument(f"tokenizer sha256 mismatch: got {got}, expected {sha256}", field="sha256")
    try:
        cfg = json.loads(tokenizer_config_json.decode("utf-8")) if tokenizer_config_json else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"tokenizer config is not JSON: {e}", field="tokenizer_config_json") from e
    if not isinstance(cfg, dict):
        raise InvalidArgument("tokenizer config is not a JSON object", field="tokenizer_config_json")
    return Tokenizer.from_json(tokenizer_json.decode("utf-8", errors="replace"), cfg)


class Tokenizer:
    """A HF `tokenizer.json` plus the bits of `tokenizer_config.json` that generation needs."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        model_max_length: int | None = None,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.model_max_length = model_max_length
        ids = [self.token_to_id(eos_token)] if eos_token else []
        ids += list(extra_eos_token_ids)
        # Order-preserving de-dup; the primary eos (tokenizer_config) comes first.
        self._eos_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        self._sources: tuple[str, dict[str, Any]] | None = None  # set by from_json

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ generation_config.json eos ids if present)."""
        return cls.from_json(*read_tokenizer_sources(model_dir))

    @classmethod
    def from_json(cls, tokenizer_json: str, tokenizer_config: dict[str, Any]) -> Tokenizer:
        """Build from a ``tokenizer.json`` text and the effective tokenizer config (see
        :func:`read_tokenizer_sources`): what `from_dir` reads, or what a target serves."""
        cfg = tokenizer_config
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF's named-template form
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        eos = cfg.get(GENERATION_EOS_KEY)
        extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
        max_len = cfg.get("model_max_length")
        try:
            backend = _HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises a plain Exception
            raise InvalidArgument(f"tokenizer.json does not parse: {e}", field="tokenizer_json") from e
        tok = cls(
            backend,
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            unk_token=_token_str(cfg.get("unk_token")),
            extra_eos_token_ids=extra_eos,
            # HF writes a huge sentinel when unknown; treat that as "no limit".
            model_max_length=int(max_len) if isinstance(max_len, int | float) and max_len < 1e12 else None,
        )
        tok._sources = (tokenizer_json, dict(cfg))
        return tok

    def sources(self) -> tuple[str, dict[str, Any]]:
        """(tokenizer.json text, effective config) that `from_json` rebuilds this tokenizer from."""
        if self._sources is not None:
            return self._sources
        cfg: dict[str, Any] = {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "model_max_length": self.model_max_length,
            GENERATION_EOS_KEY: list(self._eos_ids),
        }
        return self._tok.to_str(), {k: v for k, v in cfg.items() if v is not None}

    # --- vocabulary -------------------------------------------------------------------------

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes one token stands for: a text longer than
        ``n * max_token_bytes`` characters cannot fit in n tokens (checked before encoding)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # byte-level BPE spells each byte as one character (at most 2 UTF-8 bytes); other
        # models' pieces are text; a normaliser may expand, hence the factor 4
        return 4 * max((len(t.encode()) for t in vocab), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    # --- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgument(f"text must be a string, got {type(text).__name__}", field="text")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int], field: str = "token_ids") -> list[int]:
        """Plain-int copy of `ids`; rejects ids outside the vocabulary (the backend would drop them)."""
        n = self.vocab_size
        out: list[int] = []
        for i in ids:
            try:
                v = operator.index(i)  # accepts numpy ints, rejects floats
            except TypeError:
                raise InvalidArgument(f"token id {i!r} is not an integer", field=field) from None
            if not 0 <= v < n:
                raise InvalidArgument(f"token id {v} is outside the vocabulary [0, {n})", field=field)
            out.append(v)
        return out

    # --- chat -------------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> Any:
        if not self.chat_template:
            raise InvalidArgument("this model has no chat template", field="messages")
        # Same rendering settings as HF's apply_chat_template, so prompts match token for token.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render messages ([{"role": ..., "content": ...}]) into the model's prompt text."""
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument("messages must be a non-empty list", field="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise InvalidArgument(f"message {i} needs a string 'role' and a 'content'", field="messages")
        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except _TemplateRaised as e:
            raise InvalidArgument(f"chat template rejected the messages: {e}", field="messages") from e
        except (TemplateError, TypeError) as e:
            raise InvalidArgument(f"chat template failed to render: {e}", field="messages") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The rendered template already contains its special tokens as text; don't add more.
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas whose concatenation equals a full decode.

    Decodes a short window (already-emitted tail + new ids) and emits only what the new
    ids add. While the window ends in U+FFFD, a multi-byte UTF-8 character is split across
    tokens, so nothing is emitted until its remaining bytes arrive (or `flush()`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: context so token-boundary effects decode identically
        self._read = 0  # ids before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def feed(self, token_id: int) -> str:
        return self.feed_many([token_id])

    def feed_many(self, token_ids: Iterable[int]) -> str:
        self.ids.extend(self._tok.check_ids(token_ids))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Emit whatever is pending (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the earliest stop string begins, or None.

    `start` lets a streaming caller search only new text: pass the previous text length;
    the search begins early enough to catch a stop string straddling the boundary.
    """
    best: int | None = None
    for s in stop_strings:
        if not s:
            raise InvalidArgument("stop strings must be non-empty", field="stop")
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string.

    A streamer should hold back that many characters: they may turn out to begin a stop string.
    """
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best

"""llama.cpp's native decode as a baseline for `specmesh bench decode`: its `llama-bench` on the
GGUF the model store's weights came from, with the same thread count.

`llama-bench` is an optional benchmark tool, never a runtime dependency: build it with
`bench/tools/build_llama_bench.sh` (from the source vendored in the llama-cpp-python sdist).
Its text-generation test (`-n N`) decodes N tokens one at a time after an empty context and its
prompt test (`-p N`) prefills N tokens in one batch; both report mean tokens/s over `-r`
repetitions with their standard deviation. Our decode rate is measured after a chat prompt of
30-60 tokens, so llama.cpp's starts from a slightly shorter context (its per-token cost grows
with the context, so this favours it a little).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

ENV_BINARY = "SPECMESH_LLAMA_BENCH"
DEFAULT_BINARY = Path.home() / ".cache" / "specmesh" / "tools" / "llama.cpp" / "llama-bench"
BUILD_HINT = "build it with bench/tools/build_llama_bench.sh (about 6 minutes on 2 cores)"


def find_llama_bench(explicit: str | None = None) -> str | None:
    """`explicit`, else $SPECMESH_LLAMA_BENCH, else the build script's default output, else PATH."""
    for candidate in (explicit, os.environ.get(ENV_BINARY), str(DEFAULT_BINARY)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("llama-bench")


def source_gguf(model_dir: Path, explicit: Path | None = None) -> tuple[Path | None, str]:
    """The GGUF the model's weights were imported from (checked by the sha256 its config.json
    records), or (None, why not)."""
    from services.core.model_import import find_smollm2_gguf

    recorded = json.loads((model_dir / "config.json").read_text()).get("specmesh", {}).get("gguf_sha256")
    candidate = explicit
    if candidate is None:
        try:
            candidate = find_smollm2_gguf(install=False)
        except Exception as exc:  # NotFound: the package is not installed
            return None, f"no GGUF found ({exc})"
    digest = _sha256(candidate)
    if recorded and digest != recorded:
        return None, f"{candidate} (sha256 {digest[:12]}) is not the GGUF {model_dir.name} was imported from"
    return candidate, "same GGUF as the model store's weights" if recorded else "GGUF given, not checked"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_results(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """llama-bench's `-o json` list -> decode and prefill tokens/s (mean and stddev)."""
    out: dict[str, Any] = {}
    for e in entries:
        if e.get("n_gen", 0) > 0 and e.get("n_prompt", 0) == 0:
            out |= {
                "tokens_per_s_decode": e["avg_ts"],
                "tokens_per_s_decode_stddev": e["stddev_ts"],
                "decode_tokens": e["n_gen"],
            }
        elif e.get("n_prompt", 0) > 0 and e.get("n_gen", 0) == 0:
            out |= {
                "tokens_per_s_prefill": e["avg_ts"],
                "tokens_per_s_prefill_stddev": e["stddev_ts"],
                "prefill_tokens": e["n_prompt"],
            }
        for key in ("build_commit", "build_number", "cpu_info", "model_type", "n_threads", "type_k"):
            if key in e:
                out.setdefault(key, e[key])
    if "tokens_per_s_decode" not in out:
        raise ValueError("llama-bench reported no text-generation test")
    return out


def run_llama_bench(
    binary: str, gguf: Path, threads: int, n_gen: int = 64, n_prompt: int = 64, repetitions: int = 3
) -> dict[str, Any]:
    """One llama-bench run (prefill n_prompt, decode n_gen, `repetitions` each) -> parse_results
    plus the command line."""
    argv = [binary, "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen)]
    argv += ["-r", str(repetitions), "-o", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"llama-bench exited with {done.returncode}: {' | '.join(tail)}")
    return parse_results(json.loads(done.stdout)) | {"command": " ".join(argv)}

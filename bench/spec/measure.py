"""Running the comparison: the OpenMP environment, the local stack's lifetime, the transformers
baselines, one warm-up request per configuration and the interleaved, rotating loop."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.spec.client import StackClient
from bench.spec.config import OMP_NOTE, SpecBenchConfig
from bench.spec.hf import HFRunner
from bench.spec.prompts import PromptKey, PromptSet
from bench.spec.provenance import loadavg
from bench.spec.runs import Record, RunConfig, rotate

WARMUP_TOKENS = 8  # the warm-up requests' length: enough to touch every code path once


@dataclass
class Measurement:
    """What the loop produced, and what it learned about the setup on the way."""

    runs: list[RunConfig]  # the planned runs, less the transformers ones if they failed to load
    records: list[Record] = field(default_factory=list)
    set_load: dict[str, dict[str, Any]] = field(default_factory=dict)  # load average per set
    omp_in_process: bool | None = None
    stack_log: Path | None = None
    hf_info: dict[str, Any] | None = None
    hf_error: str | None = None


def distinct_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` different TCP ports that are free now: the sockets stay bound until all are picked.

    LocalStack's own choice asks the OS for one free port per child without holding them, and
    can get the same port twice (then the gateway fails to bind while the readiness probe of its
    address is answered by the target).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
    return ports


@contextlib.contextmanager
def omp_environment(cfg: SpecBenchConfig, m: Measurement, notes: list[str]) -> Iterator[dict[str, str]]:
    """The environment of the stack's children; OMP_WAIT_POLICY is also set here meanwhile and
    restored after (the OpenMP runtime has read it by then, so it leaves no trace)."""
    child_env: dict[str, str] = {}
    previous = os.environ.get("OMP_WAIT_POLICY")
    if cfg.omp_wait_policy != "inherit":
        # read by the OpenMP runtime when torch loads it: effective in this process only if torch
        # was not imported yet (it always is for the stack's children)
        m.omp_in_process = "torch" not in sys.modules
        child_env["OMP_WAIT_POLICY"] = cfg.omp_wait_policy.upper()
        notes.append(OMP_NOTE.format(policy=cfg.omp_wait_policy.upper()))
        if not m.omp_in_process:
            notes.append(
                "torch was imported before the benchmark set OMP_WAIT_POLICY: in-process runs use the "
                "policy it was imported with"
            )
    elif cfg.gateway is None and cfg.omp_spincount is not None:
        from specmesh.stack import OMP_SPIN_NOTE

        notes.append(f"GOMP_SPINCOUNT={cfg.omp_spincount} for every stack process. " + OMP_SPIN_NOTE)
    try:
        os.environ.update(child_env)
        yield child_env
    finally:
        if cfg.omp_wait_policy != "inherit":
            if previous is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = previous


@contextlib.contextmanager
def gateway_address(
    cfg: SpecBenchConfig, child_env: dict[str, str], m: Measurement, notes: list[str]
) -> Iterator[str]:
    """cfg.gateway, or the address of a local stack (Redis, target, draft, gateway) started here
    and stopped on exit; its logs go to cfg.stack_log (default: OUT with .stack.log)."""
    if cfg.gateway is not None:
        yield cfg.gateway
        return
    from specmesh.stack import LocalStack, LogSink, StackConfig, find_redis_server

    if cfg.redis and find_redis_server() is None:
        notes.append("no Redis-compatible server found: the stack ran without Redis")
        cfg.redis = False
    m.stack_log = Path(cfg.stack_log) if cfg.stack_log else Path(cfg.out).with_suffix(".stack.log")
    with open(m.stack_log, "w", encoding="utf-8") as log_file:
        gateway_port, target_port, draft_port, redis_port = distinct_free_ports(4)
        config = StackConfig(
            model=cfg.target_model,
            draft_model=cfg.draft_model,
            gateway_port=gateway_port,
            target_port=target_port,
            draft_port=draft_port,
            redis=cfg.redis,
            redis_port=redis_port,
            env=child_env,
            target_threads=cfg.target_threads,
            draft_threads=cfg.draft_threads,
            draft_int8=cfg.draft_int8,
            target_weights=cfg.target_weights,
            omp_spincount=cfg.omp_spincount,
            warmup=True,
        )
        stack = LocalStack(config, LogSink(log_file, color=False))
        print(f"starting the local stack (logs: {m.stack_log}) ...", file=sys.stderr, flush=True)
        try:
            try:
                stack.start()
            except Exception:
                log_file.flush()
                tail = m.stack_log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
                print("\n".join(tail), file=sys.stderr)
                raise
            yield stack.gateway
        finally:
            stack.stop()


def load_hf(
    cfg: SpecBenchConfig, target_dir: Path, tokenizer: Any, m: Measurement, notes: list[str]
) -> HFRunner | None:
    """The transformers baselines, or None (and their runs dropped) when the models do not load:
    a draft transformers cannot read must not lose the stack's runs."""
    from services.core.model_store import resolve_model

    draft_dir = resolve_model(cfg.draft_model)
    try:
        runner = HFRunner(
            target_dir,
            draft_dir,
            threads=cfg.hf_threads,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_ids=tokenizer.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            ignore_eos=cfg.ignore_eos,
            num_assistant_tokens=cfg.hf_num_assistant_tokens,
        )
    except Exception as exc:
        m.hf_error = f"{type(exc).__name__}: {exc}"
        notes.append(f"transformers baselines skipped: loading the models failed ({m.hf_error})")
        print(f"warning: transformers baselines skipped: {m.hf_error}", file=sys.stderr)
        m.runs = [r for r in m.runs if r.kind != "hf"]
        cfg.hf = False
        return None
    m.hf_info = {
        "target_dir": str(target_dir),
        "draft_dir": str(draft_dir),
        "threads": cfg.hf_threads,
        "attn_implementation": runner.attn_implementation,
        "generate_kwargs": runner.generate_kwargs,
        "assisted_settings": runner.assisted_settings,
        "mode": "eager (no torch.compile), float32, batch 1, in this process",
    }
    return runner


class Generator:
    """One request of one configuration on one prompt, through the stack or transformers."""

    def __init__(
        self,
        cfg: SpecBenchConfig,
        prompt_ids: dict[PromptKey, list[int]],
        client: StackClient,
        hf_runner: HFRunner | None,
    ) -> None:
        self.cfg, self.prompt_ids, self.client, self.hf_runner = cfg, prompt_ids, client, hf_runner

    def __call__(self, run: RunConfig, key: PromptKey, seed: int, order: int, n_tokens: int) -> Record:
        ids = self.prompt_ids[key]
        rec = Record(run.name, key[0], key[1], len(ids), seed, order)
        if run.kind == "hf":
            assert self.hf_runner is not None
            self.hf_runner.generation_config.max_new_tokens = n_tokens  # the warm-up's are shorter
            return self.hf_runner.generate(ids, seed, run.assisted, rec)
        req = self.client.request(
            run,
            ids,
            max_new_tokens=n_tokens,
            temperature=self.cfg.temperature,
            seed=seed,
            ignore_eos=self.cfg.ignore_eos,
        )
        return self.client.generate(req, rec)


def warm_up(generate: Generator, runs: Sequence[RunConfig], first: PromptKey, cfg: SpecBenchConfig) -> None:
    """Every configuration once, short, on the first prompt (not recorded)."""
    from tqdm import tqdm

    errors = []
    for run in tqdm(runs, desc="warm-up", unit="run", disable=not cfg.progress):
        rec = generate(run, first, cfg.seed, 0, min(cfg.max_new_tokens, WARMUP_TOKENS))
        if rec.error:
            errors.append(f"{run.name}: {rec.error}")
    if errors:
        raise RuntimeError("warm-up requests failed:\n  " + "\n  ".join(errors))


def interleaved(generate: Generator, sets: Sequence[PromptSet], cfg: SpecBenchConfig, m: Measurement) -> None:
    """Per prompt every configuration, in an order that rotates from prompt to prompt."""
    from tqdm import tqdm

    g = 0
    for ps in sets:
        m.set_load[ps.name] = {"loadavg_start": loadavg()}
        bar = tqdm(total=len(ps.items) * len(m.runs), desc=f"{ps.name}", unit="req", disable=not cfg.progress)
        for i in range(len(ps.items)):
            for order, run in enumerate(rotate(m.runs, g)):
                gc.collect()
                rec = generate(run, (ps.name, i), cfg.seed + i, order, cfg.max_new_tokens)
                m.records.append(rec)
                if rec.error:
                    tqdm.write(f"{ps.name}[{i}] {run.name}: {rec.error}", file=sys.stderr)
                bar.update(1)
            g += 1
        bar.close()
        m.set_load[ps.name]["loadavg_end"] = loadavg()

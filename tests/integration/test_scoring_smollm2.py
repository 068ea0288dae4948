"""The ScoringService on real weights: SmolLM2-135M-Instruct as the scored model (Binoculars'
performer) and its trained draft as the observer (the untrained 4-layer slice when the trained
draft is not in the model store).

Sanity check, not a benchmark: on a handful of texts, what the target itself wrote greedily
scores as more machine-like (higher log-likelihood, lower Binoculars) than human paragraphs
from Debian package documentation. Run with -s to see the numbers.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import grpc
import pytest
import torch
from servers import ServerThread

from services.runtime.settings import ServerSettings
from services.scoring.server import load_scoring, start_scoring
from specmesh.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.slow
S = scoring_pb2

HUMAN_SOURCES = [
    "/usr/share/doc/base-passwd/README",
    "/usr/share/doc/procps/bugs.md",
    "/usr/share/doc/dpkg/spec/triggers.txt",
    "/usr/share/doc/e2fsprogs/README",
]
MACHINE_PROMPTS = [
    "Explain in one paragraph what the files /etc/passwd and /etc/group are for.",
    "Write a short paragraph telling users how to report a bug in a Linux tool.",
    "Describe in one paragraph what a package manager trigger is.",
    "Write a paragraph introducing a set of file system utilities.",
]


def first_paragraph(path: str, min_chars: int = 200) -> str:
    """The first paragraph of prose (not a heading or a list) of at least min_chars characters."""
    for block in re.split(r"\n\s*\n", Path(path).read_text()):
        flat = " ".join(block.split())
        if len(flat) >= min_chars and not flat.startswith(("*", "-", "#", "[")):
            return flat[:700]
    raise AssertionError(f"no prose paragraph in {path}")


@pytest.fixture(scope="module")
def observer_dir(draft_dir) -> Path:
    from services.core.model_store import resolve_model

    try:
        return Path(resolve_model("smollm2-135m-instruct-draft"))
    except Exception:
        return draft_dir


@pytest.fixture(scope="module")
def scoring(smollm2_dir, observer_dir):
    servicer = load_scoring(str(smollm2_dir), observer=str(observer_dir))
    with ServerThread(lambda: start_scoring(servicer, ServerSettings(host="127.0.0.1", port=0))) as srv:
        channel = grpc.insecure_channel(srv.address)
        yield servicer, scoring_pb2_grpc.ScoringServiceStub(channel)
        channel.close()
    servicer.close()


def greedy_answers(servicer, prompts: list[str], max_new_tokens: int = 50) -> list[str]:
    """The target's greedy answers to chat prompts, all prompts decoded together (one batched
    forward per step: the CPU budget of the slow suite is tight)."""
    tok, engine = servicer.tokenizer, servicer.engine

    def run() -> list[list[int]]:
        seqs = [engine.new_sequence() for _ in prompts]
        try:
            chats = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
            logits, _ = engine.forward(seqs, chats, last_only=True)
            out: list[list[int]] = [[] for _ in prompts]
            for _ in range(max_new_tokens):
                nxt = [int(torch.argmax(row[-1])) for row in logits]
                for o, t in zip(out, nxt, strict=True):
                    o.append(t)
                logits, _ = engine.forward(seqs, [[t] for t in nxt], last_only=True)
            # cut at the first end of turn (the batch ran on past it)
            return [o[: next((i for i, t in enumerate(o) if t in tok.eos_token_ids), len(o))] for o in out]
        finally:
            for s in seqs:
                s.release()

    return [tok.decode(ids).strip() for ids in servicer._worker.call(run)]


def test_machine_text_scores_as_machine(scoring) -> None:
    servicer, stub = scoring
    missing = [p for p in HUMAN_SOURCES if not Path(p).exists()]
    if missing:
        pytest.skip(f"Debian documentation not installed: {missing}")
    human = [first_paragraph(p) for p in HUMAN_SOURCES]
    machine = greedy_answers(servicer, MACHINE_PROMPTS)
    rows = {}
    for kind, texts in (("human", human), ("machine", machine)):
        for t in texts:
            reply = stub.Detect(S.DetectRequest(input=common_pb2.Prompt(text=t)))
            scores = {
                S.DetectMethod.Name(s.method).removeprefix("DETECT_METHOD_"): s.score for s in reply.scores
            }
            rows.setdefault(kind, []).append(scores)
            print(kind, len(reply.token_ids), {k: round(v, 3) for k, v in scores.items()}, repr(t[:60]))
    mean = {kind: {m: statistics.mean(r[m] for r in rs) for m in rs[0]} for kind, rs in rows.items()}
    print("means", {k: {m: round(v, 3) for m, v in ms.items()} for k, ms in mean.items()})
    assert mean["machine"]["LOG_LIKELIHOOD"] > mean["human"]["LOG_LIKELIHOOD"]
    assert mean["machine"]["BINOCULARS"] < mean["human"]["BINOCULARS"]


def test_real_model_membership_and_uncertainty(scoring) -> None:
    _, stub = scoring
    prompt = common_pb2.Prompt(text="The quick brown fox jumps over the lazy dog.")
    m = stub.Membership(S.MembershipRequest(input=prompt))
    assert [s.method for s in m.scores] == [1, 2, 3]  # the shipped DC-PDD table fits SmolLM2
    u = stub.Uncertainty(S.UncertaintyRequest(input=prompt))
    assert 0 < u.geometric_mean_prob <= u.arithmetic_mean_prob < 1
    assert len(u.kurtosis) == len(u.token_ids) and all(k > 0 for k in u.kurtosis)  # peaked, not flat

"""The gateway in front of the real target (and draft) services on SmolLM2, all in this process.

Without a draft: the gateway fetching the target model's tokenizer from the target
(GetTokenizer), text and chat prompts, and the target policy matching the target's own Generate stream
token for token. With the target model as its own draft: greedy speculative output equals
target-only output for every strategy, with (almost) every chain draft accepted.
"""

from __future__ import annotations

import time

import grpc
import pytest
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.runtime.settings import ServerSettings
from services.target.server import load_target, start_target
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, target_pb2, target_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(smollm2_dir):
    servicer = load_target(str(smollm2_dir), max_sessions=8)
    settings = ServerSettings(host="127.0.0.1", port=0, grace_seconds=1)
    state = {}

    async def start():
        state["target"] = await start_target(servicer, settings)
        # no tokenizer given: the gateway fetches it from the target (GetTokenizer)
        gw = await start_gateway(GatewayOptions(target=state["target"].address), settings)
        return gw

    with ServerThread(start) as thread:
        gateway_channel = grpc.insecure_channel(thread.address)
        target_channel = grpc.insecure_channel(state["target"].address)
        yield (
            gateway_pb2_grpc.GatewayStub(gateway_channel),
            target_pb2_grpc.TargetServiceStub(target_channel),
            servicer,
        )
        gateway_channel.close()
        target_channel.close()
        thread.call(thread.server.stop(grace=1))
        thread.call(state["target"].stop(grace=1))
    servicer.close()


def chat(text: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)])
    )


def test_target_policy_equals_target_generate(servers) -> None:
    gateway, target, _ = servers
    sampling = common_pb2.SamplingParams(max_new_tokens=32)
    direct = list(
        target.Generate(
            target_pb2.GenerateRequest(prompt=chat("What is the capital of France?"), sampling=sampling)
        )
    )
    via = gateway.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=chat("What is the capital of France?"), sampling=sampling, policy=gateway_pb2.POLICY_TARGET
        )
    )
    assert list(via.token_ids) == [t for c in direct for t in c.token_ids]
    assert via.text == "".join(c.text for c in direct) and "Paris" in via.text
    assert via.finish_reason == direct[-1].finish_reason
    assert via.usage.prompt_tokens == direct[-1].usage.prompt_tokens
    assert via.spec_stats.mean_accepted_length == 1.0


def test_target_policy_under_a_kv_budget_equals_the_targets_own(servers) -> None:
    gateway, target, _ = servers
    prompt = chat("Explain in two sentences why the sky is blue, then say what colour sunsets are.")
    sampling = common_pb2.SamplingParams(max_new_tokens=24, ignore_eos=True)
    budget = common_pb2.KVBudget(max_tokens=24, recent_share=0.25)
    direct = target.Generate(target_pb2.GenerateRequest(prompt=prompt, sampling=sampling, kv_budget=budget))
    via = gateway.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=prompt, sampling=sampling, policy=gateway_pb2.POLICY_TARGET, kv_budget=budget
        )
    )
    assert list(via.token_ids) == [t for c in direct for t in c.token_ids] and len(via.token_ids) == 24
    assert any("kv_budget" in w for w in via.warnings)


def test_text_prompt_and_list_models(servers) -> None:
    gateway, _, servicer = servers
    r = gateway.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=common_pb2.Prompt(text="def fibonacci(n):\n"),
            sampling=common_pb2.SamplingParams(max_new_tokens=10, ignore_eos=True),
            policy=gateway_pb2.POLICY_TARGET,
        )
    )
    assert r.usage.prompt_tokens == len(servicer.tokenizer.encode("def fibonacci(n):\n"))
    assert r.usage.output_tokens == 10
    (model,) = gateway.ListModels(gateway_pb2.ListModelsRequest()).models
    assert model.name == "smollm2-135m-instruct" and model.vocab_size == 49152


def test_speculative_without_a_draft_is_refused(servers) -> None:
    gateway, _, _ = servers
    with pytest.raises(grpc.RpcError) as info:
        gateway.Generate(
            gateway_pb2.GatewayGenerateRequest(
                prompt=chat("hi"), sampling=common_pb2.SamplingParams(max_new_tokens=4)
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- with a draft service: the target model drafting for itself ----------------------------------

STRATEGIES = [
    common_pb2.DRAFT_STRATEGY_CHAIN,
    common_pb2.DRAFT_STRATEGY_STATIC_TREE,
    common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE,
    common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE,
    common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP,
]


@pytest.fixture(scope="module")
def spec_servers(smollm2_dir):
    server_mod = pytest.importorskip("services.draft.server")
    target_servicer = load_target(str(smollm2_dir), max_sessions=8)
    draft_servicer = server_mod.load_draft(str(smollm2_dir), max_sessions=8, int8=False)  # fp32 self-draft
    settings = ServerSettings(host="127.0.0.1", port=0, grace_seconds=1)
    state = {}

    async def start():
        state["target"] = await start_target(target_servicer, settings)
        state["draft"] = await server_mod.start_draft(draft_servicer, settings)
        options = GatewayOptions(target=state["target"].address, draft=state["draft"].address)
        return await start_gateway(options, settings)

    with ServerThread(start) as thread:
        channel = grpc.insecure_channel(thread.address)
        yield gateway_pb2_grpc.GatewayStub(channel), target_servicer, draft_servicer
        channel.close()
        thread.call(thread.server.stop(grace=1))
        thread.call(state["draft"].stop(grace=1))
        thread.call(state["target"].stop(grace=1))
    target_servicer.close()
    draft_servicer.close()


SPEC_PROMPTS = [
    chat("What is the capital of France? Answer in one sentence."),
    common_pb2.Prompt(text="def fibonacci(n):\n    "),
]


@pytest.fixture(scope="module")
def target_only(spec_servers) -> list[list[int]]:
    gateway, _, _ = spec_servers
    out = []
    for prompt in SPEC_PROMPTS:
        r = gateway.Generate(
            gateway_pb2.GatewayGenerateRequest(
                prompt=prompt,
                sampling=common_pb2.SamplingParams(max_new_tokens=24),
                policy=gateway_pb2.POLICY_TARGET,
            )
        )
        out.append(list(r.token_ids))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES, ids=common_pb2.DraftStrategy.Name)
def test_greedy_speculative_equals_target_only(spec_servers, target_only, strategy) -> None:
    gateway, target_servicer, draft_servicer = spec_servers
    for prompt, expected in zip(SPEC_PROMPTS, target_only, strict=True):
        r = gateway.Generate(
            gateway_pb2.GatewayGenerateRequest(
                prompt=prompt,
                sampling=common_pb2.SamplingParams(max_new_tokens=24),
                policy=gateway_pb2.POLICY_SPECULATIVE,
                # lookup off for the chain: its acceptance rate below counts the draft's own path only
                spec=gateway_pb2.SpecOptions(
                    strategy=strategy,
                    budget=common_pb2.TreeBudget(
                        lookup_tokens=0 if strategy == common_pb2.DRAFT_STRATEGY_CHAIN else None
                    ),
                ),
            )
        )
        assert list(r.token_ids) == expected
        s = r.spec_stats
        assert s.rounds >= 1 and s.mean_accepted_length >= 1.0
        if strategy == common_pb2.DRAFT_STRATEGY_CHAIN:
            assert s.acceptance_rate >= 0.9, s  # a model drafting for itself
            assert s.rounds < len(expected) / 3, s
    # every session was released on both services
    deadline = time.monotonic() + 10
    while len(target_servicer.sessions) or len(draft_servicer.sessions):
        assert time.monotonic() < deadline, "sessions left open"
        time.sleep(0.05)


def test_sampled_speculative_is_reproducible(spec_servers) -> None:
    gateway, _, _ = spec_servers
    request = gateway_pb2.GatewayGenerateRequest(
        prompt=SPEC_PROMPTS[0],
        sampling=common_pb2.SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5),
        spec=gateway_pb2.SpecOptions(strategy=common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE, adaptive=True),
    )
    a, b = gateway.Generate(request), gateway.Generate(request)
    assert list(a.token_ids) == list(b.token_ids) and a.usage.seed == 5
    assert a.spec_stats.rounds >= 1


def test_draft_policy(spec_servers, target_only) -> None:
    gateway, _, _ = spec_servers
    r = gateway.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=SPEC_PROMPTS[0],
            sampling=common_pb2.SamplingParams(max_new_tokens=24),
            policy=gateway_pb2.POLICY_DRAFT,
        )
    )
    # the draft is the target model here, so its own greedy output is the target's
    assert list(r.token_ids) == target_only[0]


@pytest.mark.parametrize(
    "policy", [gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_SPECULATIVE], ids=["target", "speculative"]
)
def test_tiny_temperature_through_the_gateway_is_the_greedy_limit(spec_servers, target_only, policy) -> None:
    """temperature 1e-45 reaches both services as sampling in the T -> 0 limit: no NaN and no
    INTERNAL error, and the output is the greedy output (the sampled rules on a sampled tree)."""
    gateway, _, _ = spec_servers
    r = gateway.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=SPEC_PROMPTS[0],
            sampling=common_pb2.SamplingParams(max_new_tokens=24, temperature=1e-45, seed=11),
            policy=policy,
            spec=gateway_pb2.SpecOptions(strategy=common_pb2.DRAFT_STRATEGY_STATIC_TREE),
        )
    )
    assert list(r.token_ids) == target_only[0] and r.usage.seed == 11

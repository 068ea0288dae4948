"""Fixtures of the fuzz suite: the stack of real servers (see tests/fuzzing.py), the state
opened before any fuzzing, and a per-test Fuzzer checked for survival afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzzing import Fuzzer, Stack, Survivor
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.draft.server import load_draft, start_draft
from services.runtime.settings import ServerSettings
from services.scoring.server import load_scoring, start_scoring
from services.target.server import load_target, start_target


@pytest.fixture(scope="package")
def stack(tiny_gguf, tmp_path_factory) -> Iterator[Stack]:
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("fuzz-models")
    model = str(mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False, license="apache-2.0"))
    target = load_target(model, max_sessions=32, max_kv_tokens=8192, pack_weights=False)
    draft = load_draft(model, max_sessions=32, max_kv_tokens=8192, pack_weights=False, int8=False)
    scoring = load_scoring(model, pack_weights=False)
    scoring.batcher.window_s = 0.0  # one call at a time here: no reason to wait for company
    settings_ = ServerSettings(host="127.0.0.1", port=0, grace_seconds=1)
    state: dict[str, object] = {}

    async def start():
        state["target"] = await start_target(target, settings_)
        state["draft"] = await start_draft(draft, settings_)
        state["scoring"] = await start_scoring(scoring, settings_)
        options = GatewayOptions(target=state["target"].address, draft=state["draft"].address)
        return await start_gateway(options, settings_)

    with ServerThread(start) as thread:
        addresses = {role: state[role].address for role in ("target", "draft", "scoring")}
        addresses["gateway"] = thread.address
        s = Stack(addresses, target.engine.config.vocab_size)
        yield s
        for channel in s.channels.values():
            channel.close()
        for role in ("target", "draft", "scoring"):
            thread.call(state[role].stop(grace=1))
    for servicer in (target, draft, scoring):
        servicer.close()


@pytest.fixture(scope="package")
def survivor(stack) -> Survivor:
    return Survivor(stack)


@pytest.fixture
def fuzzer(stack, survivor) -> Iterator[Fuzzer]:
    """A Fuzzer for one test; afterwards the survivor's checks must pass."""
    f = Fuzzer(stack)
    yield f
    assert f.cases > 0
    survivor.cases += f.cases
    TOTAL["cases"] += f.cases
    print(
        f"\n{f.cases} cases ({survivor.cases} so far):",
        ", ".join(f"{k} {v}" for k, v in sorted(f.codes.items())),
    )
    survivor.check()


TOTAL = {"cases": 0}  # fuzz cases sent in this session, for the summary line


def pytest_terminal_summary(terminalreporter) -> None:
    if TOTAL["cases"]:
        terminalreporter.write_line(f"fuzz: {TOTAL['cases']} generated cases sent to the servers")


def pytest_collection_modifyitems(items) -> None:
    # The servers run in this process and draw seeds from `random`; hypothesis sees the global
    # random state move while it generates a case and warns as if a strategy had used it.
    for item in items:
        if "tests/fuzz/" in str(item.path):
            item.add_marker(
                pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
            )

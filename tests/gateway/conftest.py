"""Fixtures for gateway tests: the toy services (see toy_services.py) served by the real runtime
on loopback, with the real gateway in front.

pytest runs in importlib mode, so tests reach these helpers through fixtures (``toy``,
``make_stack``) rather than by importing modules of this directory.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from servers import ServerThread

from gateway.config import GatewayConfig
from gateway.server import GatewayOptions, start_gateway
from services.core.tokenizer import Tokenizer
from services.runtime.server import serve
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import setup_telemetry
from specmesh.v1 import gateway_pb2_grpc

TOY_SERVICES = Path(__file__).with_name("toy_services.py")


def _load_toy():
    name = "specmesh_tests_toy_services"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOY_SERVICES)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


toy_services = _load_toy()
FakeTarget, FakeDraft = toy_services.FakeTarget, toy_services.FakeDraft
V, EOS, MAX_CONTEXT = toy_services.V, toy_services.EOS, toy_services.MAX_CONTEXT

# --- the stack ------------------------------------------------------------------------------


@dataclass
class ToyStack:
    thread: ServerThread
    target: FakeTarget
    draft: FakeDraft | None
    gateway: Any  # gateway.server.GatewayServer
    channel: grpc.Channel
    stub: gateway_pb2_grpc.GatewayStub
    telemetry: dict[str, Any]


def _settings(name: str) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, service_name=name, grace_seconds=1)


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_services.write_toy_tokenizer(tmp_path_factory.mktemp("toy-tokenizer"))


@pytest.fixture
def toy(toy_tokenizer_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(
        V=V,
        EOS=EOS,
        MAX_CONTEXT=MAX_CONTEXT,
        BUSY_RETRY_DELAY_S=toy_services.BUSY_RETRY_DELAY_S,
        next=toy_services.toy_next,
        other=toy_services.other,
        services_script=TOY_SERVICES,
        tokenizer=Tokenizer.from_dir(toy_tokenizer_dir),
        tokenizer_dir=toy_tokenizer_dir,
        FakeTarget=FakeTarget,
        FakeDraft=FakeDraft,
        register_target=toy_services.register_target,
        register_draft=toy_services.register_draft,
        settings=_settings,
    )


@pytest.fixture
def make_stack(toy_tokenizer_dir: Path):
    """make_stack(config=..., draft=FakeDraft(...) | None, target=FakeTarget(...), memory_telemetry=False)."""
    stacks: list[ToyStack] = []

    def make(
        config: GatewayConfig | None = None,
        *,
        draft: FakeDraft | None | bool = True,
        target: FakeTarget | None = None,
        memory_telemetry: bool = False,
    ) -> ToyStack:
        tok = Tokenizer.from_dir(toy_tokenizer_dir)
        target = target or FakeTarget(tok)
        draft = FakeDraft() if draft is True else (draft or None)
        telemetry: dict[str, Any] = {}
        if memory_telemetry:
            for name in ("gateway", "target", "draft"):
                telemetry[name] = setup_telemetry(f"toy-{name}", "memory", "memory", install_global=False)
        state: dict[str, Any] = {}

        async def start():
            reg_target = toy_services.register_target(target)
            reg_draft = toy_services.register_draft(draft) if draft is not None else None
            state["target"] = await serve(
                reg_target, _settings("toy-target"), telemetry=telemetry.get("target")
            )
            if draft is not None:
                state["draft"] = await serve(
                    reg_draft, _settings("toy-draft"), telemetry=telemetry.get("draft")
                )
            options = GatewayOptions(
                target=state["target"].address,
                draft=state["draft"].address if draft is not None else None,
                tokenizer_dir=toy_tokenizer_dir,
                config=config or GatewayConfig(),
            )
            gw = await start_gateway(options, _settings("toy-gateway"), telemetry=telemetry.get("gateway"))
            state["gateway"] = gw
            return gw

        thread = ServerThread(start)
        thread.__enter__()
        channel = grpc.insecure_channel(thread.address)
        stack = ToyStack(
            thread=thread,
            target=target,
            draft=draft,
            gateway=state["gateway"],
            channel=channel,
            stub=gateway_pb2_grpc.GatewayStub(channel),
            telemetry=telemetry,
        )
        stack.upstreams = state  # type: ignore[attr-defined]
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.channel.close()
        stack.thread.call(stack.gateway.stop(grace=1))  # first: it releases upstream sessions
        for name in ("draft", "target"):
            if name in stack.upstreams:  # type: ignore[attr-defined]
                stack.thread.call(stack.upstreams[name].stop(grace=0))  # type: ignore[attr-defined]
        stack.thread.__exit__(None, None, None)
        for t in stack.telemetry.values():
            t.shutdown()

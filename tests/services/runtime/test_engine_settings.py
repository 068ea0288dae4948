"""EngineSettings: target and draft limits from defaults < SPECMESH_* < flags, refused when invalid."""

from __future__ import annotations

import argparse

import pytest

from services.runtime.settings import EngineSettings, SettingsError, add_engine_args


def test_environment_then_flags_override_the_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    env = {"SPECMESH_BATCHING": "off", "SPECMESH_MAX_QUEUE": "7", "SPECMESH_BATCH_WINDOW_MS": "5"}
    s = EngineSettings.from_env_and_args(parser.parse_args(["--max-queue", "9"]), env=env)
    assert (s.batching, s.max_queue, s.batch_window_ms, s.max_batch) == (False, 9, 5.0, 32)
    s = EngineSettings.from_env_and_args(parser.parse_args(["--batching"]), env=env)
    assert s.batching is True


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SPECMESH_MAX_QUEUE": "0"}, "max_queue must be positive"),
        ({"SPECMESH_BATCH_WINDOW_MS": "-1"}, "batch_window_ms must be >= 0"),
        ({"SPECMESH_MAX_BATCH": "many"}, "SPECMESH_MAX_BATCH='many': expected an integer"),
    ],
)
def test_bad_values_name_the_variable(env, message) -> None:
    with pytest.raises(SettingsError, match=message):
        EngineSettings.from_env(env)
    with pytest.raises(SettingsError, match="invalid engine settings"):
        EngineSettings(max_sessions=0)

"""docker-compose.yml against the compose specification, plus the rules the schema cannot express.

The schema is vendored (schemas/compose-spec.json, see schemas/README.md for its source and
licence): no PyPI package ships it. Compose substitutes variables before it validates, so the
substituted document is what is validated (and the raw one too: the schema accepts `${...}`
strings wherever they appear here).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from deploy_tools import COMPOSE_FILE, ROOT, container_ports, env_of, load_compose

SCHEMA = Path(__file__).with_name("schemas") / "compose-spec.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, document) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=str)
    ]


def test_compose_file_matches_the_specification(validator, compose) -> None:
    assert _errors(validator, compose) == []
    assert _errors(validator, yaml.safe_load(COMPOSE_FILE.read_text())) == []


def test_the_schema_rejects_a_broken_file(validator, compose) -> None:
    """Negative control: the vendored schema really constrains services (a misspelt key, a
    healthcheck without a test and a bad depends_on condition are each caught)."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["target"]["helthcheck"] = broken["services"]["target"].pop("healthcheck")
    broken["services"]["gateway"]["depends_on"]["target"]["condition"] = "service_ready"
    errors = _errors(validator, broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any("service_ready" in e for e in errors), errors


def test_dependencies_are_satisfiable(compose) -> None:
    """What `docker compose up` checks at start and the schema does not: every dependency exists and
    is started by default (not only under a profile) unless it is optional (`required: false`,
    which compose drops when the profile is off), service_healthy waits on a healthcheck,
    service_completed_successfully on a job that exits (no restart policy)."""
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if not service.get("profiles") and spec.get("required", True):
                assert not services[dep].get("profiles"), f"{name} (default) depends on profiled {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}: no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is a job; it must not restart"


def test_every_service_has_limits_logging_and_one_env_file(compose) -> None:
    for name, service in compose["services"].items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory"} <= set(limits), f"{name}: resource limits missing"
        assert service.get("logging", {}).get("driver") == "json-file", f"{name}: logging anchor missing"
        assert "env_file" not in service, f"{name}: settings belong in the one .env"
    # every service that binds a port exposes it to the others, and only the gateway (plus the
    # Jaeger UI of the observability profile) is published on the host
    published = {n for n, s in compose["services"].items() if s.get("ports")}
    assert published == {"gateway", "jaeger"}
    assert 50050 in container_ports(compose["services"]["gateway"])


def test_env_file_values_reach_the_file() -> None:
    """A different .env changes the stack (the file reads its settings from .env, not literals)."""
    changed = load_compose(
        {"SPECMESH_GATEWAY_PORT": "6000", "SPECMESH_MODEL": "my-model", "SPECMESH_VERSION": "9.9"}
    )
    gateway = changed["services"]["gateway"]
    assert "6000:6000" in gateway["ports"] and gateway["image"].endswith(":9.9")
    assert "my-model" in changed["services"]["target"]["command"]
    # and the defaults written in the file agree with .env (a stack started without .env is the same)
    assert load_compose({}) == load_compose()


def test_model_services_read_models_from_the_init_volume(compose) -> None:
    services = compose["services"]
    for job in ("model-init", "image-init"):
        assert services[job]["volumes"] == ["models:/models"]
    for name in ("target", "draft", "scoring", "image"):
        assert services[name]["volumes"] == ["models:/models:ro"]
        assert env_of(services[name])["SPECMESH_MODEL_DIR"] == "/models"
    assert "models" in compose["volumes"]
    assert "volumes" not in services["gateway"]  # the gateway needs no model directory
    assert (ROOT / ".env").is_file()

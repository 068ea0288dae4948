"""One topology: docker-compose.yml runs what `specmesh up --scoring` runs, and with the image
profile what `specmesh up --scoring --image` runs (and test_chart.py checks the chart the same way).

`specmesh up`'s plan comes from LocalStack itself (see UpPlan, UP_ARGV); every compose command and
healthcheck is parsed with the real `specmesh` argument parser, so a flag the CLI does not have,
a wrong subcommand or a bad value fails here. The services are those `up` starts, so a service
that joins `up` fails this test until compose (and the chart) run it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_tools import (
    COMPOSE_FILE,
    DIFFERENT_FLAGS,
    GATEWAY_ONLY_IN_UP,
    GRPC_SERVICES,
    NOT_COMPARED,
    ROOT,
    SET_BY_THE_IMAGE,
    code_env_names,
    container_ports,
    env_of,
    load_compose,
    parse_cli,
    read_env_file,
)

from services.runtime.settings import ServerSettings
from specmesh.cli.serve_gateway import DEFAULT_PORT as GATEWAY_DEFAULT_PORT
from specmesh.cli.serve_gateway import ENV_IMAGE, options_from_args
from specmesh.stack import DEFAULT_DRAFT_MODEL, DEFAULT_IMAGE_MODEL, DEFAULT_MODEL, ENV_REDIS_URL

SERVICES = ["target", "draft", "scoring", "gateway"]  # the specmesh servers of the default stack
IMAGE_SERVICES = ["image"]  # and of the image profile
ALL_SERVICES = [*SERVICES, *IMAGE_SERVICES]
# The image profile's stack: the profile plus the gateway's relay to it, as README.md says
IMAGE_RELAY = {"SPECMESH_IMAGE_RELAY": "image:50054"}
# (service, stack) pairs compared with `up`: the gateway of either stack
CASES = [(n, "default") for n in SERVICES] + [("image", "image"), ("gateway", "image")]


def _service_port(name: str, service: dict, args) -> int:
    """The port a compose service's server binds: flags > SPECMESH_* env > the service's default."""
    defaults = {"port": GATEWAY_DEFAULT_PORT} if name == "gateway" else {}
    return ServerSettings.from_env_and_args(args, env=env_of(service), **defaults).port


@pytest.fixture(scope="module")
def compose_image() -> dict:
    """The compose file as `SPECMESH_IMAGE_RELAY=image:50054 docker compose --profile image` sees it."""
    return load_compose({**read_env_file(), **IMAGE_RELAY})


@pytest.fixture
def stacks(compose, compose_image, up_plan, up_plan_image) -> dict[str, tuple]:
    return {"default": (compose, up_plan), "image": (compose_image, up_plan_image)}


def _profiled(compose: dict, profile: str | None) -> set[str]:
    """The services a profile adds (None: those started without one)."""
    return {
        name
        for name, service in compose["services"].items()
        if (profile in service.get("profiles", [])) or (profile is None and not service.get("profiles"))
    }


def test_compose_runs_the_services_of_specmesh_up(compose, up_plan, up_plan_image) -> None:
    assert set(up_plan.children) == {"redis", *SERVICES}  # update the lines below
    assert set(up_plan_image.children) == {"redis", *ALL_SERVICES}
    assert set(up_plan.children) <= _profiled(compose, None)
    # the image service and the job that trains its models only with the profile (opt-in, as
    # `up --image`: `specmesh train image` does not fit a first run of the default stack)
    assert _profiled(compose, "image") == {*IMAGE_SERVICES, "image-init"}
    # the defaults of .env are the defaults of `up`
    assert parse_cli(compose["services"]["target"]["command"]).model == DEFAULT_MODEL
    assert parse_cli(compose["services"]["draft"]["command"]).model == DEFAULT_DRAFT_MODEL
    # scoring scores the target model, with the draft as Binoculars' observer, as `up --scoring`
    scoring = parse_cli(compose["services"]["scoring"]["command"])
    assert (scoring.model, scoring.observer) == (DEFAULT_MODEL, DEFAULT_DRAFT_MODEL)


@pytest.mark.parametrize(("name", "stack"), CASES)
def test_same_command_flags_and_settings(stacks, name, stack) -> None:
    compose, up_plan = stacks[stack]
    service = compose["services"][name]
    ours, theirs = parse_cli(service["command"]), up_plan.args(name)
    assert (ours.command, ours.service) == (theirs.command, theirs.service) == ("serve", name)
    # every flag up passes is passed here too, unless it differs on purpose (documented above)
    allowed = set(DIFFERENT_FLAGS) | (set(GATEWAY_ONLY_IN_UP) if name == "gateway" else set())
    missing = up_plan.flags(name) - {a for a in service["command"] if a.startswith("--")} - allowed
    assert not missing, f"compose {name} lacks flags that `specmesh up` passes: {sorted(missing)}"
    # and every other setting (model, strategy, limits, int8 ...) has the same value
    skip = NOT_COMPARED | ({"model"} if name == "gateway" else set())
    differ = {
        k: (getattr(ours, k), v) for k, v in vars(theirs).items() if k not in skip and getattr(ours, k) != v
    }
    assert not differ, f"compose {name} (left) and up (right) disagree: {differ}"
    # it binds every interface on a fixed port that the other containers can reach
    settings = ServerSettings.from_env_and_args(ours, env=env_of(service))
    assert settings.host == "0.0.0.0"
    port = _service_port(name, service, ours)
    assert port != 0 and port in container_ports(service)


@pytest.mark.parametrize("name", ALL_SERVICES)
def test_every_service_serves_prometheus_metrics_on_an_exposed_port(compose, name) -> None:
    """SPECMESH_METRICS_PORT as the service's own `serve` resolves it (flags > env): a fixed port
    besides its gRPC one, exposed to the compose network and not published on the host (the
    published set is checked in test_compose.py)."""
    service = compose["services"][name]
    args = parse_cli(service["command"])
    metrics = ServerSettings.from_env_and_args(args, env=env_of(service)).metrics_port
    assert metrics, f"compose {name} serves no Prometheus endpoint"
    assert metrics != _service_port(name, service, args)
    assert metrics in {int(p) for p in service["expose"]}
    assert not any(str(p).endswith(f":{metrics}") for p in service.get("ports", []))


def test_metrics_port_comes_from_the_env_file() -> None:
    services = load_compose({"SPECMESH_METRICS_PORT": "9100"})["services"]
    for name in ALL_SERVICES:
        assert env_of(services[name])["SPECMESH_METRICS_PORT"] == "9100"
        assert 9100 in container_ports(services[name])


@pytest.mark.parametrize("name", ALL_SERVICES)
def test_healthcheck_asks_the_services_own_health_entry(compose, name) -> None:
    service = compose["services"][name]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "specmesh", test
    check = parse_cli(test[2:])
    assert check.command == "health"
    host, port = check.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == _service_port(name, service, parse_cli(service["command"]))
    assert check.service == GRPC_SERVICES[name]


@pytest.mark.parametrize(
    ("name", "relay"), [("scoring", {}), ("image", {"SPECMESH_IMAGE_RELAY": "image:6004"})]
)
def test_port_and_threads_come_from_the_env_file(name, relay) -> None:
    """SPECMESH_<NAME>_PORT and _THREADS reach the server, its healthcheck and the gateway's
    --<name> (the image service's through SPECMESH_IMAGE_RELAY, as the profile is opt-in)."""
    key = f"SPECMESH_{name.upper()}"
    services = load_compose({f"{key}_PORT": "6004", f"{key}_THREADS": "3", **relay})["services"]
    service = services[name]
    args = parse_cli(service["command"])
    assert (_service_port(name, service, args), args.threads) == (6004, 3)
    assert 6004 in container_ports(service)
    assert parse_cli(service["healthcheck"]["test"][2:]).address == "127.0.0.1:6004"
    assert getattr(parse_cli(services["gateway"]["command"]), name) == f"{name}:6004"


@pytest.mark.parametrize("stack", ["default", "image"])
def test_gateway_reaches_the_same_peers_as_in_up(stacks, stack) -> None:
    """up's gateway --target / --draft / --scoring (/ --image) name the up children it talks to;
    compose's gateway must name the compose services of the same names, on the ports those
    services bind; and it waits for them to be healthy, as up waits for SERVING before starting
    the gateway. A role up's gateway has not (the image service without --image) it has not either."""
    compose, up_plan = stacks[stack]
    services = compose["services"]
    ours, theirs = parse_cli(services["gateway"]["command"]), up_plan.args("gateway")
    depends = services["gateway"]["depends_on"]
    for role in ("target", "draft", "scoring", "image"):
        if getattr(theirs, role) is None:  # the gateway points at no service that is not there
            assert getattr(options_from_args(ours), role) is None, f"--{role} {getattr(ours, role)}"
            continue
        peer = up_plan.by_address[getattr(theirs, role)]
        host, port = getattr(ours, role).rsplit(":", 1)
        assert host == peer, f"--{role} {getattr(ours, role)}: up's gateway talks to {peer}"
        assert int(port) == _service_port(peer, services[peer], parse_cli(services[peer]["command"]))
        assert depends[peer]["condition"] == "service_healthy"
    # waited for when the profile runs it; without the profile compose leaves the dependency out
    assert depends["image"] == {"condition": "service_healthy", "required": False}


@pytest.mark.parametrize("relay", [None, "", "none"])
def test_without_the_relay_the_gateway_has_no_image_service(relay, monkeypatch) -> None:
    """SPECMESH_IMAGE_RELAY unset, empty (the .env default) or `none`: the gateway's --image is
    not configured (ImageService calls are UNIMPLEMENTED), and so is an empty --image or an empty
    SPECMESH_IMAGE_ADDRESS in the gateway's environment."""
    env = read_env_file()
    env.pop("SPECMESH_IMAGE_RELAY")
    if relay is not None:
        env["SPECMESH_IMAGE_RELAY"] = relay
    assert options_from_args(parse_cli(load_compose(env)["services"]["gateway"]["command"])).image is None
    assert options_from_args(parse_cli(["serve", "gateway", "--image", ""])).image is None
    monkeypatch.setenv(ENV_IMAGE, "")
    assert options_from_args(parse_cli(["serve", "gateway"])).image is None


def test_the_documented_relay_names_the_image_service(compose) -> None:
    image = compose["services"]["image"]
    port = _service_port("image", image, parse_cli(image["command"]))
    ((key, value),) = IMAGE_RELAY.items()
    assert value == f"image:{port}"
    for path in (ROOT / "README.md", COMPOSE_FILE):
        assert f"{key}={value} docker compose --profile image up" in path.read_text(), path.name


def test_every_bundled_redis_is_bounded_and_evicts_lru(compose, up_plan) -> None:
    """KV blocks rely on the server for their size bound (services/runtime/kv_store.py)."""
    for argv in (up_plan.children["redis"].argv, compose["services"]["redis"]["command"]):
        flags = dict(zip(argv[1::2], argv[2::2], strict=False))
        assert flags.get("--maxmemory-policy") == "allkeys-lru" and flags.get("--maxmemory"), argv


def test_environment_matches_up_and_exists_in_the_code(compose, up_plan) -> None:
    services = compose["services"]
    known = code_env_names()
    redis_host_port = f"redis:{min(container_ports(services['redis']))}"
    for name in ALL_SERVICES:
        env = env_of(services[name])
        unknown = {k for k in env if k.startswith(("SPECMESH_", "OTEL_")) and k not in known}
        assert not unknown, f"compose {name} sets variables no code reads: {sorted(unknown)}"
        for key, value in up_plan.added_env.items():
            if key in SET_BY_THE_IMAGE:
                continue
            assert key in env, f"`specmesh up` gives {name} {key}; compose does not"
            if key == ENV_REDIS_URL:  # the same store, by its compose name
                assert env[key].startswith(f"redis://{redis_host_port}/"), env[key]
                assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
            else:
                assert env[key] == value, f"{name} {key}: compose {env[key]!r}, up {value!r}"


def test_the_image_sets_what_up_adds_and_compose_leaves_out() -> None:
    from deploy_tools import ROOT

    dockerfile = (ROOT / "Dockerfile").read_text()
    for key in SET_BY_THE_IMAGE:
        assert f"{key}=1" in dockerfile


def test_model_init_job_builds_the_models_up_serves(compose) -> None:
    service = compose["services"]["model-init"]
    args = parse_cli(service["command"])
    assert (args.command, args.models_command) == ("models", "init")
    assert args.draft_minutes > 0
    for name in ("target", "draft", "scoring"):
        assert compose["services"][name]["depends_on"]["model-init"] == {
            "condition": "service_completed_successfully"
        }


def test_image_init_job_builds_the_models_the_image_service_loads(compose) -> None:
    """`train image --if-missing` into the volume, once (a later run finds the models and exits at
    once), after model-init; the image service waits for it and reads what it wrote."""
    services = compose["services"]
    init, image = services["image-init"], services["image"]
    args = parse_cli(init["command"])
    assert (args.command, args.train_command, args.if_missing) == ("train", "image", True)
    # both take the default directory, <model root>/digits-image, under the volume
    served = parse_cli(image["command"])
    assert args.out is None and served.model_dir is None
    for service in (init, image):
        root = Path(env_of(service)["SPECMESH_MODEL_DIR"])
        assert root / DEFAULT_IMAGE_MODEL == Path("/models/digits-image")
    assert init["volumes"] == ["models:/models"] and image["volumes"] == ["models:/models:ro"]
    assert init["depends_on"] == {"model-init": {"condition": "service_completed_successfully"}}
    assert image["depends_on"]["image-init"] == {"condition": "service_completed_successfully"}
    assert "model-init" not in image["depends_on"]  # it loads none of the text models

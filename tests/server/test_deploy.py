"""The Dockerfile, docker-compose.yml and docs/operators.md, checked against the code.

The image cannot be built here (no Docker engine), so these tests hold the files
to what the code really offers: console scripts, commands and options, settings,
defaults, routes.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import typer
import yaml

from backchannel.server import config_doc
from backchannel.server.admin import create_admin_app
from backchannel.server.app import create_app
from backchannel.server.cli import app as cli_app
from backchannel.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "BACKCHANNEL_RELAY_"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), "use the exec form (JSON array)"
    return [str(v) for v in value]


def env_pairs(args: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(args))


def console_scripts() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["scripts"])


def check_command(argv: list[str]) -> None:
    """``argv`` (after the program name) names a real command with real options."""
    group = typer.main.get_command(cli_app)
    command = group.commands.get(argv[0])  # type: ignore[attr-defined]
    assert command is not None, f"no command {argv[0]!r}"
    known = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for arg in argv[1:]:
        if arg.startswith("--"):
            assert arg in known, f"{argv[0]} has no option {arg}"


def check_env(names: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name in names:
        if name.startswith(PREFIX):
            assert name[len(PREFIX) :].lower() in fields, f"{name} is not a setting"


def test_dockerfile_matches_the_code() -> None:
    final = dockerfile()
    instructions = [word for word, _ in final]
    assert dict(final)["FROM"] == "python:3.11-slim"
    user = [args for word, args in final if word == "USER"]
    assert user, "the image must not run as root"
    assert user[-1] not in ("root", "0")
    assert instructions.index("USER") > instructions.index("COPY")

    entry = exec_form(dict(final)["ENTRYPOINT"])
    cmd = exec_form(dict(final)["CMD"])
    assert entry == ["backchannel-relay"]
    assert console_scripts()["backchannel-relay"] == "backchannel.server.cli:main"
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"]
    check_command(cmd)

    env: dict[str, str] = {}
    for word, args in final:
        if word == "ENV":
            env.update(env_pairs(args))
    check_env(env)
    defaults = Settings(data_dir=Path("/x"))
    assert int(env[f"{PREFIX}PORT"]) == defaults.port
    assert exec_form(dict(final)["VOLUME"]) == [env[f"{PREFIX}DATA_DIR"]] == ["/data"]
    assert dict(final)["EXPOSE"] == str(defaults.port)

    health = dict(final)["HEALTHCHECK"]
    assert "/healthz" in health
    assert "8470" in health
    path = re.search(r"/healthz\b", health)
    assert path is not None
    public = create_app(defaults)
    assert {"/healthz", "/readyz"} <= set(public.openapi()["paths"])
    assert "/metrics" in create_admin_app(public).openapi()["paths"]
    # Configuration by environment only: no config file is baked in.
    assert "CONFIG" not in " ".join(env)
    assert not any(
        word == "COPY" and ".toml" in args and "pyproject" not in args for word, args in final
    )


def test_compose_matches_the_code() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate"} <= set(services)
    relays = [name for name, s in services.items() if s.get("image", "").startswith("backchannel")]
    assert {"migrate", "relay1", "relay2"} <= set(relays)
    for name in relays:
        service = services[name]
        check_env(service["environment"])
        env = service["environment"]
        assert env[f"{PREFIX}DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert env[f"{PREFIX}REDIS_URL"].startswith("redis://")
        if "command" in service:
            check_command(service["command"])
    assert services["migrate"]["command"] == ["migrate"]
    for name in ("relay1", "relay2"):
        service = services[name]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "command" not in service  # the image's `serve --host 0.0.0.0`
        defaults = Settings(data_dir=Path("/x"))
        for mapping in service["ports"]:
            assert mapping.startswith("127.0.0.1:")
        inside = {mapping.rsplit(":", 1)[1] for mapping in service["ports"]}
        assert inside == {str(defaults.port), str(defaults.admin_port)}
    # The relays believe X-Forwarded-For from Docker's forwarding hop only: the gateway
    # of the network the file itself fixes.
    gateways = {c["gateway"] for c in compose["networks"]["default"]["ipam"]["config"]}
    for name in ("relay1", "relay2"):
        env = services[name]["environment"]
        trusted = Settings(data_dir=Path("/x"), trusted_proxies=env[f"{PREFIX}TRUSTED_PROXIES"])
        assert set(trusted.trusted_proxies) == gateways
    assert "--save" in services["redis"]["command"]


def test_operators_doc_settings_are_generated_and_current() -> None:
    path = ROOT / "docs" / "operators.md"
    text = path.read_text()
    assert config_doc.updated(text) == text, (
        "docs/operators.md is out of date: python -m backchannel.server.config_doc "
        "--write docs/operators.md"
    )
    for name in Settings.model_fields:
        assert f"`{PREFIX}{name.upper()}`" in text
    assert config_doc.main(["--check", str(path)]) == 0


def test_config_doc_detects_a_stale_section(tmp_path: Path) -> None:
    stale = tmp_path / "ops.md"
    stale.write_text(f"intro\n{config_doc.BEGIN}\n| old |\n{config_doc.END}\noutro\n")
    assert config_doc.main(["--check", str(stale)]) == 1
    assert config_doc.main(["--write", str(stale)]) == 0
    assert config_doc.main(["--check", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n")
    assert text.endswith("\noutro\n")
    assert "`BACKCHANNEL_RELAY_REDIS_URL`" in text

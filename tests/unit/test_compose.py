"""docker-compose.yml, the Dockerfile and .env.example: each fix of issue 10, item 12, read from the files.

CI also runs `docker-compose config -q` (.ci/run); these tests need no Docker and check what that cannot:
defaults against Settings, mount-point ownership in the image, and the healthcheck's command.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter
from typer.testing import CliRunner

from cli.main import app
from jobs.settings import DEFAULT_MODEL, Settings

ROOT = Path(__file__).resolve().parents[2]
# ${NAME}, ${NAME:-default} (unset or empty) or ${NAME-default} (unset); `$$` is a literal dollar.
VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}$]*))?\}")
# Variables the images or the libraries read, not our Settings.
# WORKER_GPU names a worker's card (jobs/presence.py reads it).
NOT_SETTINGS = {"HF_HOME", "PYTORCH_CUDA_ALLOC_CONF", "WORKER_GPU"}
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "API_BIND"}
# What an unset (None) setting means, for compose values that spell it out.
UNSET_MEANS = {"worker_model": DEFAULT_MODEL, "webhook_secret": ""}


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """A string as compose interpolates it; nested defaults are refused (docker-compose v1 misreads them)."""
    assert not re.search(r"\$\{[^}]*\$\{", value), f"nested interpolation in {value!r}"

    def substitute(match: re.Match[str]) -> str:
        found = env.get(match["name"])
        if (match["op"] == ":-" and not found) or (match["op"] == "-" and found is None):
            return match["default"]
        return found or ""

    return VARIABLE.sub(substitute, value).replace("$$", "$")


def resolved(tree: Any, env: Mapping[str, str]) -> Any:
    """Every string in a parsed YAML tree, interpolated."""
    if isinstance(tree, dict):
        return {key: resolved(value, env) for key, value in tree.items()}
    if isinstance(tree, list):
        return [resolved(value, env) for value in tree]
    return interpolate(tree, env) if isinstance(tree, str) else tree


def strings(tree: Any) -> list[str]:
    """Every string in a parsed YAML tree (so not its comments)."""
    if isinstance(tree, dict):
        return [text for value in tree.values() for text in strings(value)]
    if isinstance(tree, list):
        return [text for value in tree for text in strings(value)]
    return [tree] if isinstance(tree, str) else []


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as compose sees it with `env` as the environment (none set by default)."""
    return resolved(yaml.safe_load(compose_text()), env or {})


def services(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return load_compose(env)["services"]


def app_services() -> list[str]:
    """The services built from our Dockerfile."""
    return [name for name, service in services().items() if "build" in service]


def worker_services() -> list[str]:
    """The worker services, one per GPU."""
    return [
        name for name, service in services().items() if service.get("command") == ["nightrender", "worker"]
    ]


def service_env(name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    environment = services(env)[name].get("environment", {})
    assert isinstance(environment, dict), f"{name}: environment as a mapping"
    return {key: str(value) for key, value in environment.items()}


def env_example() -> dict[str, str]:
    """.env.example's assignments."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): value.strip() for name, value in pairs}


def settings_default(variable: str) -> Any:
    """The value Settings uses when `variable` is not set."""
    default = Settings.model_fields[variable.lower()].default
    return UNSET_MEANS[variable.lower()] if default is None else default


def as_setting(variable: str, text: str) -> Any:
    """`text` as Settings reads it from the environment for `variable`."""
    return TypeAdapter(Settings.model_fields[variable.lower()].annotation).validate_python(text)


def test_offload_mode_defaults_to_auto_as_in_settings_and_readme() -> None:
    assert [service_env(name)["OFFLOAD_MODE"] for name in worker_services()] == ["auto", "auto"]
    assert Settings.model_fields["offload_mode"].default == "auto"


def test_every_compose_default_is_the_settings_default() -> None:
    """OFFLOAD_MODE defaulted to `none` in compose against `auto` everywhere else; no default may drift."""
    raw = yaml.safe_load(compose_text())["services"]  # anchors merged, nothing interpolated
    checked = 0
    for name in app_services():
        for key, spelled in raw[name]["environment"].items():
            match = VARIABLE.fullmatch(str(spelled))
            if key.lower() not in Settings.model_fields or match is None or match["op"] is None:
                continue
            expected = settings_default(key)
            assert as_setting(key, match["default"]) == expected, f"{name}: {key}={spelled}, not {expected!r}"
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("service", "variable", "value"),
    [
        ("api", "ALLOWED_MODELS", "my/model,synthetic:tiny"),
        ("worker-gpu0", "ALLOWED_MODELS", "my/model,synthetic:tiny"),
        ("worker-gpu1", "ALLOWED_MODELS", "my/model,synthetic:tiny"),
        ("worker-gpu0", "OFFLOAD_MODE", "sequential"),
        ("worker-gpu1", "OFFLOAD_MODE", "sequential"),
        ("worker-gpu0", "VRAM_BUDGET_GB", "6"),
        ("worker-gpu1", "VRAM_BUDGET_GB", "6"),
        ("worker-gpu0", "HOST_RAM_BUDGET_GB", "24"),
        ("api", "WEBHOOK_SECRET", "s3cret"),
    ],
)
def test_settings_are_passed_from_the_environment(service: str, variable: str, value: str) -> None:
    assert service_env(service, {variable: value})[variable] == value


def test_the_worker_model_is_allowed_by_default() -> None:
    """Else every job that names no model would be refused with 422."""
    worker = service_env("worker-gpu0")
    assert worker["WORKER_MODEL"] in worker["ALLOWED_MODELS"].split(",")
    assert service_env("api")["ALLOWED_MODELS"] == worker["ALLOWED_MODELS"]


def test_long_running_services_restart_and_the_migration_does_not() -> None:
    policies = {name: service.get("restart") for name, service in services().items()}
    assert policies.pop("migrate") == "no"
    assert policies == dict.fromkeys(
        ["postgres", "redis", "api", "worker-gpu0", "worker-gpu1"], "unless-stopped"
    )


def test_the_api_is_published_on_loopback_unless_told_otherwise() -> None:
    assert services()["api"]["ports"] == ["127.0.0.1:8000:8000"]
    assert services({"API_BIND": "0.0.0.0", "API_PORT": "9000"})["api"]["ports"] == ["0.0.0.0:9000:8000"]
    published = [port for service in services().values() for port in service.get("ports", [])]
    assert all(str(port).count(":") == 2 for port in published), f"a port without a host address: {published}"
    # Inside its container it must listen on every interface, which is why it needs a key to start.
    assert service_env("api")["API_HOST"] == "0.0.0.0"


def test_the_worker_healthcheck_reads_recorded_readiness_not_a_celery_ping() -> None:
    """The solo pool cannot answer `celery inspect ping` while it renders: the check failed during any job."""
    for name in worker_services():
        test = services()[name]["healthcheck"]["test"]
        assert test == ["CMD", "nightrender", "worker-health"], name


def test_every_nightrender_command_compose_runs_exists() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nightrender"] == "cli.main:app"
    commands = [service["command"] for service in services().values() if "command" in service]
    commands += [
        service["healthcheck"]["test"][1:] for service in services().values() if "healthcheck" in service
    ]
    names = {command[1] for command in commands if command[0] == "nightrender"}
    assert names >= {"api", "worker", "migrate", "worker-health"}
    for name in sorted(names):
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, f"nightrender {name}: {result.output}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined and comments dropped."""
    lines = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def test_the_image_creates_volume_mount_points_owned_by_its_user() -> None:
    """A named volume takes the ownership of its mount point: a root-owned /data/outputs kept images out."""
    instructions = dockerfile_instructions()
    users = [index for index, (keyword, _) in enumerate(instructions) if keyword == "USER"]
    assert users and instructions[users[-1]][1].strip() == "nightrender"
    runs = [args for keyword, args in instructions[: users[0]] if keyword == "RUN"]
    shell = [shlex.split(command) for args in runs for command in args.split("&&")]
    made = {path for words in shell if words[0] == "mkdir" for path in words[1:] if not path.startswith("-")}
    owned = [words for words in shell if words[0] == "chown" and "-R" in words]
    targets = {
        mount.split(":")[1]
        for name in app_services()
        for mount in services()[name].get("volumes", [])
        if not mount.startswith((".", "/"))  # named volumes, not bind mounts
    }
    assert targets == {"/data/outputs", "/models"}
    for target in targets:
        assert any(path == target or path.startswith(target + "/") for path in made), f"{target} not created"
        assert any(
            words[2].split(":")[0] == "nightrender"
            and any(target == path or target.startswith(path.rstrip("/") + "/") for path in words[3:])
            for words in owned
        ), f"{target} not owned by nightrender before USER"


def test_env_example_lists_every_compose_variable_with_the_compose_default() -> None:
    example = env_example()
    texts = strings(yaml.safe_load(compose_text()))
    occurrences = [(match["name"], match["default"]) for text in texts for match in VARIABLE.finditer(text)]
    assert {name for name, _ in occurrences} == set(example)
    assert [(name, default) for name, default in occurrences if default != example[name]] == []
    lines = (ROOT / ".env.example").read_text().splitlines()
    assignments = [index for index, line in enumerate(lines) if "=" in line and not line.startswith("#")]
    assert [lines[i] for i in assignments if not lines[i - 1].startswith("#")] == [], "a comment above each"


def test_compose_sets_only_real_settings() -> None:
    """A misspelt variable is silently ignored by Settings (extra="ignore")."""
    for name, service in services().items():
        keys = set(service.get("environment", {}))
        if name in app_services():
            assert {key for key in keys if key.lower() not in Settings.model_fields} <= NOT_SETTINGS, name
        else:
            assert all(key.startswith("POSTGRES_") for key in keys), name


def test_env_example_changes_nothing_for_the_cli() -> None:
    """The CLI reads .env in its folder too: a copied .env.example must leave each setting at its default."""
    example = env_example()
    assert {key for key in example if key.lower() not in Settings.model_fields} == COMPOSE_ONLY
    for key in example.keys() - COMPOSE_ONLY:
        assert as_setting(key, example[key]) == settings_default(key), key


def test_env_is_ignored_and_its_example_is_not() -> None:
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert ignored(".env")
    assert not ignored(".env.example")
    assert ".env" in (ROOT / ".dockerignore").read_text().split(), (
        "local secrets stay out of the build context"
    )


def reserved_devices(name: str) -> list[dict[str, Any]]:
    """The devices a service reserves."""
    return services()[name]["deploy"]["resources"]["reservations"]["devices"]  # type: ignore[no-any-return]


def test_each_worker_reserves_its_own_gpu_and_names_it_in_worker_gpu() -> None:
    """One worker per GPU: each reserves one card by id, the card its WORKER_GPU names, no two the same."""
    names = worker_services()
    assert names == ["worker-gpu0", "worker-gpu1"]
    for name in names:
        (device,) = reserved_devices(name)
        assert {key: device[key] for key in ("driver", "capabilities")} == {
            "driver": "nvidia",
            "capabilities": ["gpu"],
        }
        assert "count" not in device, f"{name} reserves a count of cards, not its own"
        assert device["device_ids"] == [service_env(name)["WORKER_GPU"]] == [name.removeprefix("worker-gpu")]
    assert len({tuple(reserved_devices(name)[0]["device_ids"]) for name in names}) == len(names)


def test_the_workers_differ_only_in_their_gpu_and_the_second_runs_with_its_profile() -> None:
    """The same image, command, settings, volumes and checks; a one-GPU machine starts worker-gpu0 alone."""
    first, second = (dict(services()[name]) for name in worker_services())
    assert (first.pop("profiles", None), second.pop("profiles")) == (None, ["gpu1"])
    for service in (first, second):
        service.pop("deploy")
        service["environment"] = {k: v for k, v in service["environment"].items() if k != "WORKER_GPU"}
    assert first == second
    env = {"VRAM_BUDGET_GB": "6"}
    gpu0, gpu1 = (service_env(name, env) for name in worker_services())
    assert gpu0.items() ^ gpu1.items() == {("WORKER_GPU", "0"), ("WORKER_GPU", "1")}

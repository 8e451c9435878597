"""docker-compose.yml is valid Compose and keeps Prism's deployment invariants.

The docker compose plugin is not guaranteed where tests run, so the file is checked against
the Compose Specification JSON schema (tests/data/compose_spec.json, see tests/data/README.md)
after the variable interpolation Compose itself performs, with every variable unset.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = Path(__file__).parent / "data" / "compose_spec.json"
COMPONENTS = ("cache", "encoder", "decoder", "gateway")
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")
# Fields Compose converts to numbers after interpolation (the schema wants integers there).
_INTEGER_FIELDS = {"replicas"}


def interpolate(value: Any, env: dict[str, str], key: str = "") -> Any:
    """`${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`, as Compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, key) for v in value]
    if not isinstance(value, str):
        return value
    out = _VAR.sub(lambda m: env.get(m["name"]) or (m["default"] or ""), value)
    out = out.replace("$$", "$")
    return int(out) if key in _INTEGER_FIELDS and out.isdigit() else out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env={})


def spec_validator(jsonschema: Any) -> Any:
    schema = yaml.safe_load(SCHEMA.read_text())  # JSON is YAML
    # The file names draft 2019-09 with a spelling ("http://...schema#") jsonschema does not map.
    return jsonschema.Draft201909Validator(schema)


def test_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = spec_validator(jsonschema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    """The validation is live: a misspelt key and a wrong condition are rejected."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = spec_validator(jsonschema)
    bad = yaml.safe_load(yaml.safe_dump(compose))
    bad["services"]["cache"]["healthchek"] = bad["services"]["cache"].pop("healthcheck")
    bad["services"]["gateway"]["depends_on"]["encoder"]["condition"] = "healthy"
    assert len(list(validator.iter_errors(bad))) >= 2


def test_every_component_is_health_checked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in COMPONENTS:
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD" and "python" in check["test"][1], name
        probe = check["test"][-1]
        if name == "gateway":
            assert "/ready" in probe
        else:
            assert "grpc_health" in probe and f":{port_of(services[name])}" in probe
        compile(probe, f"{name}-healthcheck", "exec")  # the one-liner is valid Python


def port_of(service: dict[str, Any]) -> str:
    command = service["command"]
    return command[command.index("--port") + 1]


def test_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    jobs = {n for n, s in services.items() if s.get("restart") == "no"}  # one-shot (prepare)
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep in jobs else "service_healthy"
            assert spec["condition"] == expected, (name, dep)
    assert set(services["gateway"]["depends_on"]) == {"encoder", "decoder"}
    for backend in ("encoder", "decoder"):
        assert "cache" in services[backend]["depends_on"]


def test_backends_scale_and_are_reached_by_service_name(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for backend in ("encoder", "decoder"):
        assert isinstance(services[backend]["deploy"]["replicas"], int)
        assert "ports" not in services[backend]  # replicas cannot share a published port
        gateway_cmd = services["gateway"]["command"]
        address = gateway_cmd[gateway_cmd.index(f"--{backend}") + 1]
        assert address == f"{backend}:{port_of(services[backend])}"
        cmd = services[backend]["command"]
        assert cmd[cmd.index("--cache") + 1] == f"cache:{port_of(services['cache'])}"
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_volumes_and_model(compose: dict[str, Any]) -> None:
    services, declared = compose["services"], set(compose["volumes"])
    used = {
        v.split(":")[0]
        for s in services.values()
        for v in s.get("volumes", [])
        if not v.startswith((".", "/"))
    }
    assert used <= declared and {"hf-cache", "cache-disk"} <= used
    cache_cmd = services["cache"]["command"]
    disk = cache_cmd[cache_cmd.index("--disk-path") + 1]
    assert any(v.endswith(":" + disk) for v in services["cache"]["volumes"])
    for backend in ("encoder", "decoder"):
        assert services[backend]["environment"]["HF_HOME"] == "/data/hf"
        assert "hf-cache:/data/hf" in services[backend]["volumes"]
    # MODEL reaches the backends (unset here: the demo the prepare job writes).
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "${MODEL:-prism-demo}" in raw["encoder"]["command"]
    assert interpolate(raw["decoder"]["command"], {"MODEL": "org/m"})[-1] == "org/m"
    assert services["gateway"]["ports"] == ["8080:8080"]


def test_interpolation() -> None:
    env = {"A": "x", "E": ""}
    assert interpolate("${A}-${B:-d}-${E:-e}-$$", env) == "x-d-e-$"
    assert interpolate({"replicas": "${N:-2}"}, env) == {"replicas": 2}

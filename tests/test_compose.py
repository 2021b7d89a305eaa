"""Static checks of compose.yaml and the Dockerfiles it builds.

There is no Docker engine on the development machines or in CI, so these tests
check what can be checked without one: every service has an image or a build,
every build context and Dockerfile exists, every file a Dockerfile COPYs from
the build context exists in the repository, depends_on names real services,
and port mappings are well formed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"


def load_compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), "compose.yaml must be a mapping"
    return doc


def services() -> dict[str, dict[str, Any]]:
    svcs = load_compose().get("services")
    assert isinstance(svcs, dict) and svcs, "compose.yaml needs a non-empty services mapping"
    return svcs


def build_of(svc: dict[str, Any]) -> tuple[Path, Path] | None:
    """(context dir, Dockerfile path) of a service's build, or None."""
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        context, dockerfile = build, "Dockerfile"
    else:
        context = build.get("context", ".")
        dockerfile = build.get("dockerfile", "Dockerfile")
    ctx = (REPO / context).resolve()
    return ctx, (ctx / dockerfile).resolve()


def dockerfile_lines(path: Path) -> list[str]:
    """Logical lines of a Dockerfile: comments dropped, continuations joined."""
    lines: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def copy_sources(line: str) -> list[str] | None:
    """Sources of a COPY/ADD line from the build context, or None if not one."""
    m = re.match(r"(?i)^(COPY|ADD)\s+(.*)$", line)
    if not m:
        return None
    rest = m.group(2).strip()
    if rest.startswith("["):  # JSON form: ["src", ..., "dest"]
        args = json.loads(rest)
    else:
        args = shlex.split(rest)
    flags = [a for a in args if a.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return []  # copies from another stage or image, not from the context
    paths = [a for a in args if not a.startswith("--")]
    assert len(paths) >= 2, f"COPY needs a source and a destination: {line!r}"
    return paths[:-1]


SERVICE_NAMES = sorted(services())


def test_compose_has_expected_services() -> None:
    assert {"postgres", "sidecar", "kamailio"} <= set(SERVICE_NAMES)


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_service_has_image_or_build(name: str) -> None:
    svc = services()[name]
    assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"


BUILT = [name for name in SERVICE_NAMES if "build" in services()[name]]


def test_images_we_build() -> None:
    assert {"sidecar", "kamailio"} <= set(BUILT)


@pytest.mark.parametrize("name", BUILT)
def test_build_context_and_dockerfile_exist(name: str) -> None:
    b = build_of(services()[name])
    assert b is not None
    ctx, dockerfile = b
    assert ctx.is_dir(), f"{name}: build context {ctx} does not exist"
    assert ctx == REPO or REPO in ctx.parents, f"{name}: build context {ctx} is outside the repo"
    assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} does not exist"


@pytest.mark.parametrize("name", BUILT)
def test_dockerfile_copies_existing_files(name: str) -> None:
    b = build_of(services()[name])
    assert b is not None
    ctx, dockerfile = b
    lines = dockerfile_lines(dockerfile)
    assert any(re.match(r"(?i)^FROM\s", line) for line in lines), f"{dockerfile}: no FROM"
    for line in lines:
        sources = copy_sources(line)
        for src in sources or []:
            assert not src.startswith(("http://", "https://")), f"{dockerfile}: {line!r}"
            matches = list(ctx.glob(src.rstrip("/"))) if any(c in src for c in "*?[") else []
            target = ctx / src
            assert matches or target.exists(), (
                f"{dockerfile.relative_to(REPO)}: {line!r}: {src} not found in the build context"
            )


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_depends_on_names_exist(name: str) -> None:
    deps = services()[name].get("depends_on", [])
    names = list(deps) if isinstance(deps, (list, dict)) else []
    assert isinstance(deps, (list, dict)), f"{name}: depends_on must be a list or mapping"
    for dep in names:
        assert dep in SERVICE_NAMES, f"{name} depends on unknown service {dep!r}"
        assert dep != name, f"{name} depends on itself"
    if isinstance(deps, dict):
        for dep, cond in deps.items():
            assert cond.get("condition") in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }, f"{name}: bad condition for {dep}: {cond!r}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services()[dep], (
                    f"{name} waits for {dep} healthy but it has no healthcheck"
                )


# [host_ip:][host_port[-range]:]container_port[-range][/protocol]
PORT_RE = re.compile(
    r"^(?:(?P<ip>\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?"
    r"(?:(?P<host>\d+(?:-\d+)?):)?"
    r"(?P<container>\d+(?:-\d+)?)"
    r"(?:/(?P<proto>tcp|udp|sctp))?$"
)


def _port_ok(n: str) -> bool:
    return all(1 <= int(p) <= 65535 for p in n.split("-"))


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_ports_well_formed(name: str) -> None:
    for port in services()[name].get("ports", []):
        if isinstance(port, dict):  # long syntax
            assert 1 <= int(port["target"]) <= 65535, f"{name}: bad port {port!r}"
            assert port.get("protocol", "tcp") in {"tcp", "udp", "sctp"}
            continue
        m = PORT_RE.match(str(port))
        assert m, f"{name}: malformed port {port!r}"
        assert _port_ok(m.group("container")), f"{name}: port out of range {port!r}"
        if m.group("host"):
            assert _port_ok(m.group("host")), f"{name}: port out of range {port!r}"


def test_kamailio_publishes_sip_udp_and_tcp() -> None:
    ports = {str(p) for p in services()["kamailio"].get("ports", [])}
    assert any(p.endswith("5060/udp") for p in ports)
    assert any(p.endswith("5060/tcp") or p.endswith(":5060") for p in ports)


def test_sidecar_publishes_api_port() -> None:
    ports = [str(p) for p in services()["sidecar"].get("ports", [])]
    assert any(p.split("/")[0].endswith("8080") for p in ports)

"""``compose.yaml``: what can be checked without a container engine. The file parses, its
environment overrides name real settings, its ports agree with the configuration, and
every service's command runs the same way here (hosts and ports mapped to loopback):
events flow from the simulator through the relay to the sink."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from relay.config import Config, load_config
from relay.store.embedded import free_port
from tests.support.common import wait_for
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
SERVICES = {"redis", "relay", "simulator", "sink", "prometheus"}
HOSTS = r"(?:relay|simulator|sink|redis|0\.0\.0\.0|127\.0\.0\.1)"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def test_compose_names_every_service_and_builds_the_relay_from_the_dockerfile() -> None:
    s = services()
    assert s["simulator"]["environment"] == s["relay"]["environment"]  # one file, one env
    assert set(s) == SERVICES
    for name in ("relay", "simulator", "sink"):
        assert s[name]["build"] == "."
    assert (ROOT / "Dockerfile").exists()
    redis = s["redis"]["command"]
    # What the relay needs of its Redis, kept on a volume.
    needed = {"--appendonly": "yes", "--appendfsync": "always", "--maxmemory-policy": "noeviction"}
    for flag, value in needed.items():
        assert redis[redis.index(flag) + 1] == value
    assert any(v.endswith(":/data") for v in s["redis"]["volumes"])


def published(name: str) -> set[int]:
    """The container ports a service publishes: those it serves."""
    return {int(str(p).split(":")[-1]) for p in services()[name].get("ports", [])}


def healthcheck(name: str) -> list[str] | None:
    """The check a service's container runs (its own, or the one its image declares),
    as argv; None when it has none."""
    svc = services()[name]
    check = svc.get("healthcheck")
    if check is not None:
        if check.get("disable") or check["test"] == ["NONE"]:
            return None
        kind, *rest = check["test"]
        return list(rest) if kind == "CMD" else ["/bin/sh", "-c", rest[0]]
    if svc.get("build") != ".":
        return None
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.search(r"^HEALTHCHECK .*? CMD (.+)$", dockerfile, re.MULTILINE)
    return None if found is None else ["/bin/sh", "-c", found.group(1)]


def test_each_service_from_the_relay_image_checks_a_port_it_serves() -> None:
    # The relay image's HEALTHCHECK asks for the admin port, 9090: a service that reuses
    # the image for something else (the simulator, the sink) needs a check of its own.
    for name, svc in services().items():
        if svc.get("build") != ".":
            continue
        argv = healthcheck(name)
        assert argv is not None, name
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", " ".join(argv))}
        assert ports, (name, argv)
        assert ports <= published(name), (name, argv)


def test_environment_overrides_name_real_settings() -> None:
    for name, value in services()["relay"]["environment"].items():
        if not name.startswith("CHERT_RELAY__"):
            continue
        section, key = name.removeprefix("CHERT_RELAY__").lower().split("__")
        assert section in Config.model_fields, name
        sub = Config.model_fields[section].annotation
        assert key in sub.model_fields, name
        assert value


def test_ports_agree_with_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    s = services()
    for name, value in s["relay"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    config = load_config(ROOT / "config" / "compose.toml")
    assert config.server.listen.port == 8080
    assert config.admin.listen is not None
    assert config.admin.listen.port == 9090
    published = [p.split(":") for p in s["relay"]["ports"]]
    assert {int(p[-1]) for p in published} == {8080, 9090}
    assert all(p[0] == "127.0.0.1" for p in published)  # the admin listener stays private
    sim = s["simulator"]["command"]
    assert sim[sim.index("--webhook-url") + 1].startswith("http://relay:8080/")
    assert sim[sim.index("--listen") + 1].endswith(":8070")
    tenant = config.tenants[0]
    assert tenant.api.base_url.startswith("http://simulator:8070/")
    sink = s["sink"]["command"]
    assert tenant.sinks[0].url.startswith(
        f"http://sink:{sink[sink.index('--sink') + 1].split(':')[1]}/"
    )
    prom = yaml.safe_load((ROOT / "ops" / "compose" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["relay:9090"]


def test_prometheus_config_loads_with_the_alert_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    # As the container mounts them: side by side.
    shutil.copy(ROOT / "ops" / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "ops" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    out = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


class Loopback:
    """Maps the services' hosts and ports to free ports on 127.0.0.1."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}

    def port(self, port: int) -> int:
        return self.ports.setdefault(port, free_port())

    def __call__(self, text: str) -> str:
        return re.sub(
            rf"\b{HOSTS}:(\d+)", lambda m: f"127.0.0.1:{self.port(int(m.group(1)))}", text
        )


@pytest.fixture
async def running() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


async def test_every_service_runs_as_composed_and_events_flow(
    tmp_path: Path, running: list[subprocess.Popen[bytes]]
) -> None:
    s = services()
    local = Loopback()
    conf = tmp_path / "compose.toml"
    conf.write_text(local((ROOT / "config" / "compose.toml").read_text()))
    mounted = "/etc/chert-relay/compose.toml"

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        argv = [local(a.replace(mounted, str(conf))) for a in argv]
        environ = {**os.environ, **{k: local(str(v)) for k, v in (env or {}).items()}}
        with (tmp_path / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, env=environ, cwd=tmp_path)
        running.append(proc)

    redis = list(s["redis"]["command"])
    redis[redis.index("--port") + 1] = str(local.port(int(redis[redis.index("--port") + 1])))
    start("redis", [*redis, "--dir", str(tmp_path)])
    relay = [sys.executable, "-m", "relay"]  # the image's ENTRYPOINT is chert-relay
    start("relay", [*relay, *s["relay"]["command"]], s["relay"]["environment"])
    start("sink", [*relay, *s["sink"]["command"]])
    start("simulator", [*relay, *s["simulator"]["command"]], s["simulator"]["environment"])

    admin = f"http://127.0.0.1:{local.port(9090)}"
    stats = f"http://127.0.0.1:{local.port(8090)}/_sink/stats"

    async def flowing() -> bool:
        for p in running:
            assert p.poll() is None, [log.read_text() for log in tmp_path.glob("*.log")]
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{admin}/readyz") as resp:
                    if resp.status != 200:
                        return False
                async with session.get(stats) as resp:
                    counts = await resp.json()
        except aiohttp.ClientError:
            return False
        return counts["distinct"] >= 3 and counts["bad_signatures"] == 0

    await wait_for(flowing, 60, interval=0.2)

    # Each container's health check, as it runs inside that container: its own ports are
    # served there, any other port of 127.0.0.1 is not.
    closed = free_port()
    for name, svc in s.items():
        argv = healthcheck(name) if svc.get("build") == "." else None
        if argv is None:
            continue
        own = published(name)

        def inside(text: str, own: set[int] = own) -> str:
            return re.sub(
                r"\b127\.0\.0\.1:(\d+)",
                lambda m: f"127.0.0.1:{local.port(int(m[1])) if int(m[1]) in own else closed}",
                text,
            )

        argv = [inside(a) for a in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[-1].startswith("python "):
            argv[-1] = shlex.quote(sys.executable) + argv[-1].removeprefix("python")
        check = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, (name, argv, check.stdout + check.stderr)

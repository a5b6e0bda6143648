"""The Grafana dashboard in ops/grafana is importable and well-formed, its queries are
valid PromQL, and every ``chert_relay_*`` metric it or the alert rules use is exported
by a real running relay.

The relay runs as ``chert-relay run`` (every role in one process: the receiver and
poller export some families, the worker the others) against a simulated Chert and a
real sink with one healthy, one gone (410) and one failing (503) endpoint, so that
the labelled metrics that only appear once used have children.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay.simulator import SimTenant, Simulator
from tests.ops.test_rules import alert_rules, promtool
from tests.support.common import TENANT, WEBHOOK_SECRET, config_dict, envelope, signed, wait_for
from tests.support.process import RelayProcess, listen_ports, write_toml

ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "chert-relay.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
API_SECRET = "3c5e7a9b1d2f40618293a4b5c6d7e8f9"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Metrics without a tenant label: panels over them cannot follow the tenant variable.
NO_TENANT = {
    "chert_relay_redis_up",
    "chert_relay_draining",
    "chert_relay_webhook_ack_seconds_bucket",
    "chert_relay_ingest_batch_seconds_bucket",
    "chert_relay_ingest_batch_size_sum",
    "chert_relay_ingest_batch_size_count",
    "chert_relay_queue_ready_jobs",
    "chert_relay_queue_scheduled_jobs",
    "chert_relay_queue_oldest_ready_age_seconds",
    "chert_relay_deliveries_running",
}
METRIC = re.compile(r"\bchert_relay_[A-Za-z0-9_]+")


# --- the dashboard ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels (collapsed rows keep theirs inside) included."""
    out: list[dict[str, Any]] = []
    for panel in data["panels"]:
        out.append(panel)
        out += panel.get("panels") or []
    return out


def panel_exprs(data: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(data) for t in p.get("targets") or []]


def variable_queries(data: dict[str, Any]) -> list[str]:
    out = []
    for var in data["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            out.append(query if isinstance(query, str) else query["query"])
    return out


def test_dashboard_is_importable_with_a_datasource_tenant_and_sink() -> None:
    data = dashboard()
    assert data["schemaVersion"] >= 36
    assert data["uid"]
    assert data["title"]
    assert data.get("id") is None, "an exported dashboard carries no database id"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in ("tenant", "sink"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE
        assert var["multi"] is True
        assert var["includeAll"] is True
        assert var["query"].startswith("label_values(")
    assert "$tenant" in variables["sink"]["query"], "the sink list follows the tenant choice"


def test_every_panel_has_the_datasource_and_a_query() -> None:
    data = dashboard()
    ids = [p["id"] for p in panels(data)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    problems: list[str] = []
    for panel in panels(data):
        title = panel.get("title", "?")
        pos = panel["gridPos"]
        if not (pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0):
            problems.append(f"{title}: gridPos {pos} is outside the 24-column grid")
        if panel["type"] == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{title}: datasource is not {DATASOURCE}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title}: no query")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"{title}: refIds repeat")
        for t in targets:
            if not str(t.get("expr", "")).strip():
                problems.append(f"{title}: target {t.get('refId')} has no expr")
            if t.get("datasource") != DATASOURCE:
                problems.append(f"{title}: target {t.get('refId')} datasource is not {DATASOURCE}")
            per_tenant = [m for m in METRIC.findall(t.get("expr", "")) if m not in NO_TENANT]
            if per_tenant and 'tenant=~"$tenant"' not in t["expr"]:
                problems.append(f"{title}: {per_tenant} not filtered by the tenant variable")
    assert not problems, "\n".join(problems)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule, Grafana's variables
    replaced by values)."""
    exprs = panel_exprs(dashboard())
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        concrete = (
            expr.replace("$__rate_interval", "5m").replace("$tenant", ".*").replace("$sink", ".*")
        )
        assert "$" not in concrete, f"a Grafana variable left in {expr!r}"
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(concrete)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# --- the metric names against a real relay -------------------------------------------------


def used_metric_names() -> dict[str, set[str]]:
    """Metric name → where it is used ('dashboard', 'alerts')."""
    used: dict[str, set[str]] = {}
    data = dashboard()
    sources: list[tuple[str, Iterable[str]]] = [
        ("dashboard", panel_exprs(data) + variable_queries(data)),
        ("alerts", [str(rule["expr"]) for rule in alert_rules()]),
    ]
    for where, texts in sources:
        for text in texts:
            for name in METRIC.findall(text):
                used.setdefault(name, set()).add(where)
    return used


def exported(text: str) -> dict[str, str]:
    """Sample name → the type of its family, for every sample in a /metrics answer."""
    out: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = family.type
    return out


def missing_names(used: Iterable[str], samples: dict[str, str]) -> list[str]:
    missing = []
    for name in sorted(used):
        kind = samples.get(name)
        if kind is None:
            missing.append(name)
        elif name.endswith(HISTOGRAM_SUFFIXES) and kind != "histogram":
            missing.append(f"{name} (exported, but not by a histogram: it is a {kind})")
    return missing


def test_missing_names_understands_histograms_and_counters() -> None:
    text = (
        "# TYPE chert_relay_x_seconds histogram\n"
        'chert_relay_x_seconds_bucket{le="+Inf"} 1.0\n'
        "chert_relay_x_seconds_count 1.0\nchert_relay_x_seconds_sum 0.5\n"
        "# TYPE chert_relay_y_total counter\nchert_relay_y_total 3.0\n"
        "# TYPE chert_relay_z_count gauge\nchert_relay_z_count 3.0\n"
        "# TYPE chert_relay_w_total counter\n"  # a labelled counter with no child yet
    )
    samples = exported(text)
    assert missing_names(["chert_relay_x_seconds_bucket", "chert_relay_y_total"], samples) == []
    assert missing_names(["chert_relay_w_total", "chert_relay_x_seconds"], samples) == [
        "chert_relay_w_total",
        "chert_relay_x_seconds",
    ]
    assert missing_names(["chert_relay_z_count"], samples) == [
        "chert_relay_z_count (exported, but not by a histogram: it is a gauge)"
    ]


class Sinks:
    """One real HTTP server: /ok answers 200, /gone 410, /down 503."""

    def __init__(self) -> None:
        self.url = ""
        self.hits: dict[str, int] = {}

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        status = {"ok": 200, "gone": 410, "down": 503}.get(name, 404)
        return web.Response(status=status)


@contextlib.asynccontextmanager
async def sink_server() -> AsyncIterator[Sinks]:
    sinks = Sinks()
    app = web.Application()
    app.router.add_post("/{name}", sinks.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        sinks.url = f"http://{host}:{port}"
        yield sinks
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def chert() -> AsyncIterator[Simulator]:
    """A simulated Chert serving the tenant's events API (no webhooks of its own)."""
    sim = Simulator([SimTenant(slug=TENANT, api_secret=API_SECRET, webhook_secret=WEBHOOK_SECRET)])
    await sim.start(host="127.0.0.1", port=0)
    try:
        yield sim
    finally:
        await sim.stop()


def relay_config(path: Path, redis_url: str, api_url: str, sink_url: str) -> tuple[str, str]:
    """Write the relay's config; return (webhook URL, admin URL)."""
    port, admin = listen_ports()
    tenant = {
        "slug": TENANT,
        "webhook_secrets": [WEBHOOK_SECRET],
        "api": {"base_url": api_url, "auth": "hmac", "signing_secret": API_SECRET,
                "max_backoff": 0.2},
        "poll": {"mode": "always", "interval": 0.2, "overlap": 60.0, "initial_lookback": 600.0,
                 "lease_ttl": 2.0},
        "sinks": [
            {"name": "ok", "url": f"{sink_url}/ok"},
            {"name": "gone", "url": f"{sink_url}/gone"},
            {"name": "down", "url": f"{sink_url}/down", "timeout": 2.0},
        ],
    }  # fmt: skip
    data = config_dict(
        redis_url=redis_url,
        tenants=[tenant],
        server={"listen": f"127.0.0.1:{port}"},
        admin={"listen": f"127.0.0.1:{admin}"},
        relay={"state_dir": str(path.parent / "state")},
        worker={"poll_delay": 0.02, "retry_backoff": 0.05, "retry_backoff_max": 0.2,
                "breaker_failures": 2, "breaker_cooldown": 30, "busy_defer": 0.05},
    )  # fmt: skip
    write_toml(path, data)
    return f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}", f"http://127.0.0.1:{admin}"


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    redis_url: str, tmp_path: Path
) -> None:
    used = used_metric_names()
    assert {"dashboard", "alerts"} <= set().union(*used.values())
    async with chert() as sim, sink_server() as sinks:
        sim.emit(TENANT, count=2)  # in Chert's log only: the poller brings them
        sim.faults.api_500 = 1  # one error answer for chert_api_errors_total
        webhook_url, admin = relay_config(tmp_path / "relay.toml", redis_url, sim.base_url,
                                          sinks.url)  # fmt: skip
        relay = RelayProcess(tmp_path / "relay.toml", "run").start()
        try:
            await relay.wait_ready(admin)
            async with aiohttp.ClientSession() as http:
                for i in range(3):
                    body, headers = signed(envelope(f"ops-metrics:{i}"))
                    async with http.post(webhook_url, data=body, headers=headers) as r:
                        assert r.status == 202, await r.text()
                body, headers = signed(envelope("ops-metrics:forged"), secret="not-the-secret")
                async with http.post(webhook_url, data=body, headers=headers) as r:
                    assert r.status == 401

                samples: dict[str, str] = {}

                async def all_exported() -> bool:
                    nonlocal samples
                    async with http.get(f"{admin}/metrics") as r:
                        assert r.status == 200
                        samples = exported(await r.text())
                    return not missing_names(used, samples)

                try:
                    await wait_for(all_exported, timeout=30, interval=0.1)
                except AssertionError:
                    missing = missing_names(used, samples)
                    where = {m: sorted(used[m.split()[0]]) for m in missing}
                    raise AssertionError(
                        f"used but not exported by a running relay: {where}; sink hits "
                        f"{sinks.hits}\n--- relay log ---\n{relay.log[-4000:]}"
                    ) from None
            assert sinks.hits.get("ok", 0) >= 3
            relay.signal(signal.SIGTERM)
            assert await relay.wait() == 0, relay.log
        finally:
            relay.kill()

"""The README's worked example of an http sink behind a firewall, as written there —
mutual TLS with a private CA, an egress proxy with a secret password, OAuth2 client
credentials — run end to end: its host names pointed at a real https sink, a real
tinyproxy and a real token endpoint, all with certificates the test makes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relay.config import load_config
from tests.support.certs import Authority, server_context
from tests.support.common import SINK_SECRET, wait_for
from tests.support.delivery import Sink, delivery_config, ingest, runtime, sinks, worker
from tests.support.oauth2 import TokenEndpoint, bearer_only
from tests.support.process import write_toml
from tests.support.proxy import tinyproxy

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### HTTP sinks behind a firewall: mutual TLS, private CAs, proxies, OAuth2"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index(HEADING) :]
    found = re.search(r"```toml\n(.*?)```", section, re.S)
    assert found is not None
    return found.group(1)


async def test_the_readme_firewall_example_delivers(
    redis: Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "certs"
    ca = Authority(certs, "internal-ca")
    server, client = ca.issue("sink", server=True), ca.issue("relay", server=False)
    client.cert.rename(certs / "relay.crt")
    client.key.rename(certs / "relay.key")
    monkeypatch.setenv("CRM_WEBHOOK_SECRET", SINK_SECRET)
    monkeypatch.setenv("EGRESS_PASSWORD", "egress-pass-5521")
    monkeypatch.setenv("CRM_CLIENT_SECRET", "crm-client-secret-77")
    # Both ask for the relay's client certificate: the token endpoint is reached the
    # way the sink is.
    mtls = server_context(server, client_ca=ca.ca_file)
    async with (
        TokenEndpoint("chert-relay", "crm-client-secret-77", ssl_context=mtls) as endpoint,
        tinyproxy(tmp_path / "proxy", "relay", "egress-pass-5521") as proxy,
        sinks(Sink(bearer_only(endpoint), ssl_context=mtls, path="/hooks/chert")) as (s,),
    ):
        token_port = endpoint.url.split(":")[2].split("/")[0]
        example = (
            readme_example()
            .replace("crm.internal", f"127.0.0.1:{s.port}")
            .replace("egress.internal:3128", f"127.0.0.1:{proxy.port}")
            .replace("auth.internal", f"127.0.0.1:{token_port}")
        )
        path = write_toml(tmp_path / "relay.toml", delivery_config(redis_url, []))
        path.write_text(path.read_text() + "\n" + example)
        cfg = load_config(path, env={})
        assert not [w for w in cfg.warnings() if "sinks[0]" in w]  # no literal secret
        rt = runtime(redis, cfg)
        await ingest(rt, ["e1", "e2"])
        async with worker(rt):
            await wait_for(lambda: sorted(s.ids()) == ["e1", "e2"], 15)
        assert {r.client for r in s.received} == {"relay"}
        assert {r.headers["Authorization"] for r in s.received} == {f"Bearer {endpoint.issued[0]}"}
        assert s.bad_signatures == 0
        assert endpoint.asked[0].form["scope"] == "events.write"
        # Everything went through the proxy (a tunnel per connection): sink and endpoint.
        assert set(proxy.requests()) == {
            f"CONNECT 127.0.0.1:{token_port}",
            f"CONNECT 127.0.0.1:{s.port}",
        }

"""A sink's TLS, proxy and OAuth2 keys at load: files resolved relative to the
configuration, read and parsed; every problem named with its key path by
``check-config``; literal secrets warned about, and never shown."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.config import load_config, parse_config
from relay.errors import ConfigError
from tests.support.certs import Authority
from tests.support.common import config_dict
from tests.support.process import write_toml


def one_sink(**fields: Any) -> dict[str, Any]:
    sink = {"name": "crm", "url": "https://crm.internal/hooks"} | fields
    return config_dict(sinks=[sink])


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    return dict(e.value.problems)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("certs") / "certs", "private-ca")


def test_files_are_relative_to_the_config_file_and_the_context_verifies(
    tmp_path: Path, ca: Authority
) -> None:
    client = ca.issue("relay", server=False)
    certs = ca.directory
    data = one_sink(
        ca_file=str(Path("..") / certs.parent.name / "certs" / ca.ca_file.name),
        client_cert_file=str(client.cert),
        client_key_file=str(client.key),
        tls_min_version="1.3",
    )
    conf_dir = certs.parent.parent / "conf"
    conf_dir.mkdir(exist_ok=True)
    cfg = load_config(write_toml(conf_dir / "relay.toml", data), env={})
    sink = cfg.tenants[0].sinks[0]
    assert sink.ca_file is not None
    assert Path(sink.ca_file).is_absolute()
    assert Path(sink.ca_file).resolve() == ca.ca_file.resolve()
    ctx = sink.tls_context()
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.cert_store_stats()["x509_ca"] == 1  # the private CA instead of the system's


def test_a_key_in_the_certificate_file_needs_no_key_file(tmp_path: Path, ca: Authority) -> None:
    client = ca.issue("relay", server=False)
    both = tmp_path / "relay.pem"
    both.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    cfg = parse_config(one_sink(client_cert_file=str(both)), env={})
    assert cfg.tenants[0].sinks[0].tls_context() is not None


def test_system_ca_adds_the_system_store_to_the_private_ca(ca: Authority) -> None:
    cfg = parse_config(one_sink(ca_file=str(ca.ca_file), system_ca=True), env={})
    ctx = cfg.tenants[0].sinks[0].tls_context()
    assert ctx is not None
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    assert ctx.cert_store_stats()["x509_ca"] == system + 1
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2  # unless tls_min_version says 1.3
    # Without any TLS key a sink has the defaults (the system's store).
    assert parse_config(one_sink(), env={}).tenants[0].sinks[0].tls_context() is None


def test_an_encrypted_key_opens_with_its_password(
    ca: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = ca.issue("locked", server=False, key_password="open-sesame-42")
    monkeypatch.setenv("KEY_PASSWORD", "open-sesame-42")
    fields = {"client_cert_file": str(client.cert), "client_key_file": str(client.key)}
    cfg = parse_config(one_sink(**fields, client_key_password="env:KEY_PASSWORD"), env={})
    assert cfg.tenants[0].sinks[0].tls_context() is not None
    assert not cfg.warnings() or not any("client_key_password" in w for w in cfg.warnings())
    found = problems(one_sink(**fields))
    assert found["tenants[0].sinks[0].client_key_file"].endswith(
        "is encrypted: set client_key_password"
    )
    monkeypatch.setenv("KEY_PASSWORD", "wrong-password")
    found = problems(one_sink(**fields, client_key_password="env:KEY_PASSWORD"))
    assert found["tenants[0].sinks[0].client_key_file"].startswith(
        "client_key_password does not decrypt"
    )
    # dlq, events and sinks (redis_only) load without it: they never open the key
    monkeypatch.delenv("KEY_PASSWORD")
    locked = one_sink(**fields, client_key_password="env:KEY_PASSWORD")
    cfg = parse_config(locked, env={}, redis_only=True)
    assert not cfg.tenants[0].sinks[0].client_key_password.resolved
    found = problems(locked)
    assert (
        "environment variable KEY_PASSWORD is not set"
        in found["tenants[0].sinks[0].client_key_password"]
    )


def test_check_config_names_every_problem_with_its_key_path(tmp_path: Path, ca: Authority) -> None:
    client = ca.issue("relay", server=False)
    other = Authority(tmp_path / "other", "other-ca").issue("relay", server=False)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"ca_file": "missing.pem"}, "ca_file", "cannot read"),
        ({"ca_file": "garbage.pem"}, "ca_file", "holds no PEM certificate"),
        (
            {"client_cert_file": str(client.cert), "client_key_file": str(client.cert)},
            "client_key_file",
            "holds no PEM private key",
        ),
        ({"client_cert_file": str(client.key)}, "client_cert_file", "holds no PEM certificate"),
        (
            {"client_cert_file": str(client.cert), "client_key_file": str(other.key)},
            "",
            "client_key_file is not the private key of client_cert_file's certificate",
        ),
        ({"client_cert_file": str(client.cert)}, "", "client_cert_file holds no private key"),
        ({"client_key_file": str(client.key)}, "", "client_key_file needs client_cert_file"),
        ({"client_key_file": "file:relay.key"}, "client_key_file", "not a secret reference"),
        ({"tls_min_version": "1.1"}, "tls_min_version", "'1.2' or '1.3'"),
        ({"system_ca": False}, "", "system_ca = false needs ca_file"),
        ({"proxy": "https://egress:3128"}, "proxy", "an https:// proxy is not supported"),
        ({"proxy": "socks5://user:pw-secret-9@egress:1080"}, "proxy", "a proxy is 'http://"),
        ({"proxy": "http://egress:3128/path"}, "proxy", "without a path"),
        ({"proxy_password": "pw"}, "", "proxy_password needs proxy"),
        (
            {"proxy": "http://egress:3128", "proxy_password": "pw"},
            "",
            "proxy_password needs the proxy URL to name the user",
        ),
        (
            {"oauth2": {"token_url": "http://auth.internal/token", "client_id": "c",
                        "client_secret": "s"}},
            "oauth2.token_url",
            "token_url is https://",
        ),
        (
            {"oauth2": {"token_url": "https://auth/t", "client_id": "c", "client_secret": "s",
                        "scope": 'a  "b'}},
            "oauth2.scope",
            "space-separated tokens",
        ),
        (
            {"oauth2": {"token_url": "https://auth/t", "client_id": "c", "client_secret": "s"},
             "headers": {"Authorization": "Bearer static"}},
            "",
            "remove the sink's own Authorization header",
        ),
        (
            {"oauth2": {"token_url": "https://auth/t", "client_id": "c", "client_secret": "s"},
             "url": "http://crm.internal/hooks"},
            "",
            "the sink's URL is https://",
        ),
        (
            {"oauth2": {"token_url": "https://auth/t", "client_id": "c", "client_secret": "s"},
             "url": "https://relay:pw@crm.internal/hooks"},
            "",
            "oauth2 and credentials in the URL: keep one",
        ),
        ({"ca_file": str(ca.ca_file), "url": "http://crm.internal/h"}, "", "for https:// sinks"),
        (
            {"ca_file": str(ca.ca_file), "url": "redis://127.0.0.1:6379/0", "stream": "s"},
            "",
            "ca_file is for http sinks; this sink is redis-stream",
        ),
    ]  # fmt: skip
    sinks = [
        {"name": f"s{i}", "url": "https://crm.internal/hooks"} | fields
        for i, (fields, _, _) in enumerate(bad)
    ]
    path = write_toml(tmp_path / "relay.toml", config_dict(sinks=sinks))
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--config", str(path), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 78, out.stderr
    text = out.stdout + out.stderr
    for i, (_, key, message) in enumerate(bad):
        where = f"tenants[0].sinks[{i}]" + (f".{key}" if key else "")
        lines = [line for line in text.splitlines() if where + ":" in line]
        assert lines, (where, text)
        assert message in lines[0], (where, lines[0])
    assert "pw-secret-9" not in text  # the errors never show a URL's value


def test_egress_secrets_written_in_the_file_are_warned_about(ca: Authority) -> None:
    cfg = parse_config(
        one_sink(
            proxy="http://relay:pw-in-url-77@egress:3128",
            oauth2={"token_url": "https://auth/t", "client_id": "c", "client_secret": "lit-s3c"},
        ),
        env={},
    )
    warnings = cfg.warnings()
    assert any("sinks[0].proxy holds a password" in w for w in warnings), warnings
    assert any("sinks[0].oauth2.client_secret is a literal secret" in w for w in warnings)
    assert not any("pw-in-url-77" in w or "lit-s3c" in w for w in warnings)
    cfg = parse_config(one_sink(proxy="http://relay@egress:3128", proxy_password="pw"), env={})
    assert any("sinks[0].proxy_password is a literal secret" in w for w in cfg.warnings())


def test_oauth2_to_this_machine_may_be_plain_http() -> None:
    oauth2 = {"token_url": "http://127.0.0.1:8080/token", "client_id": "c", "client_secret": "s"}
    cfg = parse_config(config_dict(sinks=[{"name": "a", "url": "http://localhost:9/h",
                                           "oauth2": oauth2}]), env={})  # fmt: skip
    found = cfg.tenants[0].sinks[0].oauth2
    assert found is not None
    assert found.auth_method == "basic"
    assert "'s'" not in repr(found)  # the secret is never shown


def test_the_example_configurations_firewall_sink_loads_once_uncommented(
    tmp_path: Path, ca: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).parent.parent / "config" / "relay.example.toml"
    text = example.read_text()
    block = text[text.rindex("# [[tenants.sinks]]") :]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    certs = tmp_path / "certs"
    certs.mkdir()
    client = ca.issue("example", server=False, key_password="key-pass-1")
    (certs / "internal-ca.pem").write_bytes(ca.ca_file.read_bytes())
    (certs / "relay.crt").write_bytes(client.cert.read_bytes())
    (certs / "relay.key").write_bytes(client.key.read_bytes())
    for name, value in {
        "CRM_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "RELAY_KEY_PASSWORD": "key-pass-1",
        "EGRESS_PASSWORD": "egress",
        "CRM_CLIENT_SECRET": "client-secret",
    }.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "relay.toml"
    path.write_text(text + "\n" + uncommented + "\n")
    sink = load_config(path, env={}).tenants[0].sinks[-1]
    assert sink.name == "internal-crm"
    assert sink.oauth2 is not None
    assert sink.oauth2.auth_method == "basic"
    assert sink.proxy_password is not None
    ctx = sink.tls_context()
    assert ctx is not None
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3

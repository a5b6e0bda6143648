"""How an http sink is reached: TLS (a client certificate for mutual TLS, a private CA,
a minimum version), a forward proxy, and OAuth2 client credentials — the checks at load
and the TLS context a delivery uses.

Certificate and key files are PEM, named by path (relative to the configuration file).
Each is read and parsed at load, so that ``check-config`` finds an unreadable key, a
key that needs a password, or a certificate that is not the key's; a delivery reads
them again when it builds its context (once per configuration: after a reload, the
renewed files). No key turns verification off.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from relay.config.base import Section
from relay.config.values import Secret, ServiceSecretField, check_http_url, plain_remote

TlsVersion = Literal["1.2", "1.3"]
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
NO_PROXY = "none"  # a sink's proxy: go direct, whatever the environment says

# The keys of an http sink's way out (refused on broker sinks), and those that only
# mean something for an https:// URL.
EGRESS_KEYS = (
    "ca_file", "system_ca", "client_cert_file", "client_key_file", "client_key_password",
    "tls_min_version", "proxy", "proxy_password", "oauth2",
)  # fmt: skip
TLS_KEYS = EGRESS_KEYS[:6]

# RFC 6749 appendix A: a scope is space-separated tokens of printable ASCII but " and \.
_SCOPE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}


def _resolve_path(value: object, info: ValidationInfo) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a path to a PEM file")
    if value.startswith(("env:", "file:")):
        raise ValueError(
            "a path to a PEM file (relative to the configuration file), not a secret "
            "reference: write the path alone"
        )
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path)


# A PEM file's path, made absolute (relative to the configuration file's directory).
PemPath = Annotated[str, BeforeValidator(_resolve_path)]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def check_ca_file(path: str) -> str:
    """``path`` holds PEM certificates OpenSSL can trust."""
    _read(path)
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return path


def check_cert_file(path: str) -> str:
    """``path`` holds a PEM certificate (and maybe its chain, and maybe its key)."""
    data = _read(path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return path


def check_key_file(path: str, password: Secret | None) -> str:
    """``path`` holds a PEM private key that ``password`` opens (or that needs none);
    not checked with a password this command could not read (it does not use it)."""
    if password is not None and not password.resolved:
        return path
    data = _read(path)
    try:
        serialization.load_pem_private_key(
            data, None if password is None else password.get().encode()
        )
    except TypeError:
        if password is None:
            raise ValueError(f"{path} is encrypted: set client_key_password") from None
        raise ValueError(f"{path} is not encrypted, but client_key_password is set") from None
    except ValueError as e:
        if password is not None and "decrypt" in str(e).lower():
            raise ValueError(f"client_key_password does not decrypt {path}") from None
        raise ValueError(f"{path} holds no PEM private key") from None
    except UnsupportedAlgorithm:
        raise ValueError(f"{path} holds a private key of a kind OpenSSL here cannot use") from None
    return path


def tls_context(
    *,
    ca_file: str | None,
    system_ca: bool | None,
    client_cert_file: str | None,
    client_key_file: str | None,
    client_key_password: Secret | None,
    tls_min_version: str | None,
) -> ssl.SSLContext:
    """The context a delivery uses: the server's certificate verified (always) against
    ``ca_file`` — and the system's store too when there is no ``ca_file`` or
    ``system_ca`` is true — and the client certificate presented when asked for.

    Raises ``OSError`` (a file unreadable) or ``ssl.SSLError`` (one OpenSSL refuses)."""
    ctx = ssl.create_default_context(cafile=ca_file)  # the system's store only without one
    if ca_file is not None and system_ca:
        ctx.load_default_certs()
    if client_cert_file is not None:
        password = None if client_key_password is None else client_key_password.get()
        ctx.load_cert_chain(client_cert_file, client_key_file, password)
    if tls_min_version is not None:
        ctx.minimum_version = TLS_VERSIONS[tls_min_version]
    return ctx


def check_proxy(value: str) -> str:
    """A sink's ``proxy``: ``"none"``, or ``http://[user[:password]@]host[:port]``.
    (The errors never show the value: it may carry a password.)"""
    if value == NO_PROXY:
        return value
    parts = urlsplit(value)
    if parts.scheme == "https":
        raise ValueError(
            "the proxy is reached over http:// (https:// sinks still go through it "
            "encrypted end to end, with CONNECT); an https:// proxy is not supported"
        )
    if parts.scheme != "http":
        raise ValueError("a proxy is 'http://host:port', or 'none' to go direct")
    if any(c.isspace() for c in value):
        raise ValueError("a URL cannot contain spaces")
    if not parts.hostname:
        raise ValueError("the proxy URL names no host")
    try:
        parts.port  # noqa: B018 - raises when out of range or not a number
    except ValueError:
        raise ValueError("the proxy URL's port is not a number from 0 to 65535") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL is http://host:port, without a path or query")
    return value


class OAuth2Config(Section):
    """``[tenants.sinks.oauth2]``: the client credentials grant (RFC 6749 §4.4). The
    token goes to the sink as ``Authorization: Bearer …``."""

    token_url: str
    client_id: str = Field(min_length=1, max_length=1024)
    client_secret: ServiceSecretField
    scope: str | None = Field(None, min_length=1, max_length=4096)
    audience: str | None = Field(None, min_length=1, max_length=4096)
    # How the client authenticates: HTTP Basic (RFC 6749 §2.3.1, the default every
    # server must support) or the id and secret in the form body.
    auth_method: Literal["basic", "post"] = "basic"

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, v: str) -> str:
        check_http_url(v)
        parts = urlsplit(v)
        if plain_remote(v):
            raise ValueError(
                "the client secret would cross the network readable: token_url is "
                "https:// (http:// only to this machine)"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError("token_url holds credentials: use client_id and client_secret")
        if parts.fragment:
            raise ValueError("token_url cannot have a #fragment")
        return v

    @field_validator("client_id", "audience")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():
            raise ValueError("holds a control character")
        return v

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str | None) -> str | None:
        if v is not None and not all(t and set(t) <= _SCOPE_CHARS for t in v.split(" ")):
            raise ValueError(
                'a scope is space-separated tokens of printable ASCII (no " or \\), '
                "one space between them"
            )
        return v

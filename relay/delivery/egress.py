"""How a delivery reaches an http sink — its TLS context and its proxy, made once per
configuration — and what a failure on the way there means, in words.

The proxy is the sink's ``proxy``; ``"none"`` goes direct; unset, the environment's:
``HTTPS_PROXY`` for an https:// URL, ``HTTP_PROXY`` for http:// (lower case first, as
curl and Python read them), unless ``NO_PROXY`` names the host (:func:`no_proxy_covers`).
A proxy's credentials are in its URL (the sink's ``proxy_password`` added to it);
aiohttp sends them as ``Proxy-Authorization``, to the proxy only.

Every failure before the sink has seen the request — the TLS handshake (a certificate
not trusted either way, no TLS version both sides allow), the proxy, the OAuth2 token —
is a ``connection`` failure: retried, never a dead letter ``rejected``, because the
sink never refused the event; it is the same for every event, and changes only when a
certificate, a key or a secret does (the breaker keeps the sink from being hammered
meanwhile; a reload picks the new files up and the waiting deliveries go on).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from relay.config import Config, SinkConfig
from relay.config.egress import NO_PROXY
from relay.errors import PrivateTarget


@dataclass(frozen=True, slots=True)
class Way:
    """How requests to one URL of a sink go out."""

    ssl: ssl.SSLContext | bool  # True: aiohttp's default (the system's store)
    proxy: URL | None  # with its credentials in it
    problem: str | None  # why no request can go out (a file unreadable since load…)
    secrets: tuple[str, ...]  # the proxy's credentials, for scrub()


def _env(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for found in (name.lower(), name.upper()):
        value = environ.get(found, "").strip()
        if value:
            return found, value
    return None


_WITH_PORT = re.compile(r"(\[[0-9a-f:.]+\]|[^:]+):(\d+)")  # host:port, [v6]:port


def no_proxy_covers(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (comma-separated) names ``host``: ``*``, the name, a domain
    it is in (``internal`` or ``.internal``), its IP address, a CIDR range holding it,
    any of them with ``:port`` for that port only."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        found = _WITH_PORT.fullmatch(entry)
        if found is not None:
            if port is None or int(found.group(2)) != port:
                continue
            entry = found.group(1)
        entry = entry.strip("[]").lstrip(".").rstrip(".")
        if not entry:
            continue
        if "/" in entry:
            try:
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == entry or host.endswith("." + entry):
            return True
    return False


def _as_url(value: str) -> str:
    return value if "://" in value else "http://" + value  # "egress:3128", as curl reads it


def proxy_hosts(config: Config, environ: Mapping[str, str]) -> frozenset[str]:
    """The host names of every proxy a sink may go through: the sinks' own ``proxy``
    and the environment's ``HTTPS_PROXY``/``HTTP_PROXY``, read as :func:`env_proxy`
    reads them."""
    urls = [s.proxy for t in config.tenants for s in t.sinks if s.proxy not in (None, NO_PROXY)]
    urls += [_as_url(f[1]) for n in ("https_proxy", "http_proxy") if (f := _env(environ, n))]
    hosts = (urlsplit(u).hostname for u in urls if u)
    return frozenset(h.rstrip(".") for h in hosts if h)


def env_proxy(target: URL, environ: Mapping[str, str]) -> tuple[URL | None, str | None]:
    """The environment's proxy for ``target`` (None: direct), or why it cannot be used."""
    found = _env(environ, f"{target.scheme}_proxy")
    if found is None:
        return None, None
    no_proxy = _env(environ, "no_proxy")
    if no_proxy is not None and no_proxy_covers(target.host or "", target.port, no_proxy[1]):
        return None, None
    name, value = found
    value = _as_url(value)
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        # Going direct instead would go where the operator meant traffic not to.
        return None, (
            f"the environment's {name} is not an http://host:port proxy (only http:// "
            "proxies are supported); set the sink's proxy, or proxy = 'none' to go direct"
        )
    return URL(value), None


def proxy_of(
    sink: SinkConfig, target: URL, environ: Mapping[str, str]
) -> tuple[URL | None, str | None]:
    """The proxy requests to ``target`` for ``sink`` go through, or why none can."""
    if sink.proxy == NO_PROXY:
        return None, None
    if sink.proxy is None:
        return env_proxy(target, environ)
    url = URL(sink.proxy)
    if sink.proxy_password is not None:
        url = url.with_password(sink.proxy_password.get())
    return url, None


def proxy_secrets(proxy: URL | None) -> tuple[str, ...]:
    """A proxy URL's password, raw and percent-decoded, and the Basic value sent. (Not
    the user: a name in the configuration, and blanking it would maim other text.)"""
    if proxy is None or proxy.raw_user is None:
        return ()
    found = [proxy.raw_password or "", proxy.password or ""]
    auth = aiohttp.BasicAuth.from_url(proxy)
    if auth is not None:
        try:
            basic = auth.encode()
            found += [basic, basic.partition(" ")[2]]
        except UnicodeEncodeError:  # aiohttp cannot send it either
            pass
    return tuple(s for s in found if len(s) >= 4)


def way_to(sink: SinkConfig, target: URL, environ: Mapping[str, str]) -> Way:
    """How requests to ``target`` (the sink's URL, or its token endpoint) go out."""
    proxy, problem = proxy_of(sink, target, environ)
    secrets = proxy_secrets(proxy)
    context: ssl.SSLContext | bool = True
    try:
        found = sink.tls_context()
    except (OSError, ssl.SSLError) as e:
        # Checked at load: the files changed since. (No secret is in an OSError's text.)
        problem = problem or f"TLS: cannot load the sink's certificate files: {e}"
    else:
        context = True if found is None else found
    return Way(context, proxy, problem, secrets)


# What TLS alerts (by OpenSSL's reason) mean for a sink.
_REFUSED_CERT = (
    "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED", "DECRYPT_ERROR",
)  # fmt: skip
_CONTEXT_REPR = re.compile(r"ssl:<ssl\.SSLContext object at 0x[0-9a-fA-F]+>")
_NO_VERSION = ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")


def _ssl_error(e: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind ``e`` (aiohttp wraps it), if one is."""
    found: BaseException | None = e
    for _ in range(8):  # a chain, not a cycle
        if isinstance(found, aiohttp.ClientConnectorError):  # (some are SSLErrors too)
            found = found.os_error
        elif found is None or isinstance(found, ssl.SSLError):
            return found
        else:
            found = found.__cause__ or found.__context__
    return None


def _alert(reason: str) -> str:
    if "CERTIFICATE_REQUIRED" in reason:
        return "the server requires a client certificate (set client_cert_file)"
    if any(r in reason for r in _REFUSED_CERT):
        return "the server refused the client certificate"
    if any(r in reason for r in _NO_VERSION):
        return "no TLS version both sides allow (see tls_min_version)"
    if "HANDSHAKE_FAILURE" in reason:
        return (
            "the server refused the handshake (over TLS 1.2, also for want of a client certificate)"
        )
    if "WRONG_VERSION_NUMBER" in reason:
        return "the server does not speak TLS on this port (is it http://?)"
    return "the handshake failed"


def failure_text(e: BaseException, url: str) -> str:
    """An exception on the way to ``url`` (not an answer from it) in words, naming TLS
    or the proxy when either was the cause. Not scrubbed."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert = e.certificate_error
        why = getattr(cert, "verify_message", None) or str(cert)
        return (
            f"TLS: certificate verification failed, the server's certificate is not trusted: {why}"
        )
    if isinstance(e, aiohttp.ClientHttpProxyError):
        return f"proxy: CONNECT refused with HTTP {e.status} {e.message}" + (
            " (check the proxy's user and proxy_password)" if e.status in (401, 407) else ""
        )
    if isinstance(e, aiohttp.ClientConnectorError) and isinstance(e.os_error, PrivateTarget):
        return f"refused: {e.os_error}"
    if isinstance(e, aiohttp.ClientProxyConnectionError):
        return f"proxy: cannot connect to the proxy {e.host}:{e.port}: {e.strerror or e}"
    found = _ssl_error(e)
    if found is not None:
        reason = getattr(found, "reason", None) or type(found).__name__
        return f"TLS: {_alert(reason)} ({reason})"
    https = urlsplit(url).scheme.lower() == "https"
    reset = isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNABORTED)
    if (
        https
        and isinstance(e, aiohttp.ClientConnectorError)
        and (isinstance(e.os_error, ConnectionResetError | ConnectionAbortedError) or reset)
    ):
        return (
            "TLS: the server closed the connection during the handshake (it may refuse "
            "the client certificate, or every TLS version allowed here)"
        )
    # aiohttp names a context of our own by its address: noise in an error.
    text = _CONTEXT_REPR.sub("ssl:sink", f"{type(e).__name__}: {e}")
    if https and reset:
        text += " (over TLS 1.3 this is also how a server refuses a client certificate)"
    return text

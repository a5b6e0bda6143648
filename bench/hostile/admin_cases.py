"""The admin listener (aiohttp's own server): the API without a token or with a wrong
one, tricks on the path the token guard reads, traversal in dead-letter ids, query
values and bodies the API must refuse, and framing aiohttp's parser must refuse."""

from __future__ import annotations

import json

from bench.hostile.cases import Case, Generator, World, case

F_ADMIN = "admin"

ROUTES = [
    ("GET", "/api/deadletters"),
    ("GET", "/api/deadletters?tenant={t}&limit=5"),
    ("GET", "/api/deadletters/{t}/crm/h-1"),
    ("GET", "/api/pollers"),
    ("POST", "/api/deadletters/replay"),
    ("POST", "/api/deadletters/purge"),
]
# What the API says, and public endpoints never do.
API_KEYS = ("entries", "tenants", "count", "action", "done", "skipped", "dry_run", "event_id")


def request(
    method: str, path: str, *, auth: str | None = None, body: bytes = b"", extra: str = ""
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    if method == "POST" or body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode("utf-8", "surrogateescape") + body


def _route(w: World) -> tuple[str, str]:
    method, path = w.rng.choice(ROUTES)
    return method, path.format(t=w.tenant)


def _a(kind: str, raw: bytes, *expect: object, unauthorized: bool = False) -> Case:
    return case(F_ADMIN, kind, raw, *expect, target="admin", unauthorized=unauthorized)  # type: ignore[arg-type]


def no_token(w: World) -> Case:
    method, path = _route(w)
    body = b'{"all": true}' if method == "POST" else b""
    return _a("no_token", request(method, path, body=body), 401, unauthorized=True)


def wrong_token(w: World) -> Case:
    method, path = _route(w)
    t = w.admin_token
    auth = w.rng.choice(
        [
            f"Bearer {t[:-1]}",
            f"Bearer {t}x",
            f"Bearer {t.upper()}",
            f"Basic {t}",
            "Bearer",
            # (not "Bearer  <token>": RFC 9110 allows any number of spaces after the
            # scheme, so that is the right token)
            f"Token {t}",
            f"Bearer {t[: len(t) // 2]}",
            f"{t}",
            "Bearer \xff\xfe",
            f"Bearer {'a' * 10000}",
            f"Bearer {t.encode().hex()}",
        ]
    )
    body = b'{"all": true}' if method == "POST" else b""
    return _a(
        "wrong_token", request(method, path, auth=auth, body=body), {400, 401}, unauthorized=True
    )


def token_elsewhere(w: World) -> Case:
    """The right token anywhere but the Authorization header, or behind a wrong one."""
    method, path = _route(w)
    t = w.admin_token
    sep = "&" if "?" in path else "?"
    how = w.rng.choice(["query", "cookie", "other_header", "second_header"])
    if how == "query":
        raw = request(method, f"{path}{sep}token={t}")
    elif how == "cookie":
        raw = request(method, path, extra=f"Cookie: token={t}\r\n")
    elif how == "other_header":
        raw = request(
            method, path, extra=f"X-Admin-Token: {t}\r\nProxy-Authorization: Bearer {t}\r\n"
        )
    else:
        raw = request(method, path, auth="Bearer wrong", extra=f"Authorization: Bearer {t}\r\n")
    if method == "POST":
        raw = raw.replace(b"Content-Length: 0", b"Content-Length: 13") + b'{"all": true}'
    return _a(f"token_{how}", raw, 401, unauthorized=True)


def guard_paths(w: World) -> Case:
    """Paths that lead to the API, spelled so that a guard reading them differently
    from the router would let them through."""
    path = w.rng.choice(
        [
            "/api/../api/pollers",
            "/healthz/../api/pollers",
            "/./api/pollers",
            "//api/pollers",
            "/api//pollers",
            "/api/pollers/",
            "/%61pi/pollers",
            "/api%2Fpollers",
            "/API/pollers",
            "/api/./deadletters",
            "/metrics/../api/deadletters",
            "/api/deadletters/..%2f..%2fpollers",
            "/api/pollers%00",
            "/api/pollers;x",
            "/api/pollers#x",
            "/api/pollers?%00",
            "http://admin/api/pollers",
            "/api\\pollers",
            "/ap%69/deadletters",
        ]
    )
    method = w.rng.choice(["GET", "OPTIONS", "POST", "DELETE", "PATCH"])
    raw = request(method, path)
    return _a("guard_path", raw, {400, 401, 404, 405}, unauthorized=True)


def traversal_ids(w: World) -> Case:
    """With the token: ids that try to leave their key or their tenant."""
    seg = w.rng.choice(
        [
            "..",
            "%2e%2e",
            "..%2f..%2f",
            "*",
            "acme-7a3f:crm",
            "a%00b",
            "%ff",
            "\u2603",
            "x" * 5000,
            "%2F",
            "?",
            "~",
            "{t}:*",
            "h-1%20OR%201=1",
        ]
    ).format(t=w.tenant)
    parts = [w.tenant, "crm", "h-1"]
    parts[w.rng.randrange(3)] = seg
    raw = request("GET", "/api/deadletters/" + "/".join(parts), auth=f"Bearer {w.admin_token}")
    return _a("traversal_id", raw, {400, 404})


def query_values(w: World) -> Case:
    name = w.rng.choice(["since", "until", "limit", "tenant", "class", "type"])
    value = w.rng.choice(
        [
            "1e308",
            "-1e308",
            "1e400",
            "nan",
            "inf",
            "-inf",
            "0",
            "-1",
            "99999999999999999999",
            "abc",
            "",
            "%00",
            "2026-13-45T99:99:99Z",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "99999999999d",
            "1e17",
            "\u0661\u0662",
            "%ff%fe",
            "x" * 3000,
        ]
    )
    raw = request("GET", f"/api/deadletters?{name}={value}", auth=f"Bearer {w.admin_token}")
    return _a("query_value", raw, {200, 400})


def change_bodies(w: World) -> Case:
    """POST replay/purge with bodies that must be refused (so nothing changes)."""
    path = w.rng.choice(["/api/deadletters/replay", "/api/deadletters/purge"])
    body = w.rng.choice(
        [
            b"{",
            b"[]",
            b'"all"',
            b"null",
            b'{"all": "true"}',
            b'{"all": 1}',
            b'{"since": "1e308"}',
            b'{"tenant": ["a"]}',
            b'{"limit": 5}',
            b"[" * 5000,
            b"\xff\xfe",
            b'{"all": true, "until": "nan"}',
            b'{"class": {"a": 1}}',
            json.dumps({"until": "-1e308"}).encode(),
        ]
    )
    raw = request("POST", path, auth=f"Bearer {w.admin_token}", body=body)
    return _a("change_body", raw, 400)


def admin_framing(w: World) -> Case:
    """Framing aiohttp's own parser must refuse, on the admin listener."""
    t = w.admin_token
    good = f"GET /api/pollers HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {t}\r\n"
    how = w.rng.choice(
        [
            "cl_te",
            "two_lengths",
            "bad_length",
            "bare_lf",
            "obs_fold",
            "nul",
            "no_host",
            "long_header",
        ]
    )
    extra = {
        "cl_te": "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "two_lengths": "Content-Length: 0\r\nContent-Length: 5\r\n",
        "bad_length": "Content-Length: abc\r\n",
        "obs_fold": "X-A: b\r\n c\r\n",
        "nul": "X-A: \x00\r\n",
        "long_header": "X-L: " + "a" * 9000 + "\r\n",
    }.get(how, "")
    raw = good + extra + "\r\n"
    if how == "bare_lf":
        raw = raw.replace("\r\n", "\n")
    if how == "no_host":
        raw = raw.replace("Host: admin\r\n", "")
    return _a(f"framing_{how}", raw.encode() + b"0\r\n\r\n", 400)


def rebound_host(w: World) -> Case:
    """DNS rebinding: a page whose name resolves to the admin listener's address sends
    its own name as Host. Every route, public ones too, is 421 — with the right token as
    well (the Host check comes first)."""
    method, path = w.rng.choice([*ROUTES, ("GET", "/metrics"), ("GET", "/healthz")])
    path = path.format(t=w.tenant)
    host = w.rng.choice(["evil.example", "admin.evil.example", "127.0.0.1.evil.example:9090"])
    auth = w.rng.choice([None, f"Bearer {w.admin_token}"])
    raw = request(method, path, auth=auth).replace(b"Host: admin", f"Host: {host}".encode())
    return _a("rebound_host", raw, 421, unauthorized=True)


def drawn_path(w: World, path: str) -> Case:
    """A path under /api/ drawn by hypothesis, without a token."""
    return _a("hypothesis_path", request("GET", "/api/" + path), {400, 401, 404}, unauthorized=True)


ADMIN: list[Generator] = [
    no_token,
    wrong_token,
    token_elsewhere,
    guard_paths,
    traversal_ids,
    query_values,
    change_bodies,
    admin_framing,
    rebound_host,
]

"""Hostile webhooks, first half: signatures tampered with every way."""

from __future__ import annotations

import hashlib
import hmac
import time

from bench.hostile.cases import Case, Generator, Legit, World, case
from relay.signing import chert_signature

F_SIG = "signature"


def _hex(world: World, n: int = 64) -> str:
    return "".join(world.rng.choice("0123456789abcdef") for _ in range(n))


def _sig(
    world: World,
    value: str | None,
    body: bytes,
    *,
    header: str = "X-Webhook-Signature",
    extra: str = "",
    path: str | None = None,
) -> bytes:
    """A POST of ``body`` with the signature header ``value`` (None: no header)."""
    head = (
        f"POST {path or world.path} HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )
    if value is not None:
        head += f"{header}: {value}\r\n"
    return (head + extra + "\r\n").encode("utf-8", "surrogateescape") + body


def _right(world: World, body: bytes, ts: int | None = None) -> tuple[int, str]:
    ts = int(time.time()) if ts is None else ts
    return ts, chert_signature(world.secret, ts, body)


def _legit(world: World, event_id: str, body: bytes) -> list[Legit]:
    return [Legit(world.tenant, event_id, body)]


# --- signatures ---------------------------------------------------------------------------


def wrong_secret(w: World) -> Case:
    _, body = w.body()
    ts = int(time.time())
    secret = w.rng.choice([_hex(w), w.other_secret, w.secret[:-1], w.secret.upper(), ""])
    value = f"t={ts},v1={chert_signature(secret, ts, body)}"
    return case(F_SIG, "wrong_secret", _sig(w, value, body), 401)


def other_tenants_path(w: World) -> Case:
    """Signed with this tenant's secret, posted to the other tenant's path."""
    _, body = w.body()
    ts, sig = _right(w, body)
    path = f"/webhooks/chert/{w.other_tenant}"
    return case(F_SIG, "other_tenants_path", _sig(w, f"t={ts},v1={sig}", body, path=path), 401)


def mangled_hex(w: World) -> Case:
    _, body = w.body()
    ts, sig = _right(w, body)
    how = w.rng.choice(["truncated", "extended", "flipped", "uppercase_wrong", "non_hex"])
    if how == "truncated":
        sig = sig[: w.rng.randrange(0, 64)]
    elif how == "extended":
        sig += _hex(w, w.rng.randrange(1, 65))
    elif how == "flipped":
        i = w.rng.randrange(64)
        sig = sig[:i] + w.rng.choice([c for c in "0123456789abcdef" if c != sig[i]]) + sig[i + 1 :]
    elif how == "uppercase_wrong":
        sig = _hex(w).upper()
    else:
        i = w.rng.randrange(64)
        sig = sig[:i] + w.rng.choice("gxzGXZ- +") + sig[i + 1 :]
    return case(F_SIG, f"hex_{how}", _sig(w, f"t={ts},v1={sig}", body), 401)


def uppercase_right(w: World) -> Case:
    """The right MAC in uppercase hex is the same MAC (compared on decoded bytes)."""
    event_id, body = w.body()
    ts, sig = _right(w, body)
    raw = _sig(w, f"t={ts},v1={sig.upper()}", body)
    return case(F_SIG, "uppercase_right_mac", raw, 202, legit=_legit(w, event_id, body))


def tampered_body(w: World) -> Case:
    event_id, body = w.body()
    ts, sig = _right(w, body)
    how = w.rng.choice(["byte", "append", "prepend_space", "other_event_id"])
    if how == "byte":
        i = w.rng.randrange(len(body))
        sent = body[:i] + bytes([body[i] ^ (1 << w.rng.randrange(8))]) + body[i + 1 :]
    elif how == "append":
        sent = body + b" "
    elif how == "prepend_space":
        sent = b" " + body
    else:
        sent = body.replace(event_id.encode(), w.event_id().encode())
    return case(F_SIG, f"body_{how}", _sig(w, f"t={ts},v1={sig}", sent), 401)


def timestamps(w: World) -> Case:
    """At and past the tolerance edge, both ways (2 s of margin for the clock)."""
    event_id, body = w.body()
    now, tol = int(time.time()), w.tolerance
    how = w.rng.choice(["stale", "future", "stale_edge_ok", "future_edge_ok"])
    ts = {
        "stale": now - tol - w.rng.randrange(1, 100_000),
        "future": now + tol + 2 + w.rng.randrange(0, 100_000),
        "stale_edge_ok": now - tol + 3,
        "future_edge_ok": now + tol - 3,
    }[how]
    raw = _sig(w, f"t={ts},v1={chert_signature(w.secret, ts, body)}", body)
    if how.endswith("_ok"):
        return case(F_SIG, f"ts_{how}", raw, 202, legit=_legit(w, event_id, body))
    return case(F_SIG, f"ts_{how}", raw, 401)


def timestamp_forms(w: World) -> Case:
    """A timestamp written oddly, signed over exactly that text."""
    _, body = w.body()
    now = int(time.time())
    text = w.rng.choice(
        [
            f"+{now}",
            f" {now}x",
            f"{now}.0",
            f"0{now}",
            f"-{now}",
            hex(now),
            f"{now}000",
            "",
            f"{now}\t",
            "1e9",
            "٣" * 10,
            f"{now},t={now}",
        ]
    )
    mac = hmac.digest(w.secret.encode(), text.encode() + b"." + body, hashlib.sha256).hex()
    return case(F_SIG, "ts_form", _sig(w, f"t={text},v1={mac}", body), 401)


def several_v1(w: World) -> Case:
    event_id, body = w.body()
    ts, sig = _right(w, body)
    wrong = [_hex(w) for _ in range(w.rng.randrange(1, 8))]
    how = w.rng.choice(["one_right", "none_right", "too_many", "two_t", "other_scheme"])
    if how == "one_right":
        sigs = [*wrong, sig]
        w.rng.shuffle(sigs)
        value = f"t={ts}," + ",".join(f"v1={s}" for s in sigs)
        return case(
            F_SIG, "v1_one_right", _sig(w, value, body), 202, legit=_legit(w, event_id, body)
        )
    if how == "none_right":
        value = f"t={ts}," + ",".join(f"v1={s}" for s in wrong)
    elif how == "too_many":
        value = f"t={ts}," + ",".join(f"v1={s}" for s in [*(_hex(w) for _ in range(8)), sig])
    elif how == "two_t":
        value = f"t={ts},t={ts},v1={sig}"
    else:
        value = f"t={ts},{w.rng.choice(['v0', 'v2', 'V1', 'v1 ', 'sha256'])}={sig}"
    return case(F_SIG, f"v1_{how}", _sig(w, value, body), 401)


def legacy(w: World) -> Case:
    event_id, body = w.body()
    ts, sig = _right(w, body)
    ok = {"v1,{ts},{sig}", "v1, {ts}, {sig}", "v1,{ts},{SIG}"}
    form = w.rng.choice(
        [
            *ok,
            "v1,{ts},{sig},x",
            "v1,{ts}",
            "V1,{ts},{sig}",
            "v1;{ts};{sig}",
            "v2,{ts},{sig}",
            "v1,{ts},{bad}",
            "v1,{old},{oldsig}",
            "{sig}",
            "v1,,{sig}",
        ]
    )
    old = ts - w.tolerance - 10
    value = form.format(
        ts=ts,
        sig=sig,
        SIG=sig.upper(),
        bad=_hex(w),
        old=old,
        oldsig=chert_signature(w.secret, old, body),
    )
    header = w.rng.choice(["x-chert-signature", "X-Chert-Signature", "X-CHERT-SIGNATURE"])
    raw = _sig(w, value, body, header=header)
    if form in ok:
        return case(F_SIG, "legacy_valid", raw, 202, legit=_legit(w, event_id, body))
    return case(F_SIG, "legacy_malformed", raw, 401)


def two_headers(w: World) -> Case:
    """Both header formats, or the same one twice: the first current one is the one read."""
    event_id, body = w.body()
    ts, sig = _right(w, body)
    right, wrong = f"t={ts},v1={sig}", f"t={ts},v1={_hex(w)}"
    how = w.rng.choice(
        [
            "current_wrong_legacy_right",
            "current_right_legacy_wrong",
            "wrong_then_right",
            "right_then_wrong",
        ]
    )
    if how == "current_wrong_legacy_right":
        extra = f"x-chert-signature: v1,{ts},{sig}\r\n"
        return case(F_SIG, how, _sig(w, wrong, body, extra=extra), 401)
    if how == "current_right_legacy_wrong":
        extra = f"x-chert-signature: v1,{ts},{_hex(w)}\r\n"
        raw = _sig(w, right, body, extra=extra)
        return case(F_SIG, how, raw, 202, legit=_legit(w, event_id, body))
    if how == "wrong_then_right":
        return case(
            F_SIG, how, _sig(w, wrong, body, extra=f"X-Webhook-Signature: {right}\r\n"), 401
        )
    raw = _sig(w, right, body, extra=f"X-Webhook-Signature: {wrong}\r\n")
    return case(F_SIG, how, raw, 202, legit=_legit(w, event_id, body))


def missing_or_junk(w: World) -> Case:
    _, body = w.body()
    value = w.rng.choice(
        [
            None,
            "",
            " ",
            "t=",
            "v1=",
            ",",
            "t=1,v1=" + "0" * 64,
            "x" * 5000,
            "t=\u00e9,v1=\u00e9",
            "t=1" + ",v1=" * 50,
        ]
    )
    return case(F_SIG, "missing_or_junk", _sig(w, value, body), 401)


def wrong_construction(w: World) -> Case:
    """MACs a broken implementation would make: each must fail."""
    _, body = w.body()
    ts = int(time.time())
    key, msg = w.secret.encode(), f"{ts}.".encode() + body
    how = w.rng.choice(["sha1", "md5", "hex_key", "body_only", "no_dot", "plain_sha256", "sha512"])
    if how == "sha1":
        mac = hmac.digest(key, msg, hashlib.sha1).hex()
    elif how == "md5":
        mac = hmac.digest(key, msg, hashlib.md5).hex()
    elif how == "hex_key":
        mac = hmac.digest(bytes.fromhex(w.secret), msg, hashlib.sha256).hex()
    elif how == "body_only":
        mac = hmac.digest(key, body, hashlib.sha256).hex()
    elif how == "no_dot":
        mac = hmac.digest(key, f"{ts}".encode() + body, hashlib.sha256).hex()
    elif how == "plain_sha256":
        mac = hashlib.sha256(key + msg).hexdigest()
    else:
        mac = hmac.digest(key, msg, hashlib.sha512).hex()[:64]
    return case(F_SIG, f"mac_{how}", _sig(w, f"t={ts},v1={mac}", body), 401)


def signature_text(w: World, value: str) -> Case:
    """A signature header drawn by hypothesis."""
    _, body = w.body()
    return case(F_SIG, "hypothesis_header", _sig(w, value, body), {400, 401})


def routing(w: World) -> Case:
    """A signed webhook at another path or with another method."""
    event_id, body = w.body()
    ts, sig = _right(w, body)
    value = f"t={ts},v1={sig}"
    t = w.tenant
    paths = {
        f"/webhooks/chert/{t}/": 404,
        f"/webhooks/chert/{t.upper()}": 404,
        "/webhooks/chert/nobody": 404,
        f"/webhooks/chert/../chert/{t}": 404,
        f"/webhooks/chert/{t}%2F": 404,
        f"/webhooks/Chert/{t}": 404,
        "/": 404,
        f"/webhooks/chert/{t}%00": 404,
        f"/webhooks/chert/{t};x": 404,
        f"/webhooks/chert/%{ord(t[0]):02x}{t[1:]}": 202,  # the same path, percent-encoded
    }
    path = w.rng.choice(list(paths))
    method = w.rng.choice(["POST"] * 4 + ["GET", "PUT", "DELETE", "OPTIONS", "PATCH"])
    raw = _sig(w, value, body, path=path)
    if method != "POST":
        raw = raw.replace(b"POST ", method.encode() + b" ", 1)
    status = paths[path]
    if status == 202 and method == "POST":
        return case(F_SIG, "routing", raw, 202, legit=_legit(w, event_id, body))
    return case(F_SIG, "routing", raw, 405 if status == 202 else {404, 405})


SIGNATURE: list[Generator] = [
    routing,
    wrong_secret,
    other_tenants_path,
    mangled_hex,
    uppercase_right,
    tampered_body,
    timestamps,
    timestamp_forms,
    several_v1,
    legacy,
    two_headers,
    missing_or_junk,
    wrong_construction,
]

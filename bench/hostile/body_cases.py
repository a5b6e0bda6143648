"""Hostile webhooks, second half: correctly signed bodies the relay must refuse (and
a few it must take)."""

from __future__ import annotations

import functools
import gzip
import json
import time
import zlib

from bench.hostile.cases import Case, Generator, Legit, World, body_case, case
from relay.signing import chert_signature

F_BODY = "body"


def truncated(w: World) -> Case:
    _, body = w.body()
    return body_case(w, F_BODY, "truncated_json", body[: w.rng.randrange(0, len(body))])


def trailing(w: World) -> Case:
    _, body = w.body()
    tail = w.rng.choice([b" \n\t\r", b"x", b"}", b"\x00", b",", b"{}", b"\xff", b"// c"])
    return body_case(w, F_BODY, "trailing_bytes", body + tail)


def flipped(w: World) -> Case:
    _, body = w.body()
    i = w.rng.randrange(len(body))
    sent = body[:i] + bytes([w.rng.randrange(256)]) + body[i + 1 :]
    return body_case(w, F_BODY, "random_byte", sent)


def not_strict(w: World) -> Case:
    event_id = w.event_id()
    text = json.dumps(w.envelope(event_id))
    how = w.rng.choice(
        [
            "nan",
            "infinity",
            "neg_infinity",
            "bom",
            "utf16",
            "utf16le",
            "utf32",
            "latin1",
            "cesu_surrogate",
            "overlong",
            "big_int",
            "not_object",
        ]
    )
    if how in ("nan", "infinity", "neg_infinity"):
        const = {"nan": "NaN", "infinity": "Infinity", "neg_infinity": "-Infinity"}[how]
        body = text.replace('"api_version": "v1"', f'"api_version": {const}').encode()
    elif how == "bom":
        body = b"\xef\xbb\xbf" + text.encode()
    elif how in ("utf16", "utf16le", "utf32"):
        body = text.encode({"utf16": "utf-16", "utf16le": "utf-16-le", "utf32": "utf-32"}[how])
    elif how == "latin1":
        body = text.replace('"hi"', '"caf\u00e9"').encode("latin-1")
    elif how == "cesu_surrogate":
        body = text.encode().replace(b'"hi"', b'"\xed\xa0\xbd\xed\xb8\x80"')
    elif how == "overlong":
        body = text.encode().replace(b'"hi"', b'"\xc0\xaf"')
    elif how == "big_int":
        body = text.replace('"v1"', "7" * w.rng.choice([4301, 20_000])).encode()
    else:
        body = w.rng.choice([b"[]", b'"x"', b"7", b"null", b"true", b"[" + text.encode() + b"]"])
    return body_case(w, F_BODY, f"not_strict_{how}", body)


def nested(w: World) -> Case:
    depth = w.rng.choice([100, 300, 600, 2_000, 20_000])
    opener, closer = w.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    if len(opener) * depth > w.max_body:
        depth = w.max_body // len(opener) - 100
    event_id = w.event_id()
    body = b'{"event_id": "%s", "deep": %s1%s}' % (
        event_id.encode(),
        opener * depth,
        closer * depth,
    )
    return body_case(w, F_BODY, f"nested_{depth}", body)


def sizes(w: World) -> Case:
    event_id = w.event_id()
    room = w.max_body - len(json.dumps(w.envelope(event_id, pad="")))
    pad = w.rng.choice([room, room + 1, room + w.rng.randrange(2, 5000), room - 1])
    body = json.dumps(w.envelope(event_id, pad="x" * max(pad, 0))).encode()
    return body_case(w, F_BODY, "at_the_size_limit", body)


def partner(w: World) -> Case:
    value = w.rng.choice(
        [
            w.other_tenant,
            "",
            [w.tenant],
            {"slug": w.tenant},
            7,
            True,
            w.tenant.upper(),
            w.tenant.replace("a", "\u0430"),
            f"{w.tenant}\x00",
            f" {w.tenant}",
            f"{w.tenant}\n",
            None,
        ]
    )
    event_id = w.event_id()
    env = w.envelope(event_id)
    if value is None:
        del env["partner_id"]
    else:
        env["partner_id"] = value
    return body_case(w, F_BODY, "partner_id", json.dumps(env).encode())


def duplicates(w: World) -> Case:
    event_id = w.event_id()
    key = w.rng.choice(["event_id", "partner_id", "event", "event_type", "timestamp"])
    first = {"event_id": w.event_id(), "partner_id": w.other_tenant}.get(key, "x")
    spelled = w.rng.choice(
        [key, key.replace("_", "\\u005f"), "\\u00" + format(ord(key[0]), "x") + key[1:]]
    )
    text = json.dumps(w.envelope(event_id))
    body = ("{" + f'"{spelled}": {json.dumps(first)}, ' + text[1:]).encode()
    return body_case(w, F_BODY, "duplicate_key", body)


def odd_event_ids(w: World) -> Case:
    base = w.event_id()
    value: object = w.rng.choice(
        [
            "",
            0,
            [],
            {},
            False,
            base + "x" * 600,
            base + "\x00",
            base + "\n",
            base + "\u200b",
            base + "\ud800",
            base + " \u2603 :*/..",
            f"{w.tenant}:{base}",
            base + "\u00e9",
            None,
        ]
    )
    env = w.envelope(base)
    header = None
    if value is None:
        del env["event_id"]
        header = w.rng.choice([None, base + "-hdr"])
    else:
        env["event_id"] = value
    body = json.dumps(env, ensure_ascii=w.rng.random() < 0.5).encode("utf-8", "surrogatepass")
    return body_case(w, F_BODY, "odd_event_id", body, header_event_id=header)


def log_row(w: World) -> Case:
    event_id = w.event_id()
    payload = w.envelope(event_id)
    row: dict[str, object] = {
        "id": f"evt_{event_id}",
        "type": "message.received",
        "event_id": event_id,
        "payload": payload,
        "delivery": {"status": "failed"},
        "created_at": "2026-04-29T18:15:25Z",
    }
    if w.rng.random() < 0.5:
        payload["partner_id"] = w.rng.choice([w.other_tenant, 7])
    return body_case(w, F_BODY, "log_row", json.dumps(row).encode())


def encoded(w: World) -> Case:
    """Content-Encoding: bombs, garbage, and the signature over either side. The first
    tenant refuses every coded body before decoding (415); the other accepts them
    (``accept_compressed``), bounded by their compressed size."""
    accepting = w.rng.random() < 0.5
    tenant, secret = (w.other_tenant, w.other_secret) if accepting else (w.tenant, w.secret)
    event_id, body = w.body(partner_id=tenant)
    how = w.rng.choice(
        [
            "gzip_bomb",
            "deflate_bomb",
            "garbage",
            "plain_labelled_gzip",
            "signed_compressed",
            "gzip_ok",
        ]
    )
    coding = "deflate" if how == "deflate_bomb" else "gzip"
    signed_over, legit, expect = body, [], {400}
    if how in ("gzip_bomb", "deflate_bomb"):
        signed_over, sent = _bomb(coding)
        expect = {413}
    elif how == "garbage":
        sent = bytes(w.rng.randrange(256) for _ in range(200))
    elif how == "plain_labelled_gzip":
        sent = body
    elif how == "signed_compressed":
        sent = gzip.compress(body)
        signed_over = sent
        expect = {401}
    else:
        sent = gzip.compress(body)
        legit, expect = [Legit(tenant, event_id, body)], {202}
    if not accepting:
        legit, expect = [], {415}
    ts = int(time.time())
    head = (
        f"POST /webhooks/chert/{tenant} HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Length: {len(sent)}\r\nContent-Encoding: {coding}\r\n"
        f"X-Webhook-Signature: t={ts},v1={chert_signature(secret, ts, signed_over)}\r\n\r\n"
    )
    kind = f"encoding_{how}" if accepting else f"encoding_{how}_refused"
    return case(F_BODY, kind, head.encode() + sent, expect, legit=legit)


@functools.cache
def _bomb(coding: str) -> tuple[bytes, bytes]:
    """20 MB of JSON that compresses to about 20 KB: (what is signed, what is sent)."""
    body = b'{"event_id": "bomb", "pad": "%s"}' % (b"0" * 20_000_000)
    return body, (gzip.compress if coding == "gzip" else zlib.compress)(body, 9)


def drawn_body(w: World, body: bytes) -> Case:
    return body_case(w, F_BODY, "hypothesis_body", body)


BODY: list[Generator] = [
    truncated,
    trailing,
    flipped,
    not_strict,
    nested,
    sizes,
    partner,
    duplicates,
    odd_event_ids,
    log_row,
    encoded,
]

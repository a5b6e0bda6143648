"""HTTP-level attacks on the receiver's own server: request smuggling shapes, framing
the parser must refuse, pipelining, request lines and headers — each around a valid
signed webhook, so that whatever the server lets through shows up in Redis. These
cases also go to aiohttp's own server (``compare``)."""

from __future__ import annotations

import json
import time

from bench.hostile.cases import ANY, Case, Generator, Legit, World, case
from relay.signing import chert_signature

F_SMUGGLE = "smuggling"
F_FRAMING = "framing"
F_PIPELINE = "pipelining"


def _head(
    w: World,
    body: bytes,
    *,
    length: str | None = "auto",
    te: str | None = None,
    extra: str = "",
    line: str | None = None,
    host: str | None = "Host: relay\r\n",
) -> bytes:
    ts = int(time.time())
    text = (line or f"POST {w.path} HTTP/1.1") + "\r\n" + (host or "")
    text += "Content-Type: application/json\r\n"
    text += f"X-Webhook-Signature: t={ts},v1={chert_signature(w.secret, ts, body)}\r\n"
    if length is not None:
        text += f"Content-Length: {len(body) if length == 'auto' else length}\r\n"
    if te is not None:
        text += f"Transfer-Encoding: {te}\r\n"
    return (text + extra + "\r\n").encode("utf-8", "surrogateescape")


def _chunked(body: bytes, w: World) -> bytes:
    out, i = b"", 0
    while i < len(body):
        n = w.rng.randrange(1, 400)
        out += b"%x\r\n%s\r\n" % (len(body[i : i + n]), body[i : i + n])
        i += n
    return out + b"0\r\n\r\n"


def _req(w: World) -> tuple[bytes, bytes, Legit]:
    """A valid signed webhook: (body, whole request, what it stores)."""
    event_id, body = w.body()
    return body, _head(w, body) + body, Legit(w.tenant, event_id, body)


def _c(family: str, kind: str, raw: bytes | list[bytes], *expect: object, **kw: object) -> Case:
    return case(family, kind, raw, *expect, compare=True, **kw)  # type: ignore[arg-type]


# --- smuggling: the server must not see two requests where there is one -----------------


def cl_te(w: World) -> Case:
    """Content-Length and Transfer-Encoding together: the smuggled request S is valid
    and signed; if any part of the server took it, Redis shows it."""
    body, _, _ = _req(w)
    _, smuggled, _ = _req(w)
    chunked = _chunked(body, w)
    how = w.rng.choice(["cl_covers_all", "cl_covers_chunks", "te_first", "cl_zero"])
    te = w.rng.choice(["chunked", "Chunked", " chunked", "chunked ", "\tchunked"])
    if how == "cl_covers_all":
        raw = _head(w, body, length=str(len(chunked) + len(smuggled)), te=te) + chunked + smuggled
    elif how == "cl_covers_chunks":
        raw = _head(w, body, length=str(len(chunked)), te=te) + chunked + smuggled
    elif how == "te_first":
        head = _head(w, body, length=None, te=te, extra=f"Content-Length: {len(chunked)}\r\n")
        raw = head + chunked + smuggled
    else:
        raw = _head(w, body, length="0", te=te) + chunked + smuggled
    return _c(F_SMUGGLE, f"cl_te_{how}", raw, 400)


def two_lengths(w: World) -> Case:
    body, _, _ = _req(w)
    _, smuggled, _ = _req(w)
    n, m = len(body), len(body) + len(smuggled)
    how = w.rng.choice(["differ", "differ_reversed", "same", "list", "list_differ"])
    extra = {
        "differ": f"Content-Length: {m}\r\n",
        "differ_reversed": "",
        "same": f"Content-Length: {n}\r\n",
        "list": "",
        "list_differ": "",
    }[how]
    length = {
        "differ_reversed": f"{m}\r\nContent-Length: {n}",
        "list": f"{n}, {n}",
        "list_differ": f"{n}, {m}",
    }.get(how, str(n))
    raw = _head(w, body, length=length, extra=extra) + body + smuggled
    return _c(F_SMUGGLE, f"two_lengths_{how}", raw, 400)


def length_forms(w: World) -> Case:
    """Content-Length written oddly. Optional whitespace and leading zeros still say
    the same number: taking the request is right; anything else must be refused."""
    body, _, legit = _req(w)
    n = len(body)
    same = {"ows_before": f" {n}", "ows_after": f"{n} ", "tab": f"\t{n}", "leading_zero": f"0{n}"}
    bad = {
        "plus": f"+{n}",
        "minus": "-1",
        "decimal": f"{n}.0",
        "hex": hex(n),
        "empty": "",
        "word": "abc",
        "arabic_digits": "".join(chr(0x660 + int(d)) for d in str(n)),
        "overflow": "9" * 30,
        "inner_space": f"{str(n)[:1]} {str(n)[1:]}",
        "vtab": f"{n}\x0b",
    }
    name = w.rng.choice([*same, *bad])
    raw = _head(w, body, length={**same, **bad}[name]) + body
    if name in same:
        return _c(F_SMUGGLE, f"length_{name}", raw, {202, 400}, legit=[legit])
    return _c(F_SMUGGLE, f"length_{name}", raw, 400)


def te_forms(w: World) -> Case:
    """Transfer-Encoding written oddly, with no Content-Length. The body is R's chunks,
    the last chunk, then S: a server that reads the chunks takes R, then S as the next
    request; one that cannot must refuse, and never take S as part of something else."""
    body, _, legit_r = _req(w)
    _s_body, smuggled, legit_s = _req(w)
    valid = {"plain": "chunked", "upper": "CHUNKED", "ows": " chunked ", "tab": "\tchunked"}
    invalid = {
        "x_prefix": "xchunked",
        "identity_after": "chunked, identity",
        "identity": "identity",
        "doubled": "chunked, chunked",
        "gzip_first": "gzip, chunked",
        "quoted": '"chunked"',
        "vtab": "chunked\x0b",
        "semicolon": "chunked;q=1",
        "nul": "chunked\x00",
        "comma": "chunked,",
        "obs_fold": "identity\r\n chunked",
    }
    name = w.rng.choice([*valid, *invalid, "two_headers", "space_before_colon", "underscore"])
    chunks = _chunked(body, w)
    if name in valid or name in invalid:
        raw = _head(w, body, length=None, te={**valid, **invalid}[name]) + chunks + smuggled
        if name in valid:
            return _c(F_SMUGGLE, f"te_{name}", raw, 202, 202, legit=[legit_r, legit_s])
        if name == "gzip_first":  # a coding the server does not have: 501; the chunks
            # still frame the body, so S after them is the next request
            return _c(F_SMUGGLE, f"te_{name}", raw, 501, 202, legit=[legit_s])
        return _c(F_SMUGGLE, f"te_{name}", raw, 400)
    if name == "two_headers":
        head = _head(w, body, length=None, te="chunked", extra="Transfer-Encoding: chunked\r\n")
        return _c(F_SMUGGLE, "te_two_headers", head + chunks + smuggled, 400)
    header = (
        "Transfer-Encoding : chunked"
        if name == "space_before_colon"
        else "Transfer_Encoding: chunked"
    )
    raw = _head(w, body, length=None, extra=header + "\r\n") + chunks + smuggled
    if name == "space_before_colon":
        return _c(F_SMUGGLE, "te_space_before_colon", raw, 400)
    # An unknown header: no body at all; the chunks are then read as a request line.
    return _c(F_SMUGGLE, "te_underscore", raw, 401, 400)


def http10_te(w: World) -> Case:
    """HTTP/1.0 with Transfer-Encoding: RFC 9112 says treat the framing as faulty — a
    server may take the request but must close the connection after it."""
    body, _, legit = _req(w)
    _, smuggled, _ = _req(w)
    line = f"POST {w.path} HTTP/1.0"
    raw = _head(w, body, length=None, te="chunked", line=line) + _chunked(body, w) + smuggled
    return _c(F_SMUGGLE, "http10_te", raw, {202, 400}, legit=[legit])


# --- framing the parser must refuse (or may read, for what is valid HTTP) -----------------


def line_ends(w: World) -> Case:
    _body, raw, _legit = _req(w)
    head, _, rest = raw.partition(b"\r\n\r\n")
    how = w.rng.choice(["bare_lf", "bare_lf_end", "bare_cr", "lf_in_line", "crlf_space"])
    if how == "bare_lf":
        raw = head.replace(b"\r\n", b"\n") + b"\n\n" + rest
    elif how == "bare_lf_end":
        raw = head + b"\r\n\n" + rest
    elif how == "bare_cr":
        raw = head.replace(b"\r\n", b"\r", 1) + b"\r\n\r\n" + rest
    elif how == "lf_in_line":
        raw = raw.replace(b"Host: relay\r\n", b"Host: relay\nX-Injected: 1\r\n")
    else:
        raw = raw.replace(b"\r\nHost", b"\r\n Host")
    return _c(F_FRAMING, f"line_end_{how}", raw, 400)


def headers(w: World) -> Case:
    body, raw, legit = _req(w)
    ok = {
        "obs_text_value": "X-Note: caf\xe9",
        "empty_host_value": None,
        "long_ok": "X-L: " + "a" * 4000,
    }
    bad = {
        "obs_fold": "X-A: b\r\n c",
        "nul": "X-A: a\x00b",
        "ctl": "X-A: a\x01b",
        "del": "X-A: a\x7fb",
        "space_in_name": "X A: b",
        "no_colon": "X-A b",
        "empty_name": ": b",
        "too_long": "X-L: " + "a" * 9000,
        "name_utf8": "X-\xe9: b",
        "too_many": "\r\n".join(f"X-{i}: a" for i in range(130)),
        "sec_websocket_key1": "Sec-WebSocket-Key1: x",
        "two_hosts": "Host: evil",
    }
    name = w.rng.choice([*ok, *bad, "no_host"])
    if name == "no_host":
        raw = _head(w, body, host=None) + body
        return _c(F_FRAMING, "header_no_host", raw, 400)
    if name == "empty_host_value":
        raw = _head(w, body, host="Host:\r\n") + body
        return _c(F_FRAMING, "header_empty_host", raw, {202, 400}, legit=[legit])
    extra = {**ok, **bad}[name]
    assert extra is not None
    raw = _head(w, body, extra=extra + "\r\n") + body
    if name in ok:
        return _c(F_FRAMING, f"header_{name}", raw, {202, 400}, legit=[legit])
    return _c(F_FRAMING, f"header_{name}", raw, 400)


def request_lines(w: World) -> Case:
    body, _, legit = _req(w)
    path = w.path
    ok = {
        "absolute_form": f"POST http://relay{path} HTTP/1.1",
        "query": f"POST {path}?a=1 HTTP/1.1",
        "fragment": f"POST {path}#x HTTP/1.1",
        "percent_encoded": f"POST {path[:-3]}%{ord(path[-3]):02X}{path[-2:]} HTTP/1.1",
    }
    not_1x = {
        "http_2_0": f"POST {path} HTTP/2.0",
        "no_version": f"POST {path}",
        "http_0_9": f"GET {path}",
    }
    # RFC 9112 §3 lets a server split a request line on any whitespace.
    lenient = {
        "two_spaces": f"POST  {path} HTTP/1.1",
        "tab": f"POST\t{path} HTTP/1.1",
        "trailing_space": f"POST {path} HTTP/1.1 ",
    }
    bad = {
        "lowercase_method": f"post {path} HTTP/1.1",
        "http_1_2": f"POST {path} HTTP/1.2",
        "bad_version": f"POST {path} HTTP/x.y",
        "space_in_path": f"POST /webhooks/chert/ {w.tenant} HTTP/1.1",
        "long_path": f"POST {path}?{'a' * 9000} HTTP/1.1",
        "nul_in_path": f"POST {path}\x00 HTTP/1.1",
        "utf8_path": f"POST {path}\xe9 HTTP/1.1",
        "method_junk": f"P@ST {path} HTTP/1.1",
        "h2_preface": "PRI * HTTP/2.0",
    }
    lines = {**ok, **not_1x, **lenient, **bad}
    name = w.rng.choice(list(lines))
    raw = _head(w, body, line=lines[name]) + body
    if name == "h2_preface":
        raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _head(w, body) + body
        return _c(F_FRAMING, "line_h2_preface", raw, {400, 404, 405, 505})
    if name in ok:
        return _c(F_FRAMING, f"line_{name}", raw, 202, legit=[legit])
    if name in not_1x:
        return _c(F_FRAMING, f"line_{name}", raw, 505)
    if name in lenient:
        return _c(F_FRAMING, f"line_{name}", raw, {202, 400}, legit=[legit])
    return _c(F_FRAMING, f"line_{name}", raw, {400, 404, 405})


def chunk_framing(w: World) -> Case:
    body, _, legit = _req(w)
    head = _head(w, body, length=None, te="chunked")
    n = len(body)
    ok = {
        "plain": _chunked(body, w),
        "extension": b"%x;a=b\r\n%s\r\n0\r\n\r\n" % (n, body),
        "trailer": b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (n, body),
        "upper_hex": b"%X\r\n%s\r\n0\r\n\r\n" % (n, body),
    }
    bad = {
        "not_hex": b"zz\r\n" + body + b"\r\n0\r\n\r\n",
        "overflow": b"f" * 20 + b"\r\n" + body,
        "negative": b"-1\r\n" + body,
        "data_too_long": b"%x\r\n%s\r\n0\r\n\r\n" % (n - 5, body),
        "no_crlf_after_data": b"%x\r\n%sX0\r\n\r\n" % (n, body),
        "lf_only": b"%x\n%s\n0\n\n" % (n, body),
        "space_in_size": b"%x \r\n%s\r\n0\r\n\r\n" % (n, body),
        "extension_lf": b"%x;a=b\n%s\r\n0\r\n\r\n" % (n, body),
        "bad_trailer": b"%x\r\n%s\r\n0\r\nX Bad: 1\r\n\r\n" % (n, body),
        "size_with_plus": b"+%x\r\n%s\r\n0\r\n\r\n" % (n, body),
    }
    name = w.rng.choice([*ok, *bad, "no_last_chunk"])
    if name == "no_last_chunk":  # a request line where the next chunk's size should be
        raw = head + b"%x\r\n%s\r\n" % (n, body) + b"GET / HTTP/1.1\r\n\r\n"
        return _c(F_FRAMING, "chunk_no_last_chunk", raw, 400)
    if name in ok:
        return _c(F_FRAMING, f"chunk_{name}", head + ok[name], 202, legit=[legit])
    return _c(F_FRAMING, f"chunk_{name}", head + bad[name], 400)


def not_http(w: World) -> Case:
    how = w.rng.choice(["tls", "empty_lines", "nuls", "random", "words", "no_host"])
    junk = {
        "tls": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
        "empty_lines": b"\r\n\r\n",  # allowed before a request: the next one is answered
        "nuls": b"\x00" * 64,
        "random": bytes(w.rng.randrange(33, 256) for _ in range(64)),
        "words": b"HELLO\r\n\r\n",
        "no_host": b"GET / HTTP/1.1\r\n\r\n",
    }[how]
    if how == "empty_lines":
        return _c(F_FRAMING, "not_http_empty_lines", junk)
    return _c(F_FRAMING, f"not_http_{how}", junk, 400)


def mutated_head(w: World) -> Case:
    """A valid request with its head (not its Content-Length line) mutated at random:
    whatever the server answers, it may store only the body that was signed."""
    body, raw, legit = _req(w)
    head, _, _ = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    targets = [i for i, ln in enumerate(lines) if not ln.lower().startswith(b"content-length")]
    for _ in range(w.rng.randrange(1, 4)):
        i = w.rng.choice(targets)
        line = bytearray(lines[i])
        op = w.rng.choice(["delete", "insert", "replace", "duplicate", "case", "swap"])
        pos = w.rng.randrange(len(line) + 1)
        byte = w.rng.choice([0, 9, 10, 13, 32, 34, 44, 58, 59, 127, 128, 255, w.rng.randrange(256)])
        if op == "delete" and line:
            del line[min(pos, len(line) - 1)]
        elif op == "insert":
            line.insert(pos, byte)
        elif op == "replace" and line:
            line[min(pos, len(line) - 1)] = byte
        elif op == "duplicate":
            lines.insert(i, bytes(line))
        elif op == "case":
            line = bytearray(line.swapcase())
        elif op == "swap" and len(lines) > 2:
            j = w.rng.choice(targets[1:]) if len(targets) > 1 else i
            lines[i], lines[j] = lines[j], lines[i]
            continue
        lines[i] = bytes(line)
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    return _c(F_FRAMING, "mutated_head", raw, ANY, legit=[legit], timeout=8.0)


# --- pipelining ------------------------------------------------------------------------


def pipelined(w: World) -> Case:
    how = w.rng.choice(
        [
            "valid_run",
            "good_then_bad",
            "bad_then_good",
            "close_then_more",
            "http10_then_more",
            "upgrade_then_more",
            "expect_then_more",
        ]
    )
    if how == "valid_run":
        reqs = [_req(w) for _ in range(w.rng.randrange(2, 41))]
        raw = b"".join(r[1] for r in reqs)
        return _c(F_PIPELINE, how, raw, *[202] * len(reqs), legit=[r[2] for r in reqs])
    _, good, legit = _req(w)
    _, after, _ = _req(w)
    bad_body, _, _ = _req(w)
    bad = _head(w, bad_body, extra=f"Content-Length: {len(bad_body)}\r\n") + bad_body
    if how == "good_then_bad":
        return _c(F_PIPELINE, how, good + bad + after, 202, 400, legit=[legit])
    if how == "bad_then_good":
        return _c(F_PIPELINE, how, bad + good, 400)
    body, _, legit = _req(w)
    if how == "close_then_more":
        first = _head(w, body, extra="Connection: close\r\n") + body
    elif how == "http10_then_more":
        first = _head(w, body, line=f"POST {w.path} HTTP/1.0") + body
    elif how == "upgrade_then_more":
        first = _head(w, body, extra="Connection: Upgrade\r\nUpgrade: websocket\r\n") + body
    else:
        first = _head(w, body, extra="Expect: 100-continue\r\n") + body
        return _c(F_PIPELINE, how, first + after, 202, 202, legit=[legit, *_legit_of(w, after)])
    return _c(F_PIPELINE, how, first + after, 202, legit=[legit])


def _legit_of(w: World, request: bytes) -> list[Legit]:
    body = request.partition(b"\r\n\r\n")[2]
    return [Legit(w.tenant, json.loads(body)["event_id"], body)]


SMUGGLING: list[Generator] = [cl_te, two_lengths, length_forms, te_forms, http10_te]
FRAMING: list[Generator] = [
    line_ends,
    headers,
    request_lines,
    chunk_framing,
    not_http,
    mutated_head,
]
PIPELINING: list[Generator] = [pipelined]

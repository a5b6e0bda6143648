"""Decoding a compressed webhook body, bounded by what was sent.

The receiver's HTTP parser never decodes a body (``auto_decompress=False``): a
``Content-Encoding`` is refused at the head unless the tenant has
``accept_compressed = true``, and only then is the body decoded, here, after it has
been read whole. Decoding comes before the signature check (Chert's signature is over
the JSON), so it is work done for anyone who can reach the port: the output is bounded
by :data:`MAX_INFLATE` times the compressed size (at least :data:`MIN_INFLATE_LIMIT`)
and by ``server.max_body_bytes``, and decoding stops as soon as it would pass that.
"""

from __future__ import annotations

import zlib

# JSON compresses 3-10x; a bomb compresses 1,000x.
MAX_INFLATE = 20
MIN_INFLATE_LIMIT = 64 * 1024

CODINGS = frozenset({"gzip", "x-gzip", "deflate"})


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes decoded")
        self.limit = limit


class Undecodable(Exception):
    pass


def coding_of(header: str | None) -> str | None:
    """The content coding a ``Content-Encoding`` value names (lower case), ``None`` for
    none or ``identity``; a list of codings comes back as it is (and is refused)."""
    if header is None:
        return None
    coding = header.strip().lower()
    return None if coding in ("", "identity") else coding


def limit_for(sent: int, max_body: int) -> int:
    return min(max_body, max(MIN_INFLATE_LIMIT, MAX_INFLATE * sent))


def decode(body: bytes, coding: str, max_body: int) -> bytes:
    """``body`` decoded; :class:`TooLarge` past :func:`limit_for`, :class:`Undecodable`
    when it is not what ``coding`` says."""
    limit = limit_for(len(body), max_body)
    if coding == "deflate":
        # RFC 9110 says zlib-wrapped; some senders send raw deflate (its first byte's
        # low nibble is not 8, the zlib method), as aiohttp also accepts.
        wbits = zlib.MAX_WBITS if body[:1] and body[0] & 0x0F == 8 else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    parts: list[bytes] = []
    size, rest = 0, body
    while True:  # gzip may come in several members, one after the other
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(rest, limit + 1 - size)
        except zlib.error as e:
            raise Undecodable(f"the body is not valid {coding}: {e}") from None
        size += len(out)
        if size > limit:
            raise TooLarge(limit)
        if not d.eof:
            raise Undecodable(f"the body is not a complete {coding} stream")
        parts.append(out)
        rest = d.unused_data
        if not rest or coding == "deflate":
            break
    if rest:
        raise Undecodable(f"the body has bytes after its {coding} stream")
    return b"".join(parts)

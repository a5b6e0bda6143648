"""``chert-relay listen``: forward one tenant's events to a local URL, for development.

It tails Chert's SSE stream (``/events/stream``) with the tenant's API credentials —
polling ``GET /events`` instead while the stream cannot be opened — and POSTs each
event to ``--forward-to`` as a sink gets it (:class:`~relay.delivery.sink_client.SinkClient`:
the same body and Standard Webhooks headers, signed with a ``whsec_`` secret), retrying
no answer, 408/425/429 and 5xx with backoff. One line per attempt goes to stdout, as it
happens: time, type, event id, the local answer's status and milliseconds.

No Redis: one developer's loop has one reader and one writer, so what must survive a
restart fits in a small JSON file in the state directory
(``$XDG_STATE_HOME/chert-relay/listen/<tenant>``, default ``~/.local/state/…``):

- ``watermark``: the newest ``created_at`` handled (forwarded, given up on, or
  filtered out), and ``forwarded``: the ids handled within the last
  ``2 * OVERLAP_S`` of it. A restart asks Chert for ``since = watermark - OVERLAP_S``
  and skips the ids it already handled, so it resumes where it stopped and forwards
  nothing twice — except the one event whose answer came back just before the
  process died and before the file was rewritten (at-least-once, as for a sink);
- ``started``: the first run's start, before which nothing is forwarded (the first
  run starts from now, overlap or not);
- ``secret``: the ``whsec_`` secret, made on the first run and kept, so the local
  app's configuration survives restarts.

The file is rewritten (atomically) after every event; a lock file keeps a second
``listen`` off the same directory. Events are forwarded one at a time, in order.
"""

"""The hostile-input suite: no request that should be refused is accepted.

Generated requests (by mutating valid ones, and with hypothesis) go to the receiver
and to the admin listener of a real ``chert-relay serve``; each is checked for its
answer, for Redis being untouched by a refusal, for the process staying up, for a
valid request being accepted right after, and for the process' memory staying
bounded. The HTTP-level ones also go to a bare aiohttp application (``bench/bare.py``)
and every difference between the two answers is named.

    python -m bench.hostile.run --requests 100000      # the published run
    python -m bench.hostile.run --requests 3000        # what CI runs (tests/test_hostile.py)

Modules: :mod:`.wire` (raw HTTP over sockets), :mod:`.cases` (what a case is),
:mod:`.signature_cases`, :mod:`.body_cases`, :mod:`.http_cases`, :mod:`.admin_cases` (the families),
:mod:`.scenarios` (slow, idle and non-reading clients), :mod:`.target` (the relay,
Redis and the bare server), :mod:`.run` (the run and its table).
"""

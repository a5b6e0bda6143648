--[[ claim: one delivery's claim, for ``take.lua`` (a poll's deliveries in one call):
The stored event comes back whole for the caller to parse. A delivery whose sink URL is
marked gone or whose attempts are used up ends (the caller dead-letters it), and so
does one past its deadline that has had an attempt. One not due yet, whose sink's
breaker is open (or half-open with another job's probe in flight) or whose sink is at
its in-flight cap is put back in the queue for later. Otherwise the attempt is counted
and an in-flight slot leased.
The deadline measures the sink's failure, not the relay's queueing: a wait for an
in-flight slot (the sink's `concurrency`, the relay's own cap) moves the deadline back
by that wait, and a delivery past its deadline that was never tried still gets its
one attempt — unless the sink's breaker is open (the sink is failing now): then it
ends untried (attempts 0), and the caller's dead letter says so.
``k``: ev, attempts, breaker, inflight, gone, job, queue (key names); ``arg``: now,
job_id, max_age_ms, max_attempts, cap (the sink's concurrency), lease_ms (an in-flight
slot's lease), margin_ms (how long past the deadline the job and the event are kept),
url (compared with the gone mark), busy_ms (the first wait when the sink is at its
cap; the longest is drawn between half and all of 10 s), open_jitter_ms, half_open_ms.
uses: stored_event breaker
Returns {'missing'} | {'unreadable'} | {'defer', reason, wait_ms}
  | {'go', attempt, first_ms, deadline_ms, stored, source, probe}
  | {'gone'|'expired'|'exhausted', attempts, first_ms, last_ms, status, error, stored, held_ms}
  held_ms: how long the delivery has waited on the sink's in-flight cap, all told
  probe: '1' if the attempt is the sink's half-open breaker probe, else ''
]]

local function claim(k, arg)
  local now, job_id = tonumber(arg.now), arg.job_id
  local stored = redis.pcall('GET', k.ev)
  if type(stored) == 'table' then return {'unreadable'} end  -- not a string: WRONGTYPE
  if not stored then return {'missing'} end
  local st = redis.call('HMGET', k.attempts, 'a', 'dl', 'due', 'first', 'last', 'st', 'err', 'src',
    'held')
  local a = tonumber(st[1]) or 0
  local dl = tonumber(st[2])
  local margin = tonumber(arg.margin_ms)
  -- neither arq's job nor the payload may expire before the deadline has been acted on
  -- (the sink's max_age may have grown by a reload since the event was queued)
  local function hold()
    local keep = math.max(dl - now, 0) + margin
    redis.call('PEXPIRE', k.job, keep)
    local ev_ttl = redis.call('PTTL', k.ev)
    if ev_ttl >= 0 and ev_ttl < keep then redis.call('PEXPIRE', k.ev, keep) end
    local att_ttl = redis.call('PTTL', k.attempts)
    if att_ttl >= 0 and att_ttl < keep then redis.call('PEXPIRE', k.attempts, keep) end
  end
  if not dl then
    dl = (event_at(stored) or now) + tonumber(arg.max_age_ms)
    redis.call('HSET', k.attempts, 'dl', dl)
    redis.call('PEXPIRE', k.attempts, math.max(dl - now, 0) + margin)
    hold()  -- now, even if this claim only puts the delivery off
  end
  local info = {a, st[4] or '', st[5] or '', st[6] or '', st[7] or '', stored, st[9] or '0'}
  if redis.call('GET', k.gone) == arg.url then return {'gone', unpack(info)} end
  local late = now >= dl
  if late and a > 0 then return {'expired', unpack(info)} end
  if a >= tonumber(arg.max_attempts) then return {'exhausted', unpack(info)} end
  local function defer(reason, wait)
    redis.call('ZADD', k.queue, now + wait, job_id)
    return {'defer', reason, wait}
  end
  -- A delivery put off again and again because its sink is busy (or probing) waits
  -- longer each time, up to about 10 s: a slow sink's backlog must not crowd out the
  -- jobs of other sinks by cycling through the queue. A capped wait is drawn between
  -- half and all of the cap (math.random, seeded by the caller): with one fixed cap,
  -- the waiting deliveries would come back in step, in groups, and leave the sink's
  -- slots empty between them.
  local function longer(wait)
    local n = redis.call('HINCRBY', k.attempts, 'w', 1)
    local cap = math.max(wait, 10000)
    local grown = wait * 2 ^ math.min(n - 1, 16)
    if grown < cap then return grown end
    return math.floor(cap * (1 + math.random()) / 2)
  end
  local due = tonumber(st[3])
  if due and due > now then return defer('not_due', due - now) end
  local verdict, wait = breaker_check(k.breaker, now, job_id, tonumber(arg.open_jitter_ms),
    tonumber(arg.half_open_ms))
  if verdict == 'open' then
    if late then return {'expired', unpack(info)} end  -- untried: its sink is failing
    return defer('breaker_open', wait)
  end
  if verdict == 'half' then return defer('half_open', longer(wait)) end
  local lease = tonumber(arg.lease_ms)
  redis.call('ZREMRANGEBYSCORE', k.inflight, '-inf', now)
  local mine = redis.call('ZSCORE', k.inflight, job_id)
  if redis.call('ZCARD', k.inflight) >= tonumber(arg.cap) and not mine then
    -- Waiting on the relay's own cap is not the sink's failure: the deadline moves too.
    local wait = longer(tonumber(arg.busy_ms))
    dl = redis.call('HINCRBY', k.attempts, 'dl', wait)
    redis.call('HINCRBY', k.attempts, 'held', wait)
    hold()
    return defer('busy', wait)
  end
  local probe = ''
  if verdict == 'probe' then
    breaker_take_probe(k.breaker, now, job_id, lease)
    probe = '1'
  end
  redis.call('ZADD', k.inflight, now + lease, job_id)
  redis.call('PEXPIRE', k.inflight, lease + margin)
  a = a + 1
  redis.call('HSET', k.attempts, 'a', a, 'last', now, 'w', 0)
  redis.call('HSETNX', k.attempts, 'first', now)
  hold()
  return {'go', a, st[4] or now, dl, stored, st[8] or '', probe}
end

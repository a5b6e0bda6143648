--[[ claim: take one delivery attempt, put the delivery off, or end it (relay/delivery/scripts.py).
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
KEYS
  1 ev          the stored event
  2 attempts    the delivery's record (hash: a, dl, due, first, last, st, err, src, w, held)
  3 breaker     the sink's breaker
  4 inflight    the sink's in-flight leases (sorted set of job ids by lease end)
  5 gone        the sink URL that answered 410, if any
  6 job         arq's job key
  7 queue       arq's queue
ARGV
  1 now             Unix ms
  2 job_id
  3 max_age_ms      the sink's max_age
  4 max_attempts
  5 cap             the sink's concurrency
  6 lease_ms        how long an in-flight slot (and a probe) is held
  7 margin_ms       how long past the deadline the job and the event are kept
  8 url             the sink's URL (compared with the gone mark)
  9 busy_ms         the first wait when the sink is at its cap
  10 open_jitter_ms added to the wait for an open breaker
  11 half_open_ms   the wait while another job probes
uses: stored_event breaker
Returns {'missing'} | {'unreadable'} | {'defer', reason, wait_ms}
  | {'go', attempt, first_ms, deadline_ms, stored, source}
  | {'gone'|'expired'|'exhausted', attempts, first_ms, last_ms, status, error, stored, held_ms}
  held_ms: how long the delivery has waited on the sink's in-flight cap, all told
]]
local now, job_id = tonumber(A.now), A.job_id
local stored = redis.pcall('GET', K.ev)
if type(stored) == 'table' then return {'unreadable'} end  -- not a string: WRONGTYPE
if not stored then return {'missing'} end
local st = redis.call('HMGET', K.attempts, 'a', 'dl', 'due', 'first', 'last', 'st', 'err', 'src',
  'held')
local a = tonumber(st[1]) or 0
local dl = tonumber(st[2])
local margin = tonumber(A.margin_ms)
-- neither arq's job nor the payload may expire before the deadline has been acted on
-- (the sink's max_age may have grown by a reload since the event was queued)
local function hold()
  local keep = math.max(dl - now, 0) + margin
  redis.call('PEXPIRE', K.job, keep)
  local ev_ttl = redis.call('PTTL', K.ev)
  if ev_ttl >= 0 and ev_ttl < keep then redis.call('PEXPIRE', K.ev, keep) end
  local att_ttl = redis.call('PTTL', K.attempts)
  if att_ttl >= 0 and att_ttl < keep then redis.call('PEXPIRE', K.attempts, keep) end
end
if not dl then
  dl = (event_at(stored) or now) + tonumber(A.max_age_ms)
  redis.call('HSET', K.attempts, 'dl', dl)
  redis.call('PEXPIRE', K.attempts, math.max(dl - now, 0) + margin)
  hold()  -- now, even if this claim only puts the delivery off
end
local info = {a, st[4] or '', st[5] or '', st[6] or '', st[7] or '', stored, st[9] or '0'}
if redis.call('GET', K.gone) == A.url then return {'gone', unpack(info)} end
local late = now >= dl
if late and a > 0 then return {'expired', unpack(info)} end
if a >= tonumber(A.max_attempts) then return {'exhausted', unpack(info)} end
local function defer(reason, wait)
  redis.call('ZADD', K.queue, now + wait, job_id)
  return {'defer', reason, wait}
end
-- A delivery put off again and again because its sink is busy (or probing) waits
-- longer each time, up to 10 s: a slow sink's backlog must not crowd out the jobs of
-- other sinks by cycling through the queue.
local function longer(wait)
  local n = redis.call('HINCRBY', K.attempts, 'w', 1)
  return math.min(wait * 2 ^ math.min(n - 1, 16), math.max(wait, 10000))
end
local due = tonumber(st[3])
if due and due > now then return defer('not_due', due - now) end
local verdict, wait = breaker_check(K.breaker, now, job_id, tonumber(A.open_jitter_ms),
  tonumber(A.half_open_ms))
if verdict == 'open' then
  if late then return {'expired', unpack(info)} end  -- untried: its sink is failing
  return defer('breaker_open', wait)
end
if verdict == 'half' then return defer('half_open', longer(wait)) end
local lease = tonumber(A.lease_ms)
redis.call('ZREMRANGEBYSCORE', K.inflight, '-inf', now)
local mine = redis.call('ZSCORE', K.inflight, job_id)
if redis.call('ZCARD', K.inflight) >= tonumber(A.cap) and not mine then
  -- Waiting on the relay's own cap is not the sink's failure: the deadline moves too.
  local wait = longer(tonumber(A.busy_ms))
  dl = redis.call('HINCRBY', K.attempts, 'dl', wait)
  redis.call('HINCRBY', K.attempts, 'held', wait)
  hold()
  return defer('busy', wait)
end
if verdict == 'probe' then breaker_take_probe(K.breaker, now, job_id, lease) end
redis.call('ZADD', K.inflight, now + lease, job_id)
redis.call('PEXPIRE', K.inflight, lease + margin)
a = a + 1
redis.call('HSET', K.attempts, 'a', a, 'last', now, 'w', 0)
redis.call('HSETNX', K.attempts, 'first', now)
hold()
return {'go', a, st[4] or now, dl, stored, st[8] or ''}

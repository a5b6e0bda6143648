--[[ claim: one delivery's claim, for ``take.lua`` (a poll's deliveries in one call):
The stored event comes back whole for the caller to parse. A delivery of a sink an
operator paused (``k.paused``) is set aside in the sink's waiting set (lib/wait.lua)
before anything else is looked at, so that it neither expires nor ends while the pause
lasts: it comes back when the sink is resumed. A delivery whose sink URL is
marked gone or whose attempts are used up ends (the caller dead-letters it), and so
does one past its deadline that has had an attempt. One not due yet is put back in the
queue for when it is. One whose sink's breaker is open (or half-open with another
job's probe in flight) or whose sink is at its in-flight cap is set aside in the
sink's waiting set (lib/wait.lua) until a slot frees. One of a paced sink (`rate`)
that has a slot but no token is put back in the queue, once, due at its own turn
(lib/rate.lua), giving back a slot reserved for it — or, if that turn is past the
horizon, or other deliveries of its sink are set aside, set aside too (reason `rate`). Otherwise the attempt is counted
and an in-flight slot leased (or the slot reserved for it taken over).
The deadline measures the sink's failure, not the relay's queueing: a wait for an
in-flight slot (the sink's `concurrency`, the relay's own cap), for a turn of its `rate`
or on a pause moves the
deadline back by that wait, and a delivery past its deadline that was never tried still gets its
one attempt — unless the sink's breaker is open (the sink is failing now): then it
ends untried (attempts 0), and the caller's dead letter says so.
``k``: the delivery's keys (lib/delivery_keys.lua); ``arg``: now, job_id, max_age_ms,
max_attempts, cap (the sink's concurrency), lease_ms (an in-flight slot's lease),
margin_ms (how long past the deadline the job and the event are kept), url (compared
with the gone mark), rate_ms (the interval between the sink's starts: 1000 / rate; 0
or nil: no rate), reserve (true: a claim ahead for a run that holds a slot of the sink
— finish_batch.lua's reserve: no slot is checked or leased, since the run hands its
own over when it ends, and the attempt is not counted yet — the holder's finish counts
it when it hands the slot over (lib/finish.lua), so a reserve never started costs no
attempt; never the breaker's probe), score (the job's score in the queue, if the
caller has read it), memo (a table kept per sink across the claims of one script call:
what this claim learns of the sink — paused, gone, a closed or open breaker, its cap
full, listed among the waiting sinks — later claims of the same call read from it
instead of Redis. Within one call only these claims write to the sink, so none of it
changes under them except as noted here: a slot given back clears `full`. A take
that meets a backlog of one sink sets most of it aside this way at about half the
calls).
uses: stored_event breaker wait rate attempt
Returns {'missing'} | {'unreadable'} | {'defer', 'not_due', wait_ms}
  | {'park', 'paused'|'busy'|'breaker_open'|'half_open'}
  | {'park', 'rate', wait_ms} (back in the queue, due at its turn) | {'park', 'rate'}
  | {'go', attempt, first_ms, deadline_ms, stored, source, probe}
  | {'gone'|'expired'|'exhausted', attempts, first_ms, last_ms, status, error, stored, held_ms}
  held_ms: how long the delivery has waited on the sink's in-flight cap, its rate or a
  pause, all told
  probe: '1' if the attempt is the sink's half-open breaker probe, else ''
]]

local function claim(k, arg)
  local now, job_id = tonumber(arg.now), arg.job_id
  local m = arg.memo or {}
  local stored = redis.pcall('GET', k.ev)
  if type(stored) == 'table' then return {'unreadable'} end  -- not a string: WRONGTYPE
  if not stored then return {'missing'} end
  local st = redis.call('HMGET', k.attempts, 'a', 'dl', 'due', 'first', 'last', 'st', 'err', 'src',
    'held', 'rt', 'ps')
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
    -- the record is this delivery's alone: a wait that made it lasting ends here
    if redis.call('PTTL', k.attempts) < keep then redis.call('PEXPIRE', k.attempts, keep) end
  end
  -- A first claim sets the deadline and holds the keys to it whatever it decides —
  -- except a wait in the waiting set, which keeps them without a deadline
  -- (lib/wait.lua's park): a backlog set aside writes nothing it would undo at once,
  -- and its deadline goes in the same write as the rest of what setting aside records.
  local owed = false
  if not dl then
    dl = (event_at(stored) or now) + tonumber(arg.max_age_ms)
    owed = true
  end
  local function write_dl()
    if owed then redis.call('HSET', k.attempts, 'dl', dl) end
  end
  local function settle()
    if owed then write_dl(); hold() end
  end
  -- set aside in the sink's waiting set; out: it holds no in-flight slot
  local function aside(reason, out)
    local known = {ps = st[11], score = arg.score, out = out, listed = m.listed,
      dl = owed and dl or nil}
    if park(k, now, job_id, reason, known) then m.full = nil end
    m.listed = true
    return {'park', reason}
  end
  if m.paused == nil then m.paused = redis.call('EXISTS', k.paused) == 1 end
  if m.paused then
    -- the operator's choice, not the sink's failure: no attempt, no end, and the
    -- deadline moves back by the pause (lib/wait.lua)
    return aside('paused')
  end
  local info = {a, st[4] or '', st[5] or '', st[6] or '', st[7] or '', stored, st[9] or '0'}
  if m.gone == nil then m.gone = redis.call('GET', k.gone) end  -- false: no mark
  if m.gone == arg.url then settle(); return {'gone', unpack(info)} end
  local late = now >= dl
  if late and a > 0 then settle(); return {'expired', unpack(info)} end
  if a >= tonumber(arg.max_attempts) then settle(); return {'exhausted', unpack(info)} end
  local function defer(reason, wait)
    settle()
    redis.call('ZADD', k.queue, now + wait, job_id)
    return {'defer', reason, wait}
  end
  local due = tonumber(st[3])
  if due and due > now then return defer('not_due', due - now) end
  -- a closed or open breaker is the same for every job (a probe's turn is not)
  local verdict = m.verdict or breaker_check(k.breaker, now, job_id)
  if verdict == 'ok' or verdict == 'open' then m.verdict = verdict end
  if verdict == 'open' then
    if late then settle(); return {'expired', unpack(info)} end  -- untried: sink failing
    return aside('breaker_open')
  end
  if verdict == 'half' or (verdict == 'probe' and arg.reserve) then
    return aside('half_open')
  end
  local lease = tonumber(arg.lease_ms)
  local mine = false
  if not arg.reserve then
    if not m.swept then
      redis.call('ZREMRANGEBYSCORE', k.inflight, '-inf', now)
      m.swept = true
    end
    mine = redis.call('ZSCORE', k.inflight, job_id)
    if not mine and not m.full then
      m.full = redis.call('ZCARD', k.inflight) >= tonumber(arg.cap) or nil
    end
    if not mine and m.full then
      -- Waiting on the relay's own cap is not the sink's failure: the deadline moves
      -- with the wait (lib/wait.lua).
      return aside('busy', true)
    end
  end
  local interval = tonumber(arg.rate_ms) or 0
  if interval > 0 then
    local turn = tonumber(st[10])
    -- behind the deliveries set aside (unless the waiting set just handed it a slot)
    local wait = -1
    if turn or mine or redis.call('EXISTS', k.wait) == 0 then
      wait = rate_take(k.rate, now, interval, turn)
    end
    if wait < 0 then
      -- its turn is past the horizon: set aside until turns come near (lib/rate.lua)
      redis.call('HDEL', k.attempts, 'rt')
      return aside('rate', not mine and not arg.reserve)
    elseif wait > 0 then
      -- No token yet: back in the queue, due at its turn, once. As with a wait for a
      -- slot, the relay's own pace is not the sink's failure: the deadline moves back.
      if mine then
        redis.call('ZREM', k.inflight, job_id)
        m.full = nil
      end
      write_dl()
      dl = dl + wait
      redis.call('HINCRBY', k.attempts, 'dl', wait)
      redis.call('HINCRBY', k.attempts, 'held', wait)
      redis.call('HSET', k.attempts, 'rt', now + wait)
      hold()
      redis.call('ZADD', k.queue, now + wait, job_id)
      return {'park', 'rate', wait}
    end
  end
  local probe = ''
  if verdict == 'probe' then
    breaker_take_probe(k.breaker, now, job_id, lease)
    probe = '1'
  end
  a = a + 1
  if not arg.reserve then
    redis.call('ZADD', k.inflight, now + lease, job_id)
    redis.call('PEXPIRE', k.inflight, lease + margin)
    attempt_counted(k.attempts, a, now, st[4], st[11] or st[10])
  end
  write_dl()
  hold()
  return {'go', a, st[4] or now, dl, stored, st[8] or '', probe}
end

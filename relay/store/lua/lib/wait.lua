--[[ wait: a sink's waiting room. A delivery whose sink has no free in-flight slot (its
`concurrency`), or whose breaker lets nothing through now, is set aside ("parked") out
of arq's queue into the sink's waiting set, in queue order, instead of being put off
and taken again and again: it costs nothing while it waits, and it cannot crowd other
sinks' jobs out of the queue's head. It comes back when a slot frees — a finish, a
lapsed lease, a breaker that lets a probe through — with that slot reserved for it (an
in-flight lease of its own, which its claim takes over), so a sink's slots are filled
in order and never twice. While set aside, its job, record and stored event do not
expire; a wait for a slot (reason `busy`), for a turn of the sink's rate (`rate`) or
on an operator's pause (`paused`) moves its deadline back by as long (neither the relay's own cap nor a pause is the sink's
failure), a wait on the breaker does not. A paused sink has no free slot at all: its
deliveries stay set aside until it is resumed (relay/store/lua/resume.lua).
The sink's member ("tenant:sink") is in the set of waiting sinks while its waiting
set is not empty: every worker's sweep (sweep.lua) looks there for slots that freed
without a finish.
A paced sink's deliveries whose turn is past the horizon wait here too (reason `rate`,
lib/rate.lua), and so does one that comes while others are set aside; they come
back as turns come near, each with a slot reserved, and their claim promises each its
turn (or starts it).
uses: keys breaker rate
]]

-- Set the delivery aside; its place in line is kept across waits ('ps'). `known` is
-- what the caller (lib/claim.lua) has read already, so that a take setting a large
-- backlog aside reads nothing twice: ps (the 'ps' field, false if unset), score (its
-- score in the queue, nil if not read), out (true: it holds no in-flight slot), listed
-- (true: the sink is in the set of waiting sinks already), dl (a first claim's
-- deadline, to be recorded with the rest). Returns true if a slot reserved for it
-- went back.
local function park(k, now, job_id, reason, known)
  local order = tonumber(known.ps) or tonumber(known.score)
    or tonumber(redis.call('ZSCORE', k.queue, job_id)) or now
  redis.call('ZREM', k.queue, job_id)
  local freed = false
  if not known.out then  -- a slot reserved for it goes back
    freed = redis.call('ZREM', k.inflight, job_id) == 1
  end
  redis.call('ZADD', k.wait, order, job_id)
  if known.dl then
    redis.call('HSET', k.attempts, 'ps', order, 'pk', now, 'pr', reason, 'dl', known.dl)
  else
    redis.call('HSET', k.attempts, 'ps', order, 'pk', now, 'pr', reason)
  end
  redis.call('PERSIST', k.job)
  redis.call('PERSIST', k.attempts)
  redis.call('PERSIST', k.ev)
  if not known.listed then redis.call('SADD', k.waiting, k.member) end
  return freed
end

-- How many of the sink's deliveries may start now: its free slots, or one while its
-- breaker lets a probe through, or none while it is open (or probing) or paused; for a
-- paced sink, no more than the turns it can promise now (lib/rate.lua's rate_fits).
local function wait_free(inflight, breaker, paused, cap, now, rate)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  local free = cap - redis.call('ZCARD', inflight)
  -- every slot held (as when a finish hands its slot on): none, whatever else is read
  if free == 0 then return 0 end
  if redis.call('EXISTS', paused) == 1 then return 0 end
  local admits = breaker_admits(breaker, now)
  if admits == 'none' then return 0 end
  if admits == 'one' then free = math.min(free, 1) end
  local turns = rate_fits(rate, now)
  if turns then free = math.min(free, turns) end
  return free
end

-- Queue (due now) the sink's first `n` waiting deliveries, each with an in-flight slot
-- reserved for `lease_ms` if `reserve`; their job ids. A job id is `job_base` and the
-- event id; its record, `att_base` and the event id.
local function unpark(wait, waiting, member, inflight, queue, att_base, job_base, n, now,
    lease_ms, reserve)
  local out = {}
  if n <= 0 then return out end
  local popped = redis.call('ZPOPMIN', wait, n)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local att = att_base .. string.sub(id, #job_base + 1)
    local st = redis.call('HMGET', att, 'pk', 'pr', 'dl', 'held')
    local since = tonumber(st[1])
    if since and (st[2] == 'busy' or st[2] == 'paused' or st[2] == 'rate') and now > since then
      -- waiting on the relay's own cap or pace, or on a pause, is not the sink's
      -- failure: the deadline moves
      local waited = now - since
      redis.call('HSET', att, 'dl', (tonumber(st[3]) or 0) + waited,
        'held', (tonumber(st[4]) or 0) + waited)
    end
    redis.call('HDEL', att, 'pk', 'pr')
    if reserve then redis.call('ZADD', inflight, now + lease_ms, id) end
    redis.call('ZADD', queue, now, id)
    out[#out + 1] = id
  end
  if redis.call('EXISTS', wait) == 0 then redis.call('SREM', waiting, member) end
  return out
end

-- Fill the free slots of the sink of delivery keys `k` (lib/delivery_keys.lua) from its
-- waiting set.
local function wait_fill(k, cap, now, lease_ms)
  if redis.call('EXISTS', k.wait) == 0 then return {} end
  local n = wait_free(k.inflight, k.breaker, k.paused, cap, now, k.rate)
  return unpark(k.wait, k.waiting, k.member, k.inflight, k.queue, k.att_base, k.job_base, n,
    now, lease_ms, true)
end

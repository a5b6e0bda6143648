--[[ take: start the due deliveries of one read of the queue and claim each, in one
call (relay/delivery/steps.py, for relay/delivery/loop.py). Per job, arq's checks — due
by Redis' clock, not in progress on any worker — then the claim (lib/claim.lua: an
attempt, a deferral, a wait in the sink's waiting set, or the end of the delivery),
then, for a job this worker now holds, arq's in-progress mark. The mark holds the run's
fencing token: only a run whose token is still there may finish, renew, release or
reschedule the delivery (a worker paused past its hold finds another's token and
changes nothing). A job put off or set aside to wait for its sink gets no mark: it runs
later, on any worker, and setting it aside writes nothing it does not need. A job whose
job key has expired is taken out of the queue and reported. A job of a sink this worker knows but cannot use (its secret is
unusable) is in `peek` mode: only marked, and its stored event and attempts come back
for the caller to dead-letter it without an attempt. A job of a sink this worker does
not know (a reload that reached ``serve`` first, or a sink removed) is put off, for up
to `unknown_grace_ms` from the first time it was met; after that it is peeked at (and
dead-lettered as gone).
KEYS
  1 queue              arq's queue
ARGV
  1 prefix             the relay's key prefix
  2 tag                this take's unique tag: job n's token is tag .. '.' .. n
  3 in_progress_ms     how long the in-progress mark holds (the heartbeat renews it)
  4 max                how many jobs this worker can start (deferred ones do not count)
  5 margin_ms          how long past its deadline a delivery's job and event are kept
  6 seed               seeds the jitter of an unknown sink's wait
  7 sinks              JSON: tenant .. "\n" .. sink -> [max_age_ms, max_attempts, cap,
                       lease_ms, url, usable, rate_ms] for every sink this worker knows (usable
                       0: only peeked at; rate_ms: 1000 / its rate, 0 if none)
  8 unknown_grace_ms   how long a job of an unknown sink is put off before it ends
  9 jobs               JSON: the due job ids read from the queue, in its order
 10 max_aside          how many jobs one call sets aside before it passes over the rest of
                       the sinks it set some aside for: they stay in the queue, untouched,
                       for the next call (a large backlog is set aside in short calls,
                       between which other work's calls run), while every other sink's
                       jobs in the read are still taken, and so is one that holds a slot
                       handed to it
uses: clock claim delivery_keys job_record
flags: allow-oom
Returns {{job_id, chat, token, reply, ...}, {expired job id, ...}, now_ms, stopped}: reply
as lib/claim.lua's, or {'peek', stored|false, attempts, first_ms, last_ms}; chat is the
ordered delivery's chat id from the job record ('' if none); now_ms is Redis' clock;
stopped is 1 if the call passed over jobs once it had set max_aside aside, else 0.
]]
local now, left = redis_now_ms(), tonumber(A.max)
local sinks = cjson.decode(A.sinks)
math.randomseed(tonumber(A.seed))
local out, expired = {}, {}
local memos = {}  -- per sink: what its claims learned (lib/claim.lua's memo)
local n, aside, max_aside, stopped = 0, 0, tonumber(A.max_aside), 0
-- the sinks this call set a job aside for: {inflight = its in-flight set, leases = the
-- jobs holding a lease in it (id -> true), read once, at the first job passed over}
local aside_for = {}
for _, id in ipairs(cjson.decode(A.jobs)) do
  if left <= 0 then break end
  local tenant, sink, event_id = job_parts(A.prefix, id)
  local key = tenant .. '\n' .. sink
  local pass, sa = false, aside_for[key]
  if aside >= max_aside and sa then
    -- one handed a slot (a lease of its own in the sink's in-flight set) still goes
    if not sa.leases then
      sa.leases = {}
      for _, j in ipairs(redis.call('ZRANGE', sa.inflight, 0, -1)) do sa.leases[j] = true end
    end
    pass = not sa.leases[id]
    if pass then stopped = 1 end
  end
  local score = not pass and redis.call('ZSCORE', K.queue, id)
  local in_progress = IN_PROGRESS_KEY_PREFIX .. id
  if score and tonumber(score) <= now and redis.call('EXISTS', in_progress) == 0 then
    local record = redis.call('GET', JOB_KEY_PREFIX .. id)
    if not record then
      redis.call('ZREM', K.queue, id)
      expired[#expired + 1] = id
    else
      n = n + 1
      local token = A.tag .. '.' .. n
      local chat = job_chat(record)
      local k = delivery_keys(A.prefix, K.queue, id, tenant, sink, event_id, chat)
      local lim = sinks[key]
      local reply
      local function peek()
        local st = redis.call('HMGET', k.attempts, 'a', 'first', 'last')
        local stored = redis.pcall('GET', k.ev)
        if type(stored) ~= 'string' then stored = false end
        left = left - 1
        return {'peek', stored, st[1] or '0', st[2] or '', st[3] or ''}
      end
      if not lim then
        -- A sink this worker does not know: put off (its own reload may be on the
        -- way), unless it has been unknown for longer than the grace.
        local grace = tonumber(A.unknown_grace_ms)
        local since = tonumber(redis.call('HGET', k.attempts, 'unk'))
        if not since then
          since = now
          redis.call('HSET', k.attempts, 'unk', now)
          if redis.call('PTTL', k.attempts) < 0 then
            redis.call('PEXPIRE', k.attempts, grace + tonumber(A.margin_ms))
          end
        end
        if now - since >= grace then
          reply = peek()
        else
          local wait = math.min(grace - (now - since), math.floor(2000 * (1 + math.random())))
          redis.call('ZADD', K.queue, now + wait, id)
          reply = {'defer', 'unknown_sink', wait}
        end
      elseif lim[6] == 0 then
        reply = peek()
      else
        memos[key] = memos[key] or {}
        local ok, got = pcall(claim, k, {
          now = now, job_id = id, max_age_ms = lim[1], max_attempts = lim[2], cap = lim[3],
          lease_ms = lim[4], margin_ms = A.margin_ms, url = lim[5], rate_ms = lim[7],
          score = score, memo = memos[key],
        })
        if not ok then
          -- A claim that failed part way (a key of the wrong type): the job is held for
          -- a while, as a take always held it, so that reads do not try it again at
          -- once; the take fails, and what it wrote before stays (Redis rolls nothing
          -- back).
          redis.call('SET', in_progress, token, 'PX', A.in_progress_ms)
          error(got)
        end
        reply = got
        if reply[1] == 'park' then
          aside = aside + 1
          aside_for[key] = aside_for[key] or {inflight = k.inflight}
        elseif reply[1] ~= 'defer' then
          left = left - 1
        end
      end
      -- the in-progress mark, for a job this worker now holds (one put off or set aside
      -- runs later, on any worker: it gets none, and writes nothing for it)
      if reply[1] ~= 'defer' and reply[1] ~= 'park' then
        redis.call('SET', in_progress, token, 'PX', A.in_progress_ms)
      end
      out[#out + 1] = id
      out[#out + 1] = chat
      out[#out + 1] = token
      out[#out + 1] = reply
    end
  end
end
return {out, expired, now, stopped}

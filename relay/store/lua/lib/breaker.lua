--[[ breaker: a sink's circuit breaker, one hash per (tenant, sink) (relay/delivery/breaker.py).
Fields: s (o open, h half-open, absent or c closed), u (while open: when a probe may go,
Unix ms), p and pu (the probe's job id and lease end); the judgement's window: w (the
current bucket's number: Unix ms // window), cf and cs (the failed and the successful
attempts counted in it), pf and ps (those of the bucket before).
]]

-- 'ok' | 'probe' (go ahead as the half-open probe) | 'open' | 'half' (another job's
-- probe is in flight)
local function breaker_check(key, now, job_id)
  local b = redis.call('HMGET', key, 's', 'u', 'p', 'pu')
  if b[1] == 'o' then
    if now < (tonumber(b[2]) or 0) then return 'open' end
    return 'probe'
  elseif b[1] == 'h' then
    if b[3] == job_id or now >= (tonumber(b[4]) or 0) then return 'probe' end
    return 'half'
  end
  return 'ok'
end

-- How many of the sink's deliveries the breaker lets start now, whatever their job:
-- 'all' (closed), 'one' (a probe may go: open past its wait, or half-open with the
-- probe's lease lapsed) or 'none' (open, or another job's probe in flight).
local function breaker_admits(key, now)
  local b = redis.call('HMGET', key, 's', 'u', 'pu')
  local until_ms = (b[1] == 'o' and b[2]) or (b[1] == 'h' and b[3])
  if not until_ms then return 'all' end
  if now < (tonumber(until_ms) or 0) then return 'none' end
  return 'one'
end

local function breaker_take_probe(key, now, job_id, lease)
  redis.call('HSET', key, 's', 'h', 'p', job_id, 'pu', now + lease)
end

-- Count `failed` failed and `ok` successful attempts in the window; the failed attempts
-- and all attempts of the last `window` ms, estimated as the current bucket's plus the
-- share of the previous bucket the window still covers, rounded to the nearest whole
-- attempt.
local function breaker_count(key, now, window, failed, ok)
  local b = redis.call('HMGET', key, 'w', 'cf', 'cs', 'pf', 'ps')
  local n, w = math.floor(now / window), tonumber(b[1])
  local cf, cs = tonumber(b[2]) or 0, tonumber(b[3]) or 0
  local pf, ps = tonumber(b[4]) or 0, tonumber(b[5]) or 0
  if w and n < w then
    n = w  -- a worker whose clock is behind counts in the newest bucket
  elseif w ~= n then
    if w == n - 1 then pf, ps = cf, cs else pf, ps = 0, 0 end
    cf, cs = 0, 0
  end
  cf, cs = cf + failed, cs + ok
  redis.call('HSET', key, 'w', n, 'cf', cf, 'cs', cs, 'pf', pf, 'ps', ps)
  local share = math.max(0, math.min(1, 1 - (now - n * window) / window))
  return math.floor(cf + pf * share + 0.5), math.floor(cf + cs + (pf + ps) * share + 0.5)
end

-- Record how an attempt went. effect: 'success' (the sink answered: a 2xx, or a 4xx that
-- shows it alive), 'failure' (no answer, 408/425/429/5xx); anything else leaves it be.
-- rule: {min_failures, failure_rate, window_ms}. Closed, every attempt counts in the
-- window, and a failure opens the breaker once the window holds at least min_failures
-- failed attempts that are at least failure_rate of its attempts. Open or half-open, only
-- the probe's answer decides: its failure opens the breaker for another cooldown, its
-- success closes it with a fresh window; the other attempts still in flight change nothing.
-- Returns the change, for the worker's log: '' | 'open <failed> <attempts>' | 'reopen'
-- | 'close'.
-- `tally` (from breaker_tally; nil: none): the successes of a closed breaker are counted
-- there, per breaker, and written once, by breaker_tally_write at the end of the script
-- call — all of it at the same `now`, so that counting them later changes nothing: a
-- failure counts those before it first, and nothing but the counts reads them.
local function breaker_record(key, now, job_id, effect, rule, cooldown, ttl, tally)
  local failed = effect == 'failure'
  if not failed and effect ~= 'success' then return '' end
  local pending = tally and tally.n[key]
  if pending and not failed then
    tally.n[key] = pending + 1  -- closed, as it was when the first was tallied
    return ''
  end
  local b = pending and {} or redis.call('HMGET', key, 's', 'p')
  if b[1] == 'o' or b[1] == 'h' then
    if b[1] ~= 'h' or b[2] ~= job_id then
      if failed then redis.call('PEXPIRE', key, ttl) end
      return ''
    end
    if failed then
      redis.call('HSET', key, 's', 'o', 'u', now + cooldown)
      redis.call('HDEL', key, 'p', 'pu')
      redis.call('PEXPIRE', key, ttl)
      return 'reopen'
    end
    redis.call('DEL', key)
    breaker_count(key, now, tonumber(rule[3]), 0, 1)
    redis.call('PEXPIRE', key, ttl)
    return 'close'
  end
  if tally and not failed then
    tally.n[key] = 1
    tally.keys[#tally.keys + 1] = key
    return ''
  end
  if pending then tally.n[key] = nil end
  local failures, attempts = breaker_count(key, now, tonumber(rule[3]), failed and 1 or 0,
    (failed and 0 or 1) + (pending or 0))
  redis.call('PEXPIRE', key, ttl)
  if failed and failures >= tonumber(rule[1]) and failures >= tonumber(rule[2]) * attempts then
    redis.call('HSET', key, 's', 'o', 'u', now + cooldown)
    return 'open ' .. failures .. ' ' .. attempts
  end
  return ''
end

-- A tally of closed breakers' successes for breaker_record, kept across one script call.
local function breaker_tally()
  return {n = {}, keys = {}}
end

-- Count what `tally` holds, once per breaker.
local function breaker_tally_write(tally, now, rule, ttl)
  for _, key in ipairs(tally.keys) do
    local ok = tally.n[key]
    if ok then
      breaker_count(key, now, tonumber(rule[3]), 0, ok)
      redis.call('PEXPIRE', key, ttl)
      tally.n[key] = nil  -- listed again if a failure counted it and a success came after
    end
  end
end

-- a probe that ends without an answer (cancelled) gives its turn to the next job
local function breaker_release(key, job_id)
  if redis.call('HGET', key, 'p') == job_id then
    redis.call('HSET', key, 'pu', 0)
  end
end

--[[ breaker: a sink's circuit breaker, one hash per (tenant, sink) (relay/delivery/breaker.py).
Fields: s (o open, h half-open, absent or c closed), f (consecutive failures),
u (while open: when a probe may go, Unix ms), p and pu (the probe's job id and lease end).
]]

-- 'ok' | 'probe' (go ahead as the half-open probe) | 'open' | 'half', then the wait (ms)
local function breaker_check(key, now, job_id, open_jitter, half_wait)
  local b = redis.call('HMGET', key, 's', 'u', 'p', 'pu')
  if b[1] == 'o' then
    local u = tonumber(b[2]) or 0
    if now < u then return 'open', u - now + open_jitter end
    return 'probe', 0
  elseif b[1] == 'h' then
    if b[3] == job_id or now >= (tonumber(b[4]) or 0) then return 'probe', 0 end
    return 'half', half_wait
  end
  return 'ok', 0
end

local function breaker_take_probe(key, now, job_id, lease)
  redis.call('HSET', key, 's', 'h', 'p', job_id, 'pu', now + lease)
end

-- effect: 'success' closes; 'failure' counts and may open; anything else leaves it be
local function breaker_record(key, now, job_id, effect, threshold, cooldown, ttl)
  if effect == 'success' then
    redis.call('DEL', key)
  elseif effect == 'failure' then
    local b = redis.call('HMGET', key, 's', 'p')
    local f = redis.call('HINCRBY', key, 'f', 1)
    local closed = (b[1] == false or b[1] == 'c')
    if (b[1] == 'h' and b[2] == job_id) or (closed and f >= threshold) then
      redis.call('HSET', key, 's', 'o', 'u', now + cooldown)
      redis.call('HDEL', key, 'p', 'pu')
    end
    redis.call('PEXPIRE', key, ttl)
  end
end

-- a probe that ends without an answer (cancelled) gives its turn to the next job
local function breaker_release(key, job_id)
  if redis.call('HGET', key, 'p') == job_id then
    redis.call('HSET', key, 'pu', 0)
  end
end

--[[ event_log: the event log's records (relay/store/eventlog.py). One hash per event,
``{prefix}:log:{tenant}:{event_id}``:
  type, chat, at        the event's type, chat id ('' if none), first arrival (Redis ms)
  ev                    the stored event as first taken in (relay/store/stored_event.py)
  via:<source>          "<first ms> <count>": each way it arrived, and how often
  s:<sink>              the delivery's recorded state: q (queued: see the live keys for
                        more), ok (delivered), dead:<class>, drop, skip:events (the
                        sink's `events` filter does not take its type)
  n:<sink>              how many attempts were recorded
  a:<sink>:<n>          attempt n: JSON {n, t (start, Redis ms), ms, st, k, err, x, src,
                        stale}; only the last MAX_ATTEMPTS are kept
  sz                    the record's bytes as Redis counts them (MEMORY USAGE), plus
                        its index entry's
The index (a sorted set of "tenant:event_id" by first arrival) orders them; the bytes
key sums `sz`. Records go oldest first, past the retention or over the byte cap.
]]

local LOG_MAX_ATTEMPTS = 50

-- Bring `sz` and the bytes total up to date after a write to `rec`.
local function log_account(rec, member, bytes)
  local old = tonumber(redis.call('HGET', rec, 'sz')) or 0
  local size = (redis.call('MEMORY', 'USAGE', rec, 'SAMPLES', 0) or 0) + #member + 48
  redis.call('HSET', rec, 'sz', size)
  redis.call('INCRBY', bytes, size - old)
end

-- A record for an event taken in for the first time (`fields`: name/value pairs).
local function log_new(rec, index, bytes, member, now, fields)
  redis.call('HSET', rec, unpack(fields))
  redis.call('ZADD', index, now, member)
  log_account(rec, member, bytes)
end

-- One more arrival by `src` of a recorded event.
local function log_arrival(rec, src, now)
  local f = 'via:' .. src
  local cur = redis.call('HGET', rec, f)
  local first, n = now, 0
  if cur then
    local a, b = string.match(cur, '^(%d+) (%d+)$')
    first, n = a or now, tonumber(b) or 0
  end
  redis.call('HSET', rec, f, first .. ' ' .. (n + 1))
end

-- One attempt of the delivery to `sink`: `attempt` is its JSON object from the worker
-- (with "ms", its duration); `stale`: the run no longer held the delivery.
local function log_attempt(rec, sink, now, attempt, stale)
  local n = redis.call('HINCRBY', rec, 'n:' .. sink, 1)
  local ms = tonumber(string.match(attempt, '"ms":(%d+)')) or 0
  local head = '{"n":' .. n .. ',"t":' .. (now - ms) .. (stale and ',"stale":true' or '')
  local rest = string.sub(attempt, 2)
  if rest ~= '}' then head = head .. ',' end
  redis.call('HSET', rec, 'a:' .. sink .. ':' .. n, head .. rest)
  if n > LOG_MAX_ATTEMPTS then
    redis.call('HDEL', rec, 'a:' .. sink .. ':' .. (n - LOG_MAX_ATTEMPTS))
  end
end

-- Record how a delivery's run went, if the event has a record: its attempt (if any)
-- and its new state ('' to leave it).
local function log_finish(rec, member, bytes, sink, now, attempt, state, stale)
  if redis.call('EXISTS', rec) == 0 then return end
  if attempt ~= '' then log_attempt(rec, sink, now, attempt, stale) end
  if state ~= '' then redis.call('HSET', rec, 's:' .. sink, state) end
  log_account(rec, member, bytes)
end

-- Remove the oldest records while the oldest is older than `oldest_ms` or the total is
-- over `cap` bytes, at most `max_n`; how many went.
local function log_trim(index, bytes, rec_prefix, cap, oldest_ms, max_n)
  local n = 0
  while n < max_n do
    local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    if #head == 0 then
      redis.call('DEL', bytes)
      break
    end
    local total = tonumber(redis.call('GET', bytes)) or 0
    if total <= cap and tonumber(head[2]) >= oldest_ms then break end
    local rec = rec_prefix .. head[1]
    local size = tonumber(redis.call('HGET', rec, 'sz')) or 0
    redis.call('DEL', rec)
    redis.call('ZREM', index, head[1])
    redis.call('DECRBY', bytes, size)
    n = n + 1
  end
  return n
end

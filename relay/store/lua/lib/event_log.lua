--[[ event_log: the event log (relay/store/eventlog.py). An event is in the log while its
member ("tenant:event_id") is in the index, a sorted set by first arrival (Redis ms).
Taking an event in costs only that member: while a delivery needs it, the stored
event (relay/store/stored_event.py) already holds its type, source, time and payload.
The record, a hash ``{prefix}:log:{tenant}:{event_id}``, is written as things happen:
  via:<source>          "<first ms> <count>": arrivals after the first (the first is
                        the stored event's source, at the index's time)
  s:<sink>              how the delivery ended: ok (delivered), dead:<class>, drop;
                        filter: the sink's filter kept the event out (at ingest)
                        (none: still under way, or the sink's events globs do not
                        take its type)
  n:<sink>              how many attempts were recorded
  a:<sink>:<n>          attempt n: JSON {n, t (start, Redis ms), ms, st, k, err, x, src,
                        stale}; only the last LOG_MAX_ATTEMPTS are kept
  eb                    the bytes of the record's copy of the stored event
  sz                    the record's bytes as Redis counts them (MEMORY USAGE), plus
                        its copy's and its index entry's
The copy, ``{prefix}:logev:{tenant}:{event_id}``, is the stored event itself, kept when
its last delivery lets it go: renamed, not rewritten, so that keeping it costs the AOF
a RENAME rather than the event's bytes (or written at once, for an event no sink
takes). A record written by an earlier build may hold its copy in an ``ev`` field.
The bytes key sums `sz`. Records go oldest first, past the retention or over the byte
cap. ``L``, a log handle: {rec, index, member, bytes, copy} (copy: nil in a script that
neither keeps nor reads one). A handle that `log_stage` made
holds its record's fields back and writes them in one HSET, accounted once, at
`log_flush` (a finish records its attempt, its end and the event kept, in one write).
]]

local LOG_MAX_ATTEMPTS = 50
local LOG_SHORT = 0.9  -- of maxmemory: past it the log keeps no copies and gives way

-- Whether Redis is short of memory (past LOG_SHORT of its maxmemory): the log must not
-- take what queued events need. INFO costs a few µs: once per call of a script.
local function log_short()
  local info = redis.call('INFO', 'memory')
  local limit = tonumber(string.match(info, '\nmaxmemory:(%d+)')) or 0
  local used = tonumber(string.match(info, 'used_memory:(%d+)')) or 0
  return limit > 0 and used > LOG_SHORT * limit
end

local function log_of(rec, index, member, bytes, copy)
  return {rec = rec, index = index, member = member, bytes = bytes, copy = copy}
end

-- Whether the event is in the log (taken in with the log on, and not trimmed since);
-- a staged handle reads it once (nothing in one finish takes it in or trims it).
local function log_in(L)
  if L.staged and L.is_in ~= nil then return L.is_in end
  local is_in = redis.call('ZSCORE', L.index, L.member) ~= false
  if L.staged then L.is_in = is_in end
  return is_in
end

-- From now on the handle's field writes wait for `log_flush`.
local function log_stage(L)
  L.staged = {}
end

-- Write `field`, `value` to the record now, or hold them back (a staged handle).
local function log_set(L, field, value)
  local held = L.staged
  if held then
    held[#held + 1] = field
    held[#held + 1] = value
  else
    redis.call('HSET', L.rec, field, value)
  end
end

-- Bring `sz` and the bytes total up to date after a write to the record; or make that
-- write here, `fields` (name, value, ...), with `sz` in it, so that what the record
-- takes counts its own `sz` field (a new record has none yet).
local function log_account(L, fields)
  local had = redis.call('HMGET', L.rec, 'sz', 'eb')
  local old, copy = tonumber(had[1]) or 0, L.eb or tonumber(had[2]) or 0
  if fields then
    fields[#fields + 1] = 'sz'
    fields[#fields + 1] = old
    redis.call('HSET', L.rec, unpack(fields))
  end
  local size = (redis.call('MEMORY', 'USAGE', L.rec, 'SAMPLES', 0) or 0) + copy + #L.member + 48
  redis.call('HSET', L.rec, 'sz', size)
  redis.call('INCRBY', L.bytes, size - old)
end

-- One more arrival by `src` of an event in the log (the caller accounts).
local function log_arrival(L, src, now)
  local f = 'via:' .. src
  local cur = redis.call('HGET', L.rec, f)
  local first, n = now, 0
  if cur then
    local a, b = string.match(cur, '^(%d+) (%d+)$')
    first, n = a or now, tonumber(b) or 0
  end
  redis.call('HSET', L.rec, f, first .. ' ' .. (n + 1))
end

-- How a delivery's run went, if the event is in the log: its attempt (`attempt`: the
-- worker's JSON, with "ms", its duration; '' for none) and how it ended ('' if not).
-- `stale`: the run no longer held the delivery.
local function log_finish(L, sink, now, attempt, state, stale)
  if not log_in(L) then return end
  if attempt ~= '' then
    local n = redis.call('HINCRBY', L.rec, 'n:' .. sink, 1)
    local ms = tonumber(string.match(attempt, '"ms":(%d+)')) or 0
    local head = '{"n":' .. n .. ',"t":' .. (now - ms) .. (stale and ',"stale":true' or '')
    local rest = string.sub(attempt, 2)
    if rest ~= '}' then head = head .. ',' end
    log_set(L, 'a:' .. sink .. ':' .. n, head .. rest)
    if n > LOG_MAX_ATTEMPTS then
      redis.call('HDEL', L.rec, 'a:' .. sink .. ':' .. (n - LOG_MAX_ATTEMPTS))
    end
  end
  if state ~= '' then log_set(L, 's:' .. sink, state) end
  if not L.staged then log_account(L) end
end

-- The record's copy (L.copy) is written: its size goes in the record.
local function log_copied(L)
  L.eb = redis.call('MEMORY', 'USAGE', L.copy, 'SAMPLES', 0) or 0
  log_set(L, 'eb', L.eb)
  if not L.staged then log_account(L) end
end

-- An event no delivery holds is taken in: the record keeps `stored` at once.
local function log_keep(L, stored)
  if stored and log_in(L) then
    redis.call('SET', L.copy, stored)
    log_copied(L)
  end
end

-- The stored event at `key` is let go by its last delivery: the record keeps it, by
-- renaming it to its copy (no expiry: the record's retention decides). Whether it was
-- kept (if not, the caller deletes it).
local function log_keep_key(L, key)
  if not log_in(L) then return false end
  redis.call('RENAME', key, L.copy)
  redis.call('PERSIST', L.copy)
  log_copied(L)
  return true
end

-- Write what a staged handle held back, in one HSET, and account for it once; the
-- handle writes at once again after.
local function log_flush(L)
  local held = L.staged
  if not held then return end
  L.staged, L.is_in = nil, nil
  if #held > 0 then log_account(L, held) end
end

-- Remove the oldest records (with their copies) while the oldest is older than
-- `oldest_ms` or the total is over `cap` bytes, at most `max_n`; how many went.
local function log_trim(index, bytes, rec_prefix, copy_prefix, cap, oldest_ms, max_n)
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
    redis.call('DEL', rec, copy_prefix .. head[1])
    redis.call('ZREM', index, head[1])
    if size > 0 then redis.call('DECRBY', bytes, size) end
    n = n + 1
  end
  return n
end

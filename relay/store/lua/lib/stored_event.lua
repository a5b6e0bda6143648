--[[ stored_event: reading and releasing the stored event (relay/store/stored_event.py).
The rest of a stored event is parsed by the caller.
uses: event_log
]]

-- The ingest time, Unix ms (the header's fixed-width second field).
local function event_at(stored)
  return tonumber(string.sub(stored, 6, 18))
end

-- One user (a job or a dead letter) lets go; the last one deletes the event, or hands
-- it to the event log's record (``L``, lib/event_log.lua; nil: none) as its copy.
local function event_release(key, L)
  local n = tonumber(redis.call('GETRANGE', key, 0, 3))
  if not n then return end
  if n <= 1 then
    if not (L and log_keep_key(L, key)) then redis.call('DEL', key) end
  else
    redis.call('SETRANGE', key, 0, string.format('%04d', n - 1))
  end
end

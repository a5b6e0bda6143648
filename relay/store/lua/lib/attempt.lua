--[[ attempt: what starting a delivery's attempt records in its record (``att``): the
attempt's number ``a``, when it started (and the first's), and the end of the waits
that set it aside or promised it a turn (lib/wait.lua, lib/rate.lua). A claim that
starts it (lib/claim.lua) and a finish that hands a slot to a reserve started ahead
(lib/finish.lua) record the same.
]]

-- `had`: the record's 'first', 'ps' and 'rt' as the caller read them (false: unset),
-- so that only what is there is removed, and 'first' is written in the same HSET.
local function attempt_counted(att, a, now, had)
  if had[1] then
    redis.call('HSET', att, 'a', a, 'last', now)
  else
    redis.call('HSET', att, 'a', a, 'last', now, 'first', now)
  end
  if had[2] or had[3] then redis.call('HDEL', att, 'ps', 'rt') end
end

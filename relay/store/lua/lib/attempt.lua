--[[ attempt: what starting a delivery's attempt records in its record (``att``): the
attempt's number ``a``, when it started (and the first's), and the end of the waits
that set it aside or promised it a turn (lib/wait.lua, lib/rate.lua). A claim that
starts it (lib/claim.lua) and a finish that hands a slot to a reserve started ahead
(lib/finish.lua) record the same.
]]

-- From what the caller read of the record: `first`, its 'first' (false: unset), written
-- in the same HSET when unset; `waited`, whether it holds 'ps' or 'rt', removed only then.
local function attempt_counted(att, a, now, first, waited)
  if first then
    redis.call('HSET', att, 'a', a, 'last', now)
  else
    redis.call('HSET', att, 'a', a, 'last', now, 'first', now)
  end
  if waited then redis.call('HDEL', att, 'ps', 'rt') end
end

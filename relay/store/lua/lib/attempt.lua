--[[ attempt: what starting a delivery's attempt records in its record (``att``): the
attempt's number ``a``, when it started (and the first's), and the end of the waits
that set it aside or promised it a turn (lib/wait.lua, lib/rate.lua). A claim that
starts it (lib/claim.lua) and a finish that hands a slot to a reserve started ahead
(lib/finish.lua) record the same.
]]

local function attempt_counted(att, a, now)
  redis.call('HSET', att, 'a', a, 'last', now)
  redis.call('HDEL', att, 'ps', 'rt')
  redis.call('HSETNX', att, 'first', now)
end

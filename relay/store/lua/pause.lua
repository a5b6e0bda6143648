--[[ pause: an operator pauses a sink (relay/store/sinks.py). From now on nothing is sent
to it: every claim of its deliveries sets them aside in its waiting set (lib/claim.lua)
and no slot of its is filled (lib/wait.lua) until it is resumed (resume.lua). Attempts
in flight now finish as they would. The mark holds the time of the pause and has no
expiry: it outlives a restart of the relay (and of Redis, with its persistence).
KEYS
  1 paused             the sink's pause mark
uses: clock
flags: allow-oom
Returns {1, since_ms} if the sink is paused now, {0, since_ms} if it already was.
]]
local now = redis_now_ms()
if redis.call('SET', K.paused, now, 'NX') then return {1, now} end
return {0, tonumber(redis.call('GET', K.paused)) or now}

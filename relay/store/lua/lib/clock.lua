--[[ clock: the one clock that every process's scripts share — Redis' own (TIME) — so
that a worker or receiver whose clock is off neither misses due jobs nor takes over
leases that are still held.
]]

-- Redis' time, Unix ms.
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

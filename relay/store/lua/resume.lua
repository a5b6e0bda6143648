--[[ resume: an operator resumes a paused sink (relay/store/sinks.py). The pause mark
goes, and the workers are woken: the next sweep (sweep.lua) fills the sink's free slots
from its waiting set, in queue order. The deliveries set aside on the pause have their
deadlines moved back by their wait when they leave the set (lib/wait.lua); those set
aside on the sink's breaker before or during the pause get the pause's share of their
wait here (a breaker's wait does not move a deadline, a pause does).
KEYS
  1 paused             the sink's pause mark
  2 wait               the sink's waiting set
ARGV
  1 att_base           the sink's delivery records' key, less the event id
  2 job_base           the sink's job ids, less the event id
  3 wake               the channel that tells workers work is due
uses: clock
flags: allow-oom
Returns {1, since_ms, now_ms} if the sink was paused (since_ms) and is not any more,
{0} if it was not paused.
]]
local raw = redis.call('GET', K.paused)
if not raw then return {0} end
redis.call('DEL', K.paused)
local now = redis_now_ms()
local since = tonumber(raw) or now
for _, id in ipairs(redis.call('ZRANGE', K.wait, 0, -1)) do
  local att = A.att_base .. string.sub(id, #A.job_base + 1)
  local st = redis.call('HMGET', att, 'pk', 'pr')
  if st[2] == 'breaker_open' or st[2] == 'half_open' then
    local from = math.max(tonumber(st[1]) or now, since)
    if now > from then
      redis.call('HINCRBY', att, 'dl', now - from)
      redis.call('HINCRBY', att, 'held', now - from)
    end
  end
end
redis.call('PUBLISH', A.wake, '')
return {1, since, now}

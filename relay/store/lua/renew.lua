--[[ renew: a live worker's hold on the deliveries it is running, renewed
(relay/delivery/heartbeat.py). For each running job: arq's in-progress mark, and —
during its HTTP attempt — the sink's in-flight lease and, if the job is the sink's
breaker probe, the probe's lease. Only what still exists is renewed (XX): a delivery
that has finished meanwhile is never held again.
KEYS none
ARGV
  1 now            Unix ms
  2 hold_ms        how long each hold lasts from now
  3... jobs        per job: job_id, in-progress key, in-flight key ('' between
                   attempts), breaker key
Returns how many in-progress marks were renewed.
]]
local now, hold = tonumber(A.now), tonumber(A.hold_ms)
local until_ms = now + hold
local renewed = 0
for i = 3, #ARGV, 4 do
  local job_id, in_progress, inflight, breaker = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('SET', in_progress, '1', 'XX', 'PX', hold) then renewed = renewed + 1 end
  if inflight ~= '' then
    redis.call('ZADD', inflight, 'XX', until_ms, job_id)
    if redis.call('HGET', breaker, 'p') == job_id then
      redis.call('HSET', breaker, 'pu', until_ms)
    end
  end
end
return renewed

--[[ renew: a live worker's hold on the deliveries it is running, renewed
(relay/delivery/heartbeat.py). For each running job whose in-progress mark still holds
the run's fencing token: the mark, and — during its HTTP attempt — the sink's in-flight
lease and, if the job is the sink's breaker probe, the probe's lease. A mark that holds
another run's token, or none, is not this run's any more (the worker stalled past its
hold, and another worker may have taken the delivery over — or, for a missing mark, the
run has just finished): nothing of it is renewed, and its job id comes back.
Times are Redis' clock.
KEYS none
ARGV
  1 hold_ms        how long each hold lasts from now
  2... jobs        per job: job_id, token, in-progress key, in-flight key ('' between
                   attempts), breaker key
uses: clock
flags: allow-oom
Returns {renewed, {job id whose mark holds another token, ...}, {job id without a mark,
...}, now_ms}.
]]
local now, hold = redis_now_ms(), tonumber(A.hold_ms)
local until_ms = now + hold
local renewed, taken, absent = 0, {}, {}
for i = 2, #ARGV, 5 do
  local job_id, token, in_progress, inflight, breaker =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local mark = redis.call('GET', in_progress)
  if mark == token then
    redis.call('PEXPIRE', in_progress, hold)
    renewed = renewed + 1
    if inflight ~= '' then
      redis.call('ZADD', inflight, 'XX', until_ms, job_id)
      if redis.call('HGET', breaker, 'p') == job_id then
        redis.call('HSET', breaker, 'pu', until_ms)
      end
    end
  elseif mark then
    taken[#taken + 1] = job_id
  else
    absent[#absent + 1] = job_id
  end
end
return {renewed, taken, absent, now}

--[[ release: a cancelled attempt gives back its in-flight slot and, if it was the
breaker's probe, its turn (relay/delivery/steps.py) — only while the run still holds
the delivery (its in-progress mark holds the run's fencing token).
KEYS
  1 inflight    the sink's in-flight leases
  2 breaker     the sink's breaker
  3 in_progress arq's in-progress mark for the job (another worker may take it at once)
ARGV
  1 job_id
  2 token       the run's fencing token
uses: breaker
flags: allow-oom
Returns 1 if released, 0 if this run no longer holds the delivery.
]]
if redis.call('GET', K.in_progress) ~= A.token then return 0 end
redis.call('ZREM', K.inflight, A.job_id)
breaker_release(K.breaker, A.job_id)
redis.call('DEL', K.in_progress)
return 1

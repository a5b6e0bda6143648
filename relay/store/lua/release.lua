--[[ release: a cancelled attempt gives back its in-flight slot and, if it was the
breaker's probe, its turn (relay/delivery/scripts.py).
KEYS
  1 inflight    the sink's in-flight leases
  2 breaker     the sink's breaker
  3 in_progress arq's in-progress mark for the job (another worker may take it at once)
ARGV
  1 job_id
uses: breaker
]]
redis.call('ZREM', K.inflight, A.job_id)
breaker_release(K.breaker, A.job_id)
redis.call('DEL', K.in_progress)
return 1

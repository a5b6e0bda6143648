--[[ finish: record how a delivery attempt went, in one step (relay/delivery/scripts.py).
The in-flight slot is given back and the breaker told. `retry` schedules the next
attempt; `ok`, `dead` and `drop` end the delivery: the job and its record go, and
`dead` stores a dead letter, which takes over the job's hold on the stored event.
KEYS
  1 ev          the stored event
  2 attempts    the delivery's record
  3 breaker     the sink's breaker
  4 inflight    the sink's in-flight leases
  5 gone        the sink's gone mark
  6 job         arq's job key
  7 queue       arq's queue
  8 retry       arq's retry counter for the job
  9 entry       the dead letter (hash)
  10 index      the tenant's dead letters by time
  11 counts     the tenant's dead letters by class
ARGV
  1 now            Unix ms
  2 job_id
  3 outcome        ok | retry | dead | drop
  4 due_ms         retry: when the next attempt is due
  5 status         the last HTTP status ('' for none)
  6 error          the last error
  7 effect         on the breaker: success | failure | none
  8 threshold      failures that open the breaker
  9 cooldown_ms    how long it stays open
  10 breaker_ttl_ms
  11 gone_url      the URL to mark gone ('' for none)
  12 class         the dead letter's class
  13 member        the dead letter's member in the index
  14... fields     the dead letter's fields, name/value pairs
uses: stored_event breaker deadletter_add
Returns the outcome.
]]
local now, job_id, outcome = tonumber(A.now), A.job_id, A.outcome
redis.call('ZREM', K.inflight, job_id)
breaker_record(K.breaker, now, job_id, A.effect, tonumber(A.threshold), tonumber(A.cooldown_ms),
  tonumber(A.breaker_ttl_ms))
if outcome == 'retry' then
  redis.call('HSET', K.attempts, 'due', A.due_ms, 'st', A.status, 'err', A.error)
  redis.call('ZADD', K.queue, A.due_ms, job_id)
  return outcome
end
redis.call('DEL', K.job, K.retry, K.attempts)
redis.call('ZREM', K.queue, job_id)
if outcome == 'dead' then
  -- An earlier dead letter of this (event, sink) is replaced: its hold on the stored
  -- event passes to the new one, and this job's is let go.
  if redis.call('EXISTS', K.entry) == 1 then event_release(K.ev) end
  deadletter_add(K.entry, K.index, K.counts, A.member, now, A.class, 14)
  redis.call('PERSIST', K.ev)
  if A.gone_url ~= '' then redis.call('SET', K.gone, A.gone_url) end
elseif outcome == 'ok' then
  event_release(K.ev)
end
return outcome

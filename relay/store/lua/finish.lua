--[[ finish: record how a delivery attempt went, in one step (relay/delivery/scripts.py).
The in-flight slot is given back and the breaker told. `retry` schedules the next
attempt; `ok`, `dead` and `drop` end the delivery: the job and its record go, and
`dead` stores a dead letter, which takes over the job's hold on the stored event. For
an ordered sink the chat's next event is then queued — unless the dead letter holds the
chat (`on_dead = hold`).
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
  12 chat       the chat's list of events (an ordered delivery), or ''
  13 held       the sink's held chats (sorted set)
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
  14 event_id
  15 chat          the chat id ('' when unordered)
  16 on_dead       skip | hold: what a dead letter does to its chat
  17... fields     the dead letter's fields, name/value pairs
uses: stored_event breaker deadletter_add chat_order
Returns the job id of the chat's next event, now queued ('' if none or unordered).
]]
local now, job_id, outcome = tonumber(A.now), A.job_id, A.outcome
local ordered = K.chat ~= ''
local job_base = string.sub(job_id, 1, #job_id - #A.event_id)
redis.call('ZREM', K.inflight, job_id)
breaker_record(K.breaker, now, job_id, A.effect, tonumber(A.threshold), tonumber(A.cooldown_ms),
  tonumber(A.breaker_ttl_ms))
if outcome == 'retry' then
  redis.call('HSET', K.attempts, 'due', A.due_ms, 'st', A.status, 'err', A.error)
  redis.call('ZADD', K.queue, A.due_ms, job_id)
  return ''
end
redis.call('DEL', K.job, K.retry, K.attempts)
redis.call('ZREM', K.queue, job_id)
if outcome == 'dead' then
  -- An earlier dead letter of this (event, sink) is replaced: its hold on the stored
  -- event passes to the new one, and this job's is let go.
  if redis.call('EXISTS', K.entry) == 1 then event_release(K.ev) end
  deadletter_add(K.entry, K.index, K.counts, A.member, now, A.class, 17)
  redis.call('PERSIST', K.ev)
  if A.gone_url ~= '' then redis.call('SET', K.gone, A.gone_url) end
  if ordered and A.on_dead == 'hold' then
    redis.call('HSET', K.entry, 'holds', '1')
    chat_hold(K.chat, K.held, A.chat, now, job_base, string.sub(K.ev, 1, #K.ev - #A.event_id))
    return ''
  end
elseif outcome == 'ok' then
  event_release(K.ev)
end
if ordered then return chat_release(K.chat, A.event_id, job_base, K.queue, now) end
return ''

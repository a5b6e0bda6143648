--[[ replay: put one dead letter back through the queue (relay/store/deadletters.py):
the same deterministic job id, a fresh attempt count and deadline. The entry leaves the
store in the same step, so it goes only once its job is queued. If a job for this
(event, sink) is already queued, it carries the delivery and the entry's hold on the
stored event is let go.
KEYS
  1 entry       the dead letter
  2 index       the tenant's dead letters by time
  3 counts      the tenant's dead letters by class
  4 ev          the stored event
  5 job         arq's job key
  6 queue       arq's queue
  7 attempts    the delivery's record
  8 retry       arq's retry counter for the job
  9 in_progress arq's in-progress mark for the job
  10 gone       the sink's gone mark (cleared: a replay asks to try the sink again)
  11 chat       the chat's list of events, if the delivery was ordered ('' if not)
  12 held       the sink's held chats
  13 breaker    the sink's breaker (an open one lets a probe through now: a replay asks
                to try the sink again)
  14 log        the event's record in the event log (one more arrival, "replay", and
                the sink's delivery under way again), if the event is in the log
  15 log_bytes  the event log's size
  16 log_index  the event log's index
ARGV
  1 member          the entry's member in the index
  2 job             the arq job record (JSON)
  3 job_ttl_ms
  4 max_age_ms      the replayed delivery's deadline is this long from now
  5 attempts_ttl_ms
  6 job_id
  7 event_id
  8 chat            the chat id ('' if the delivery was not ordered)
  9 ordered         '1' if the sink delivers in order now, else '0'
  10 sink           the sink's name
  11 log_member     the record's member in the event log's index ("tenant:event_id")
An ordered delivery that held its chat (the chat's head) runs first; one that did not
joins the end of its chat, queued only if the chat has nothing else waiting. If the sink
no longer delivers in order, a held chat is let go.
Times are Redis' clock.
uses: clock stored_event chat_order event_log
Returns 'ok' | 'missing' (replayed or purged meanwhile) | 'busy' (its last delivery is
still finishing) | 'no_payload' (the event is no longer stored).
]]
local now = redis_now_ms()
local cls = redis.call('HGET', K.entry, 'class')
if not cls then return 'missing' end
if redis.call('EXISTS', K.in_progress) == 1 then return 'busy' end
if redis.call('EXISTS', K.ev) == 0 then return 'no_payload' end
if redis.call('EXISTS', K.job) == 0 then
  redis.call('SET', K.job, A.job, 'PX', A.job_ttl_ms)
  redis.call('DEL', K.retry, K.attempts)
  redis.call('HSET', K.attempts, 'dl', now + tonumber(A.max_age_ms), 'src', 'replay')
  redis.call('PEXPIRE', K.attempts, A.attempts_ttl_ms)
  local queue_it = true
  if K.chat ~= '' then
    local job_base = string.sub(A.job_id, 1, #A.job_id - #A.event_id)
    if redis.call('LINDEX', K.chat, 0) == A.event_id then
      redis.call('ZREM', K.held, A.chat)  -- it held its chat: first in line again
      if A.ordered ~= '1' then chat_release(K.chat, A.event_id, job_base, K.queue, now) end
    elseif A.ordered == '1' then
      queue_it = redis.call('RPUSH', K.chat, A.event_id) == 1
      redis.call('PEXPIRE', K.chat, A.job_ttl_ms)
    end
  end
  if queue_it then redis.call('ZADD', K.queue, now, A.job_id) end
else
  event_release(K.ev)
end
redis.call('DEL', K.gone)
local L = log_of(K.log, K.log_index, A.log_member, K.log_bytes)
if log_in(L) then
  log_arrival(L, 'replay', now)
  redis.call('HDEL', K.log, 's:' .. A.sink)  -- under way again
  log_account(L)
end
if redis.call('HGET', K.breaker, 's') == 'o' then redis.call('HSET', K.breaker, 'u', now) end
redis.call('HINCRBY', K.counts, cls, -1)
redis.call('DEL', K.entry)
redis.call('ZREM', K.index, A.member)
return 'ok'

--[[ resend: deliver a recorded event to one of its sinks again (relay/store/eventlog.py),
whether or not it was delivered: a fresh delivery — the same deterministic job id (so
the same webhook-id), fresh attempts and deadline, source "resend" (X-Relay-Source) —
from the stored event if another delivery still holds it, else from the record's copy.
A delivery of this (event, sink) still under way, or kept as a dead letter, is left as
it is (the caller says so: a dead letter is replayed, not resent). Like a replay, a
resend asks to try the sink again: its gone mark goes, and an open breaker lets a probe
through now.
KEYS
  1 log          the event's record
  2 log_bytes    the event log's size
  3 ev           the stored event
  4 job          arq's job key
  5 queue        arq's queue
  6 attempts     the delivery's record
  7 retry        arq's retry counter for the job
  8 in_progress  arq's in-progress mark for the job
  9 entry        the delivery's dead letter
  10 gone        the sink's gone mark
  11 breaker     the sink's breaker
  12 chat        the chat's list of events, for an ordered sink ('' if not)
  13 log_index   the event log's index
  14 log_copy    the record's copy of the stored event
ARGV
  1 job          the arq job record (JSON)
  2 job_ttl_ms
  3 max_age_ms   the deadline is this long from now
  4 job_id
  5 event_id
  6 sink
  7 log_member   the record's member in the index ("tenant:event_id")
  8 wake         the channel that tells workers work is due
An ordered delivery joins the end of its chat, queued only if the chat has nothing else
waiting. Times are Redis' clock.
uses: clock event_log
Returns 'ok' | 'missing' (no record) | 'pending' (a delivery is under way) |
'dead_letter' | 'no_payload' (the record has no copy of the event).
]]
local now = redis_now_ms()
local L = log_of(K.log, K.log_index, A.log_member, K.log_bytes, K.log_copy)
if not log_in(L) then return 'missing' end
if redis.call('EXISTS', K.entry) == 1 then return 'dead_letter' end
if redis.call('EXISTS', K.job) == 1 or redis.call('EXISTS', K.in_progress) == 1 then
  return 'pending'
end
local ttl = tonumber(A.job_ttl_ms)
local users = tonumber(redis.pcall('GETRANGE', K.ev, 0, 3))
if users then
  -- still stored for another delivery: one more user
  redis.call('SETRANGE', K.ev, 0, string.format('%04d', users + 1))
  local left = redis.call('PTTL', K.ev)
  if left >= 0 and left < ttl then redis.call('PEXPIRE', K.ev, ttl) end
else
  -- kept when it was let go: in the record's copy, or in an `ev` field by an earlier
  -- build, which moves to the copy first (the stored event expires; the copy stays
  -- with the record)
  local stored = redis.call('GET', K.log_copy)
  if not stored then
    stored = redis.call('HGET', K.log, 'ev')
    if not stored then return 'no_payload' end
    redis.call('SET', K.log_copy, stored)
    redis.call('HDEL', K.log, 'ev')
    log_copied(L)
  end
  redis.call('SET', K.ev, stored, 'PX', ttl)
  redis.call('SETRANGE', K.ev, 0, string.format('%04d %013d', 1, now))
end
redis.call('SET', K.job, A.job, 'PX', ttl)
redis.call('DEL', K.retry, K.attempts)
redis.call('HSET', K.attempts, 'dl', now + tonumber(A.max_age_ms), 'src', 'resend')
redis.call('PEXPIRE', K.attempts, ttl)
local queue_it = true
if K.chat ~= '' then
  queue_it = redis.call('RPUSH', K.chat, A.event_id) == 1
  redis.call('PEXPIRE', K.chat, ttl)
end
if queue_it then redis.call('ZADD', K.queue, now, A.job_id) end
redis.call('DEL', K.gone)
if redis.call('HGET', K.breaker, 's') == 'o' then redis.call('HSET', K.breaker, 'u', now) end
log_arrival(L, 'resend', now)
redis.call('HDEL', K.log, 's:' .. A.sink)  -- under way again
log_account(L)
redis.call('PUBLISH', A.wake, '')
return 'ok'

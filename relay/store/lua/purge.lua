--[[ purge: delete one dead letter, and the stored event once nothing else holds it
(relay/store/deadletters.py).
KEYS
  1 entry       the dead letter
  2 index       the tenant's dead letters by time
  3 counts      the tenant's dead letters by class
  4 ev          the stored event
  5 chat        the chat's list of events, if the delivery was ordered ('' if not)
  6 held        the sink's held chats
  7 queue       arq's queue
ARGV
  1 member      the entry's member in the index
  2 event_id
  3 chat        the chat id ('' if not ordered)
  4 job_base    the job id without the event id ("prefix:tenant:sink:")
A dead letter that held its chat lets it go: the chat's next event is queued (due now,
by Redis' clock). It runs at maxmemory too: a purge frees memory.
uses: clock stored_event chat_order
flags: allow-oom
Returns 1 if it was deleted, 0 if it was gone already.
]]
local cls = redis.call('HGET', K.entry, 'class')
if not cls then return 0 end
redis.call('HINCRBY', K.counts, cls, -1)
redis.call('DEL', K.entry)
redis.call('ZREM', K.index, A.member)
event_release(K.ev)
if K.chat ~= '' and redis.call('LINDEX', K.chat, 0) == A.event_id then
  redis.call('ZREM', K.held, A.chat)
  chat_release(K.chat, A.event_id, A.job_base, K.queue, redis_now_ms())
end
return 1

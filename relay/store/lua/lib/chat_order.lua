--[[ chat_order: one chat's events for an ordered sink (sink.ordering = "chat").
The chat's list holds its event ids in ingest order (relay/keys.py chat_order). Only the
head's arq job is in the queue; the others' jobs exist but wait outside it ("parked")
until the head is done: delivered, dropped, or dead-lettered under on_dead_letter =
"skip". A dead letter under "hold" keeps the chat: its list, the parked jobs and their
stored events lose their expiry, and the chat is listed in the sink's held set until
the dead letter is replayed or purged.
uses: keys
]]

-- The head ``event_id`` is done with: the chat's next event (skipping any whose job
-- has expired) goes into the queue, due ``now``; its job id is returned ('' if none).
-- ``job_base`` is the job id without the event id ("prefix:tenant:sink:").
local function chat_release(chat_key, event_id, job_base, queue, now)
  if redis.call('LINDEX', chat_key, 0) == event_id then
    redis.call('LPOP', chat_key)
  end
  while true do
    local nxt = redis.call('LINDEX', chat_key, 0)
    if not nxt then return '' end
    if redis.call('EXISTS', JOB_KEY_PREFIX .. job_base .. nxt) == 1 then
      redis.call('ZADD', queue, now, job_base .. nxt)
      return job_base .. nxt
    end
    redis.call('LPOP', chat_key)  -- its job expired: nothing left to deliver
  end
end

-- A dead letter at the head keeps the chat: nothing waiting in it may expire meanwhile.
-- ``event_base`` is the stored events' key prefix ("prefix:ev:tenant:").
local function chat_hold(chat_key, held_key, chat, now, job_base, event_base)
  redis.call('PERSIST', chat_key)
  local waiting = redis.call('LRANGE', chat_key, 1, -1)
  for _, id in ipairs(waiting) do
    redis.call('PERSIST', JOB_KEY_PREFIX .. job_base .. id)
    redis.call('PERSIST', event_base .. id)
  end
  redis.call('ZADD', held_key, 'NX', now, chat)
end

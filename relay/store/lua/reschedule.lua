--[[ reschedule: after a fault of the relay's own, the job runs again later
(relay/delivery/scripts.py) — unless it is finished: its job key is gone because the
finish script ran but its reply was lost. XX: never re-create a queue entry.
KEYS
  1 job         arq's job key
  2 queue       arq's queue
  3 in_progress arq's in-progress mark for the job (let go: the job may be taken again)
ARGV
  1 due_ms
  2 job_id
Returns 1 if rescheduled, 0 if the job is finished.
]]
redis.call('DEL', K.in_progress)
if redis.call('EXISTS', K.job) == 0 then return 0 end
redis.call('ZADD', K.queue, 'XX', A.due_ms, A.job_id)
return 1

--[[ reschedule: after a fault of the relay's own, the job runs again later
(relay/delivery/steps.py) — unless this run no longer holds it (its in-progress mark
holds another token, or none: a stale run changes nothing) or it is finished (its job
key is gone because the finish script ran but its reply was lost). XX: never re-create
a queue entry.
KEYS
  1 job         arq's job key
  2 queue       arq's queue
  3 in_progress arq's in-progress mark for the job (let go: the job may be taken again)
ARGV
  1 delay_ms    the job is due this long from now (Redis' clock)
  2 job_id
  3 token       the run's fencing token
uses: clock
flags: allow-oom
Returns 1 if rescheduled, 0 if the job is finished, -1 if this run no longer holds it.
]]
if redis.call('GET', K.in_progress) ~= A.token then return -1 end
redis.call('DEL', K.in_progress)
if redis.call('EXISTS', K.job) == 0 then return 0 end
redis.call('ZADD', K.queue, 'XX', redis_now_ms() + tonumber(A.delay_ms), A.job_id)
return 1

--[[ start_jobs: claim up to `max` due jobs of one poll the way arq's start_jobs does
one by one — due, not in progress on any worker → mark in progress — in one atomic
call (relay/delivery/arq_worker.py). A due job whose job key has expired is taken out
of the queue and reported, not run.
KEYS
  1 queue           arq's queue
ARGV
  1 now             Unix ms
  2 in_progress_ms  how long the in-progress mark holds
  3 max             how many jobs this worker can start
  4 in_progress_prefix
  5 job_prefix
  6... ids          the job ids the poll read
Returns {{id, score, id, score, ...}, {expired id, ...}}.
]]
local now, left = tonumber(A.now), tonumber(A.max)
local out, expired = {}, {}
for i = 6, #ARGV do
  if left <= 0 then break end
  local id = ARGV[i]
  local score = redis.call('ZSCORE', K.queue, id)
  if score and tonumber(score) <= now and
      redis.call('EXISTS', A.in_progress_prefix .. id) == 0 then
    if redis.call('EXISTS', A.job_prefix .. id) == 0 then
      redis.call('ZREM', K.queue, id)
      expired[#expired + 1] = id
    else
      redis.call('SET', A.in_progress_prefix .. id, '1', 'PX', A.in_progress_ms)
      out[#out + 1] = id
      out[#out + 1] = score
      left = left - 1
    end
  end
end
return {out, expired}

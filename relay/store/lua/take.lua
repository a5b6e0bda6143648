--[[ take: start the due deliveries of one poll and claim each, in one call
(relay/delivery/steps.py; the worker's ``BatchStartWorker.start_jobs``). Per job, arq's
checks — due, not in progress on any worker — then its in-progress mark, then the claim
(lib/claim.lua: an attempt, a deferral or the end of the delivery). A deferred job's
mark goes at once: it runs later, on any worker. A job whose job key has expired is
taken out of the queue and reported. A job in `peek` mode (its sink is no longer
configured, or its secret is unusable) is only marked, and its stored event and
attempts come back for the caller to dead-letter it without an attempt.
KEYS
  1 queue              arq's queue
ARGV
  1 prefix             the relay's key prefix
  2 now                Unix ms
  3 in_progress_ms     how long the in-progress mark holds (the heartbeat renews it)
  4 max                how many jobs this worker can start (deferred ones do not count)
  5 margin_ms          how long past its deadline a delivery's job and event are kept
  6 jobs               JSON: per job [job_id, tenant, sink, event_id, max_age_ms,
                       max_attempts, cap, lease_ms, url, busy_ms, open_jitter_ms,
                       half_open_ms], or only the first four: peek at it
uses: claim delivery_keys
Returns {{job_id, chat, reply, job_id, chat, reply, ...}, {expired job id, ...}}:
reply as lib/claim.lua's, or {'peek', stored|false, attempts, first_ms, last_ms}; chat is
the ordered delivery's chat id from the job record ('' if none).
]]
local now, left = tonumber(A.now), tonumber(A.max)
local out, expired = {}, {}
for _, j in ipairs(cjson.decode(A.jobs)) do
  if left <= 0 then break end
  local id, tenant, sink, event_id = j[1], j[2], j[3], j[4]
  local score = redis.call('ZSCORE', K.queue, id)
  local in_progress = IN_PROGRESS_KEY_PREFIX .. id
  if score and tonumber(score) <= now and redis.call('EXISTS', in_progress) == 0 then
    local record = redis.call('GET', JOB_KEY_PREFIX .. id)
    if not record then
      redis.call('ZREM', K.queue, id)
      expired[#expired + 1] = id
    else
      redis.call('SET', in_progress, '1', 'PX', A.in_progress_ms)
      local ok, job = pcall(cjson.decode, record)
      local chat = ok and type(job) == 'table' and type(job.a) == 'table' and job.a[4] or ''
      if type(chat) ~= 'string' then chat = '' end
      local k = delivery_keys(A.prefix, K.queue, id, tenant, sink, event_id, chat)
      local reply
      if #j == 4 then
        local st = redis.call('HMGET', k.attempts, 'a', 'first', 'last')
        local stored = redis.pcall('GET', k.ev)
        if type(stored) ~= 'string' then stored = false end
        reply = {'peek', stored, st[1] or '0', st[2] or '', st[3] or ''}
        left = left - 1
      else
        reply = claim(k, {
          now = now, job_id = id, max_age_ms = j[5], max_attempts = j[6], cap = j[7],
          lease_ms = j[8], margin_ms = A.margin_ms, url = j[9], busy_ms = j[10],
          open_jitter_ms = j[11], half_open_ms = j[12],
        })
        if reply[1] == 'defer' then
          redis.call('DEL', in_progress)
        else
          left = left - 1
        end
      end
      out[#out + 1] = id
      out[#out + 1] = chat
      out[#out + 1] = reply
    end
  end
end
return {out, expired}

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
  6 seed               seeds the jitters drawn per job
  7 sinks              JSON: tenant .. "\n" .. sink -> [max_age_ms, max_attempts, cap,
                       lease_ms, url, busy_ms, open_jitter_ms, half_open_ms] for every
                       sink that can be tried (the three waits before jitter: a claim
                       puts off a busy or half-open delivery 1-2x its wait, an open
                       breaker's up to its wait later); a job of any other sink is
                       only peeked at
  8 jobs               JSON: the due job ids read from the queue, in its order
uses: claim delivery_keys
Returns {{job_id, chat, reply, job_id, chat, reply, ...}, {expired job id, ...}}:
reply as lib/claim.lua's, or {'peek', stored|false, attempts, first_ms, last_ms}; chat is
the ordered delivery's chat id from the job record ('' if none).
]]
local now, left = tonumber(A.now), tonumber(A.max)
local sinks = cjson.decode(A.sinks)
local skip = #A.prefix + 2  -- a job id is prefix:tenant:sink:event_id
math.randomseed(tonumber(A.seed))
local out, expired = {}, {}
for _, id in ipairs(cjson.decode(A.jobs)) do
  if left <= 0 then break end
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
      local rest = id
      if string.sub(id, 1, skip - 1) == A.prefix .. ':' then rest = string.sub(id, skip) end
      local t_end = string.find(rest, ':', 1, true) or (#rest + 1)
      local tenant = string.sub(rest, 1, t_end - 1)
      local s_end = string.find(rest, ':', t_end + 1, true) or (#rest + 1)
      local sink = string.sub(rest, t_end + 1, s_end - 1)
      local event_id = string.sub(rest, s_end + 1)
      local k = delivery_keys(A.prefix, K.queue, id, tenant, sink, event_id, chat)
      local lim = sinks[tenant .. '\n' .. sink]
      local reply
      if not lim then
        local st = redis.call('HMGET', k.attempts, 'a', 'first', 'last')
        local stored = redis.pcall('GET', k.ev)
        if type(stored) ~= 'string' then stored = false end
        reply = {'peek', stored, st[1] or '0', st[2] or '', st[3] or ''}
        left = left - 1
      else
        reply = claim(k, {
          now = now, job_id = id, max_age_ms = lim[1], max_attempts = lim[2], cap = lim[3],
          lease_ms = lim[4], margin_ms = A.margin_ms, url = lim[5],
          busy_ms = math.floor(lim[6] * (1 + math.random())),
          open_jitter_ms = math.floor(lim[7] * math.random()),
          half_open_ms = math.floor(lim[8] * (1 + math.random())),
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

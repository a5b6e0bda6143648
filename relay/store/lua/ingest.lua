-- Ingest a batch of events atomically, per event: mark (tenant, event_id) seen,
-- store the event once, and enqueue one arq job per matching sink. An event
-- already seen writes nothing. Keys are built from the prefix (standalone Redis
-- only, as arq itself). The batch also records when each tenant's last webhook came.
--
-- ARGV: prefix, queue, arq_job_prefix, now_ms,
--   n_webhook_tenants, then that many tenant slugs,
--   n_events, then per event:
--     tenant, event_id, stored, event_ttl_ms, n_jobs, then per job: sink, job_ttl_ms
--   stored: the stored event (relay.stored_event) counting n_jobs users
--   event_ttl_ms = max(dedupe_ttl, longest sink max_age + margin): the seen mark
--   outlives every job the event gets
-- Returns one integer per event: 1 new, 0 duplicate.
local prefix, queue, jobp = ARGV[1], ARGV[2], ARGV[3]
local now = ARGV[4]
local i = 5
local nwh = tonumber(ARGV[i])
for k = 1, nwh do
  -- webhooks are getting through: the poller reads this to tell a lapse
  redis.call('SET', prefix .. ':lastwh:' .. ARGV[i + k], now)
end
i = i + nwh + 1
local n = tonumber(ARGV[i])
i = i + 1
local out = {}
local queued = {}  -- score, job id, score, job id, ...: one ZADD for the whole batch
for e = 1, n do
  local tenant, event_id, stored, ev_ttl = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local njobs = tonumber(ARGV[i + 4])
  i = i + 5
  local tail = tenant .. ':' .. event_id
  if redis.call('SET', prefix .. ':seen:' .. tail, now, 'NX', 'PX', ev_ttl) then
    local id_json = cjson.encode(event_id)
    local created = 0
    for j = 1, njobs do
      local sink, job_ttl = ARGV[i], ARGV[i + 1]
      i = i + 2
      local job_id = prefix .. ':' .. tenant .. ':' .. sink .. ':' .. event_id
      local job = '{"t":null,"f":"deliver","a":["' .. tenant .. '","' .. sink .. '",' ..
        id_json .. '],"k":{},"et":' .. now .. '}'
      if redis.call('SET', jobp .. job_id, job, 'NX', 'PX', job_ttl) then
        queued[#queued + 1] = now
        queued[#queued + 1] = job_id
        created = created + 1
      end
    end
    local ev_key = prefix .. ':ev:' .. tail
    if created == 0 then
      -- no delivery needs it
    elseif redis.call('SET', ev_key, stored, 'NX', 'PX', ev_ttl) then
      if created < njobs then
        redis.call('SETRANGE', ev_key, 0, string.format('%04d', created))
      end
    else
      -- Still stored past its seen mark: a dead letter keeps it (no expiry) until
      -- replayed or purged. Add the new jobs to its users, from now.
      -- Nothing here may fail: the batch's earlier writes would stay without their ZADD.
      local users = tonumber(redis.pcall('GETRANGE', ev_key, 0, 3))
      if not users then
        -- Not in this format (a hash written by an earlier build): replace it, keeping
        -- its expiry and the holds it counted.
        users = tonumber(redis.pcall('HGET', ev_key, 'n')) or 0
        redis.call('SET', ev_key, stored, 'KEEPTTL')
      end
      redis.call('SETRANGE', ev_key, 0, string.format('%04d %013d', users + created, now))
      local ttl = redis.call('PTTL', ev_key)
      if ttl >= 0 and ttl < tonumber(ev_ttl) then redis.call('PEXPIRE', ev_key, ev_ttl) end
    end
    out[e] = 1
  else
    i = i + 2 * njobs
    out[e] = 0
  end
end
for k = 1, #queued, 2000 do  -- unpack() has a stack limit: chunks of 1000 jobs
  redis.call('ZADD', queue, unpack(queued, k, math.min(k + 1999, #queued)))
end
return out

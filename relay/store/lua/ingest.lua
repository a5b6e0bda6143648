--[[ ingest: take a batch of events atomically, per event (relay/ingest/ingestor.py):
mark (tenant, event_id) seen, store the event once, and enqueue one arq job per
matching sink. An event already seen writes nothing. Keys are built from the prefix
(standalone Redis only, as arq itself), with the segments relay/keys.py defines. The
batch also records when each tenant's last webhook came.
KEYS none
ARGV
  1 prefix        the relay's key prefix
  2 queue         arq's queue
  3 job_prefix    arq's job key prefix
  4 now           Unix ms
  5... batch      n_webhook_tenants, then that many tenant slugs; n_events, then per
                  event: tenant, event_id, stored, event_ttl_ms, n_jobs, then per job:
                  sink, job_ttl_ms
  stored: the stored event (relay/store/stored_event.py) counting n_jobs users.
  event_ttl_ms = max(dedupe_ttl, longest sink max_age + margin): the seen mark
  outlives every job the event gets.
uses: keys
Returns one integer per event: 1 new, 0 duplicate.
]]
local prefix, queue, jobp, now = A.prefix, A.queue, A.job_prefix, A.now
local seen_p, event_p = prefix .. ':' .. KEY.seen .. ':', prefix .. ':' .. KEY.event .. ':'
local last_webhook_p = prefix .. ':' .. KEY.last_webhook .. ':'
local i = 5
local nwh = tonumber(ARGV[i])
for k = 1, nwh do
  -- webhooks are getting through: the poller reads this to tell a lapse
  redis.call('SET', last_webhook_p .. ARGV[i + k], now)
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
  if redis.call('SET', seen_p .. tail, now, 'NX', 'PX', ev_ttl) then
    local id_json = cjson.encode(event_id)
    local created = 0
    for j = 1, njobs do
      local sink, job_ttl = ARGV[i], ARGV[i + 1]
      i = i + 2
      local job_id = prefix .. ':' .. tenant .. ':' .. sink .. ':' .. event_id
      local job = '{"t":null,"f":"' .. JOB_FUNCTION .. '","a":["' .. tenant .. '","' .. sink .. '",' ..
        id_json .. '],"k":{},"et":' .. now .. '}'
      if redis.call('SET', jobp .. job_id, job, 'NX', 'PX', job_ttl) then
        queued[#queued + 1] = now
        queued[#queued + 1] = job_id
        created = created + 1
      end
    end
    local ev_key = event_p .. tail
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

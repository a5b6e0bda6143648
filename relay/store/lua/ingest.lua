--[[ ingest: take a batch of events atomically, per event (relay/ingest/ingestor.py):
mark (tenant, event_id) seen, store the event once, and enqueue one arq job per
matching sink. An event already seen writes nothing. Keys are built from the prefix
(standalone Redis only, as arq itself), with the segments relay/keys.py defines. The
batch also records when each tenant's last webhook came, and tells the workers (a
message on the wake channel, naming the jobs of a small batch) when it queued anything.
KEYS none
ARGV
  1 prefix        the relay's key prefix
  2 queue         arq's queue
  3 job_prefix    arq's job key prefix
  4 log_cap       the event log's byte cap; 0: no event log
  5 log_keep_ms   the event log's retention
  6... batch      n_webhook_tenants, then that many tenant slugs; n_events, then per
                  event: tenant, event_id, stored, chat, event_ttl_ms, n_jobs, then per
                  job: sink, job_ttl_ms, ordering; then n_filtered, then that many sinks
  stored: the stored event (relay/store/stored_event.py) counting n_jobs users.
  chat: the event's data.chat.id, or '' (then it is unordered everywhere).
  filtered: the sinks whose filters keep the event (decided once, by the caller): a
  new event's record says so (s:<sink> = 'filter'), whatever the configuration later.
With the event log on, a new event joins the log's index (lib/event_log.lua: its
stored event is its record until its deliveries let it go; one that no sink takes
gets its record now), and a duplicate counts as one more arrival on its record; the
oldest records go while the log is over its cap or past its retention — or, when Redis
is short of memory (lib/event_log.lua's log_short), at all — as many as four times the
events added, and a few.
  event_ttl_ms = max(dedupe_ttl, longest sink max_age + margin): the seen mark
  outlives every job the event gets.
  ordering: 'chat' for a sink that delivers a chat's events in order, else ''. Such a
  job joins its chat's list; only the list's head is queued (lib/chat_order.lua).
Times — the seen mark, the job's enqueue time and due time, the stored event's ingest
time (its header's second field, which a delivery's deadline counts from) — are Redis'
clock, whatever the calling process's clock says.
uses: keys clock event_log
Returns one integer per event: 1 new, 0 duplicate.
]]
local WAKE_NAMED = 32  -- at most this many jobs named in the wake message
local prefix, queue, jobp, now = A.prefix, A.queue, A.job_prefix, redis_now_ms()
local seen_p, event_p = prefix .. ':' .. KEY.seen .. ':', prefix .. ':' .. KEY.event .. ':'
local last_webhook_p = prefix .. ':' .. KEY.last_webhook .. ':'
local chat_p = prefix .. ':' .. KEY.chat_order .. ':'
local held_p = prefix .. ':' .. KEY.held_chats .. ':'
local log_cap = tonumber(A.log_cap)
local log_p = prefix .. ':' .. KEY.event_log .. ':'
local log_copy_p = prefix .. ':' .. KEY.event_log_copy .. ':'
local log_index, log_bytes = prefix .. ':' .. KEY.event_log_index, prefix .. ':' .. KEY.event_log_bytes
local logged = 0
-- the stored event's source (its header: relay/store/stored_event.py)
local function source_of(stored)
  return string.match(stored, '^%d+ %d+ (%S+) ') or 'unknown'
end
local i = 6
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
  local tenant, event_id, stored, chat = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local ev_ttl, njobs = ARGV[i + 4], tonumber(ARGV[i + 5])
  i = i + 6
  local tail = tenant .. ':' .. event_id
  local L = log_cap > 0 and log_of(log_p .. tail, log_index, tail, log_bytes, log_copy_p .. tail)
  if redis.call('SET', seen_p .. tail, now, 'NX', 'PX', ev_ttl) then
    local id_json = cjson.encode(event_id)
    local chat_json = chat ~= '' and (',' .. cjson.encode(chat)) or ''
    local created, held = 0, false
    for j = 1, njobs do
      local sink, job_ttl, ordering = ARGV[i], ARGV[i + 1], ARGV[i + 2]
      i = i + 3
      local ordered = ordering ~= '' and chat ~= ''
      local job_id = prefix .. ':' .. tenant .. ':' .. sink .. ':' .. event_id
      -- an ordered job carries its chat id (ids only, never the payload)
      local job = '{"t":null,"f":"' .. JOB_FUNCTION .. '","a":["' .. tenant .. '","' .. sink ..
        '",' .. id_json .. (ordered and chat_json or '') .. '],"k":{},"et":' .. now .. '}'
      if redis.call('SET', jobp .. job_id, job, 'NX', 'PX', job_ttl) then
        created = created + 1
        local head = true
        if ordered then
          local chat_key = chat_p .. tenant .. ':' .. sink .. ':' .. chat
          head = redis.call('RPUSH', chat_key, event_id) == 1
          if not head and redis.call('ZSCORE', held_p .. tenant .. ':' .. sink, chat) then
            -- a dead letter holds the chat: this one waits without expiry too
            redis.call('PERSIST', jobp .. job_id)
            held = true
          else
            redis.call('PEXPIRE', chat_key, job_ttl)
          end
        end
        if head then
          queued[#queued + 1] = now
          queued[#queued + 1] = job_id
        end
      end
    end
    local nfiltered = tonumber(ARGV[i])
    local filtered_at = i + 1
    i = i + 1 + nfiltered
    local ev_key = event_p .. tail
    if created == 0 then
      -- no delivery needs it
    elseif redis.call('SET', ev_key, stored, 'NX', 'PX', ev_ttl) then
      redis.call('SETRANGE', ev_key, 0, string.format('%04d %013d', created, now))
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
    if held then redis.call('PERSIST', ev_key) end
    if L then
      local known = log_in(L)
      if not known then
        redis.call('ZADD', log_index, now, tail)
        logged = logged + 1
      end
      for f = filtered_at, filtered_at + nfiltered - 1 do
        redis.call('HSET', L.rec, 's:' .. ARGV[f], 'filter')
      end
      if known then
        -- in the log from before its seen mark expired: one more arrival
        log_arrival(L, source_of(stored), now)
        log_account(L)
      elseif created == 0 then
        log_keep(L, stored)  -- no delivery holds it (log_keep accounts)
      elseif nfiltered > 0 then
        log_account(L)
      end
    end
    out[e] = 1
  else
    i = i + 3 * njobs
    i = i + 1 + tonumber(ARGV[i])  -- the filtered sinks: decided when it was new
    if L and log_in(L) then
      log_arrival(L, source_of(stored), now)
      log_account(L)
    end
    out[e] = 0
  end
end
if log_cap > 0 and logged > 0 then
  -- short of memory, the log gives way at once: the events queued need the room
  local cap = log_short() and 0 or log_cap
  log_trim(log_index, log_bytes, log_p, log_copy_p, cap, now - tonumber(A.log_keep_ms), 4 * logged + 16)
end
for k = 1, #queued, 2000 do  -- unpack() has a stack limit: chunks of 1000 jobs
  redis.call('ZADD', queue, unpack(queued, k, math.min(k + 1999, #queued)))
end
-- Work is due: workers waiting for it start it now rather than at their next poll. A
-- batch of a few jobs names them (one per line), and a worker takes those at once,
-- without reading the queue first; a larger one (a backfill) only wakes the workers,
-- whose reads take it in queue order.
if #queued > 0 then
  local named = {}
  if #queued <= 2 * WAKE_NAMED then
    for k = 2, #queued, 2 do named[#named + 1] = queued[k] end
  end
  redis.call('PUBLISH', prefix .. ':' .. KEY.wake, table.concat(named, '\n'))
end
return out

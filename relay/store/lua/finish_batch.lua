--[[ finish_batch: record how many deliveries went, in one call — the finishes of a
worker's concurrent deliveries, group-committed (relay/delivery/steps.py). Each is
lib/finish.lua: the rules are in finish.lua's header. Times are Redis' clock.
A finish asked to chain (its run's worker has the slot it frees) also takes the job it
queued — the sink's first waiting delivery, given the freed slot, or else an ordered
chat's next event — for that worker, as take.lua would: the in-progress mark with a
fencing token of this batch, then the claim. The worker runs it at once, without a
take of its own.
A finish asked for a reserve also claims, for the job that now holds the slot (the one
the run handed its slot to — see lib/finish.lua's handoff — or else the chained one),
the sink's next waiting delivery ahead, while the sink's breaker lets everything through
and it is not paused: its in-progress mark and its attempt, but no slot
(lib/claim.lua's reserve). The worker starts it the moment the holder's attempt
succeeds, on the holder's slot, rather than after the holder's finish comes back; the
holder's finish then passes the slot's lease on. A reserve the worker does not use (the
holder's attempt failed) goes back (unreserve.lua).
KEYS none
ARGV
  1 prefix             the relay's key prefix
  2 queue              arq's queue
  3 breaker_rule       JSON [min_failures, failure_rate, window_ms]: when failures open
                       a breaker (lib/breaker.lua)
  4 cooldown_ms        how long it stays open
  5 breaker_ttl_ms
  6 lease_ms           an in-flight slot's lease (one reserved for a waiting delivery)
  7 tag                this batch's unique tag: item n's chained run's token is tag .. '.' .. n
  8 in_progress_ms     how long a chained run's in-progress mark holds
  9 margin_ms          how long past its deadline a delivery's job and event are kept
  10 log_keep          '1': the event log keeps a copy of an event its last delivery
                       lets go — unless Redis is short of memory (lib/event_log.lua's
                       log_short, checked once a batch); '0': it does not
  11... items          n, then per item: job_id, tenant, sink, event_id, chat, token,
                       outcome, delay_ms, status, error, effect, gone_url, class,
                       on_dead, cap (the sink's concurrency), chain ('' or the sink's
                       claim limits, JSON as in take.lua's `sinks`), attempt (the
                       attempt's JSON for the event log, or ''), handoff and
                       handoff_token (lib/finish.lua's; '' if none), reserve ('1':
                       claim a reserve; needs chain), n_fields, then that many
                       dead-letter fields (name, value, ...)
uses: clock finish delivery_keys claim job_record event_log wait breaker
flags: allow-oom
Returns per item 0 if its run no longer held the delivery (a stale finish: nothing was
changed), else {next_job, breaker_change, started, chained, reserve}: lib/finish.lua's
first three, the job taken for the worker, {job_id, chat, token, reply} as take.lua
returns one (reply: lib/claim.lua's), or 0 (none), and the reserve, {holder_job_id,
{job_id, chat, token, reply}}, or 0 (none). A chained job is not among `started`.
]]
local out = {}
local rule = cjson.decode(A.breaker_rule)
local i = 12
local now = redis_now_ms()
local log_keep = A.log_keep == '1' and not log_short()
local tally = breaker_tally()  -- closed breakers' successes: written once each, at the end

-- Take `id` (due now) for the worker that asked, as take.lua does for a known sink
-- (`reserve`: ahead, without a slot; `memo`: what is known of the sink already,
-- lib/claim.lua's).
local function chain(id, token, lim, reserve, memo)
  local in_progress = IN_PROGRESS_KEY_PREFIX .. id
  if redis.call('EXISTS', in_progress) == 1 then return 0 end
  local record = redis.call('GET', JOB_KEY_PREFIX .. id)
  if not record then return 0 end  -- expired: the next read of the queue reports it
  redis.call('SET', in_progress, token, 'PX', A.in_progress_ms)
  local chat = job_chat(record)
  local tenant, sink, event_id = job_parts(A.prefix, id)
  local k = delivery_keys(A.prefix, A.queue, id, tenant, sink, event_id, chat)
  local reply = claim(k, {
    now = now, job_id = id, max_age_ms = lim[1], max_attempts = lim[2], cap = lim[3],
    lease_ms = lim[4], margin_ms = A.margin_ms, url = lim[5], rate_ms = lim[7],
    reserve = reserve, memo = memo,
  })
  if reply[1] == 'defer' or reply[1] == 'park' then redis.call('DEL', in_progress) end
  return {id, chat, token, reply}
end

-- The sink's next waiting delivery, claimed ahead (no slot) for the run of `holder`.
local function reserve(k, holder, token, lim)
  if redis.call('EXISTS', k.wait) == 0 or redis.call('EXISTS', k.paused) == 1 then
    return 0
  end
  if breaker_admits(k.breaker, now) ~= 'all' then return 0 end
  local ids = unpark(k.wait, k.waiting, k.member, k.inflight, k.queue, k.att_base,
    k.job_base, 1, now, 0, false)
  if #ids == 0 then return 0 end
  -- not paused, and a breaker that lets everything through is closed: the claim need
  -- not read either again
  local got = chain(ids[1], token, lim, true, {paused = false, verdict = 'ok'})
  if got == 0 then return 0 end
  return {holder, got}
end

for n = 1, tonumber(ARGV[11]) do
  local id, tenant, sink, event_id, chat = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  local handoff, want_reserve = ARGV[i + 17], ARGV[i + 19] == '1'
  local nfields = tonumber(ARGV[i + 20])
  local fields = {}
  for f = 1, nfields do fields[f] = ARGV[i + 20 + f] end
  local k = delivery_keys(A.prefix, A.queue, id, tenant, sink, event_id, chat)
  local res = finish(k, {
    now = now, token = ARGV[i + 5], job_id = id, outcome = ARGV[i + 6],
    delay_ms = ARGV[i + 7], status = ARGV[i + 8], error = ARGV[i + 9], effect = ARGV[i + 10],
    rule = rule, cooldown_ms = A.cooldown_ms, breaker_ttl_ms = A.breaker_ttl_ms,
    gone_url = ARGV[i + 11], class = ARGV[i + 12], member = sink .. ':' .. event_id,
    event_id = event_id, chat = chat, on_dead = ARGV[i + 13], cap = tonumber(ARGV[i + 14]),
    lease_ms = tonumber(A.lease_ms), sink = sink, attempt = ARGV[i + 16],
    log_keep = log_keep, handoff = handoff, handoff_token = ARGV[i + 18], tally = tally,
  }, fields)
  if type(res) == 'table' then
    local handed = res[4]
    res[4], res[5] = 0, 0
    local lim = ARGV[i + 15]
    if lim ~= '' then
      lim = cjson.decode(lim)
      local started = res[3]
      if #started > 0 then
        res[4] = chain(started[1], A.tag .. '.' .. n, lim)
        if res[4] ~= 0 then table.remove(started, 1) end
      elseif res[1] ~= '' then
        res[4] = chain(res[1], A.tag .. '.' .. n, lim)
        if res[4] ~= 0 then res[1] = '' end
      end
      local holder = ''
      if handed then
        holder = handoff
      elseif res[4] ~= 0 and res[4][4][1] == 'go' then
        holder = res[4][1]
      end
      if want_reserve and holder ~= '' then
        res[5] = reserve(k, holder, A.tag .. '.r' .. n, lim)
      end
    end
  end
  out[n] = res
  i = i + 21 + nfields
end
breaker_tally_write(tally, now, rule, tonumber(A.breaker_ttl_ms))
return out

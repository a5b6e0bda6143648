--[[ finish: record how one delivery attempt (or a run without one) went, for
``finish_batch.lua`` (many at once, group-committed). Only the run that holds the
delivery applies its finish: arq's in-progress mark (``k.in_progress``) must still hold
the run's fencing token (``arg.token``, from take.lua). A stale run — its worker was
paused past its hold, and another run took the delivery over, or finished it — changes
nothing: it never releases the stored event a second time, re-queues a finished job or
re-creates its record. Otherwise the in-flight slot is given back and the breaker told.
`retry` schedules the next attempt; `ok`, `dead` and `drop` end the delivery: the job
and its record go, and `dead` stores a dead letter, which takes over the job's hold on
the stored event. For an ordered sink the chat's next event is then queued — unless the
dead letter holds the chat (`on_dead = hold`).
The in-progress mark goes too: the job may be taken again (at once, or when it is due).
``k``: the delivery's keys (lib/delivery_keys.lua); ``arg``: now (Redis' clock), token,
job_id, outcome (ok | retry | dead | drop), delay_ms (retry: the next attempt is due
``now + delay_ms``), status, error, effect (on the breaker: success | failure | none),
rule (the breaker's: {min_failures, failure_rate, window_ms}), cooldown_ms,
breaker_ttl_ms, gone_url, class, member, event_id, chat, on_dead (skip | hold), cap
(the sink's concurrency; 0: unknown here) and lease_ms: the slots the sink has free
then go to its waiting deliveries (lib/wait.lua), each reserved for lease_ms; sink and
attempt (the attempt's JSON for the event log, '' if the run made none: a stale run's
is recorded too, marked so — the sink may have the event twice), log_keep (whether
the log keeps a copy of the event when its last delivery lets it go), and handoff,
handoff_token: the job (a claim ahead of this worker's, finish_batch.lua's reserve)
that the worker started on this run's slot when the attempt succeeded ('': none) — the
slot's lease passes to it, and its attempt is counted (the reserve's claim did not), if
its in-progress mark still holds that token; tally (lib/breaker.lua's breaker_tally,
kept across a batch; nil: none);
``fields``: the dead letter's name/value pairs (a table).
Returns 0 if the run no longer holds the delivery (nothing was changed), else
{next_job, breaker_change, started, handed}: the job id of the chat's next event, now
queued ('' if none or unordered), what the attempt did to the sink's breaker
(lib/breaker.lua's breaker_record: '' | 'open <failed> <attempts>' | 'reopen' |
'close'), the job ids of the waiting deliveries now queued, due now, with a slot each,
and whether the slot's lease passed to the handoff job.
uses: stored_event breaker deadletter_add chat_order wait event_log attempt
]]

local function finish(k, arg, fields)
  local now, job_id, outcome = tonumber(arg.now), arg.job_id, arg.outcome
  local L = log_of(k.log, k.log_index, k.log_member, k.log_bytes, k.log_copy)
  if redis.call('GET', k.in_progress) ~= arg.token then
    if arg.attempt ~= '' then log_finish(L, arg.sink, now, arg.attempt, '', true) end
    return 0
  end
  redis.call('DEL', k.in_progress)
  log_stage(L)  -- the attempt, the end and the event kept go in one write, at done()
  local state = ({ok = 'ok', drop = 'drop', dead = 'dead:' .. arg.class})[outcome] or ''
  log_finish(L, arg.sink, now, arg.attempt, state, false)
  local keep = arg.log_keep and L or nil  -- no copy while Redis is short of memory
  local ordered = k.chat ~= ''
  local job_base = string.sub(job_id, 1, #job_id - #arg.event_id)
  redis.call('ZREM', k.inflight, job_id)
  local handed = false
  if arg.handoff ~= '' and outcome == 'ok'
      and redis.call('GET', IN_PROGRESS_KEY_PREFIX .. arg.handoff) == arg.handoff_token then
    redis.call('ZADD', k.inflight, now + arg.lease_ms, arg.handoff)
    local att = k.att_base .. string.sub(arg.handoff, #k.job_base + 1)
    local st = redis.call('HMGET', att, 'a', 'first', 'ps', 'rt')
    attempt_counted(att, (tonumber(st[1]) or 0) + 1, now, st[2], st[3] or st[4])
    handed = true
  end
  local change = breaker_record(k.breaker, now, job_id, arg.effect, arg.rule,
    tonumber(arg.cooldown_ms), tonumber(arg.breaker_ttl_ms), arg.tally)
  local function done(next_job)
    log_flush(L)
    local started = {}
    if arg.cap > 0 then started = wait_fill(k, arg.cap, now, arg.lease_ms) end
    return {next_job, change, started, handed}
  end
  if outcome == 'retry' then
    local due = now + tonumber(arg.delay_ms)
    redis.call('HSET', k.attempts, 'due', due, 'st', arg.status, 'err', arg.error)
    redis.call('ZADD', k.queue, due, job_id)
    return done('')
  end
  redis.call('DEL', k.job, k.retry, k.attempts)
  redis.call('ZREM', k.queue, job_id)
  if outcome == 'dead' then
    -- An earlier dead letter of this (event, sink) is replaced: its hold on the stored
    -- event passes to the new one, and this job's is let go.
    if redis.call('EXISTS', k.entry) == 1 then event_release(k.ev, keep) end
    deadletter_add(k.entry, k.index, k.counts, arg.member, now, arg.class, fields)
    redis.call('PERSIST', k.ev)
    if arg.gone_url ~= '' then redis.call('SET', k.gone, arg.gone_url) end
    if ordered and arg.on_dead == 'hold' then
      redis.call('HSET', k.entry, 'holds', '1')
      chat_hold(k.chat, k.held, arg.chat, now, job_base, string.sub(k.ev, 1, #k.ev - #arg.event_id))
      return done('')
    end
  elseif outcome == 'ok' then
    event_release(k.ev, keep)
  end
  if ordered then return done(chat_release(k.chat, arg.event_id, job_base, k.queue, now)) end
  return done('')
end

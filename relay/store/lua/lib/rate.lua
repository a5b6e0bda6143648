--[[ rate: a sink's pace (sink.rate), one hash per (tenant, sink) shared by every
worker, checked inside the claim (lib/claim.lua) so that N workers keep one pace.
A generic cell rate algorithm (GCRA): `t` is the theoretical arrival time, Unix ms
(fractional): a delivery may start once `now >= t - tau`, and each start moves `t` to
max(t, now) + interval. tau, the burst tolerance, is max(interval, BURST_MS): at most
rate * w + 1 + tau / interval deliveries start in any window of w ms, and a worker
that picks a delivery up to 50 ms late (a busy event loop, a loaded machine) loses
none of the pace.
A delivery that finds no token is not re-read at every token: it is promised its own
turn — the last turn promised (`w`) plus one interval, or the next token if no one is
in line — and put back in arq's queue, due then, once (the loop wakes at the queue's
next due time). Its turn is kept in its record (`rt`): a delivery back at its turn goes
as soon as the bucket has a token, ahead of new ones; a new one goes only when no turn
is promised past now, so the line keeps its order and no one starves. Turns are
promised at most HORIZON_MS ahead: a delivery whose turn would be later is set aside
in the sink's waiting set (lib/wait.lua, reason `rate`), in order, and handed out as
turns come within the horizon — by a finish or the sweep, like a free slot
(`rate_fits`) — so a deep backlog is not promised turns hours ahead, and a reload
that changes the rate reaches all but the next HORIZON_MS of turns. While deliveries
are set aside, a new one waits behind them. A turn costs one ZADD and two hash
writes, a wait in the waiting set one ZADD and one ZPOPMIN: O(log n) per delivery.
A Retry-After (429 or 503) from the sink holds every start back until the time it
names (`u`): the next start is then, and the configured pace resumes from there with
no burst (`t` moves to `u + tau`); promised turns that fall before it are put off once
more, to the end of the line. `i` is the interval `t` and `w` were built with: after a
reload that changed the rate, promised turns are forgotten (`w` starts afresh) and the
token check uses the new interval, so a lower rate holds at once (a delivery promised
a turn at the old pace that finds no token is put off once more), and a higher one
reaches every delivery but those promised a turn in the next HORIZON_MS.
All times are Redis' clock (lib/clock.lua). The hash expires a minute after its last
promised turn or hold has passed.
Why turns in the queue rather than a timed release from the waiting set: arq's queue is
already the relay's timer — every worker's loop wakes at its next due time — so a turn
needs no new wake-up path, no sweep faster than the half-second one, and no worker
that must be alive at the right moment: any worker takes the delivery at its turn.
The waiting set keeps what the queue should not hold: a backlog far past the horizon,
which would otherwise be promised turns hours ahead and miss a reload's new rate.
]]

local BURST_MS = 50
local HORIZON_MS = 2000

local function rate_save(key, now, fields, latest)
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIRE', key, math.max(0, math.ceil(latest - now)) + 60000)
end

local function ms(x) return string.format('%.3f', x) end

-- Take a token for a delivery of the sink whose pace hash is `key`, `interval` ms
-- apart; `turn`: the delivery's promised turn (nil if it has none). Returns 0 (go now)
-- or how long (ms) to put the delivery off to its turn, which it then holds; -1 if its
-- turn would be past the horizon (the caller sets it aside, with no turn).
local function rate_take(key, now, interval, turn)
  local r = redis.call('HMGET', key, 't', 'w', 'u', 'i')
  local tat, tail, hold = tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0
  if math.abs((tonumber(r[4]) or -1) - interval) > 1e-6 then tail = 0 end  -- a new rate
  local tau = math.max(interval, BURST_MS)
  local due = math.max(tat - tau, hold)
  if now >= due and (turn or tail <= now) then
    tat = math.max(tat, now) + interval
    rate_save(key, now, {'t', ms(tat), 'w', ms(tail), 'i', interval},
      math.max(tat, tail, hold))
    return 0
  end
  local at = math.max(due, tail + interval, now + 1)
  if at - now > HORIZON_MS then return -1 end
  rate_save(key, now, {'t', ms(tat), 'w', ms(at), 'i', interval}, math.max(tat, at, hold))
  return math.ceil(at - now)
end

-- How many turns the sink whose pace hash is `key` can promise now, within the
-- horizon; nil if it has no pace (the interval is the one its last turn was given at).
local function rate_fits(key, now)
  local r = redis.call('HMGET', key, 't', 'w', 'u', 'i')
  local interval = tonumber(r[4])
  if not interval then return nil end
  local tat, tail, hold = tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0
  local first = math.max(tat - math.max(interval, BURST_MS), hold, tail + interval, now)
  if first > now + HORIZON_MS then return 0 end
  return math.floor((now + HORIZON_MS - first) / interval) + 1
end

-- A sink's Retry-After: no start before `until_ms`, then the pace from there.
local function rate_hold(key, now, interval, until_ms)
  local r = redis.call('HMGET', key, 't', 'w', 'u')
  local tat, hold = tonumber(r[1]) or 0, tonumber(r[3]) or 0
  if until_ms <= hold then return 0 end
  tat = math.max(tat, until_ms + math.max(interval, BURST_MS))
  rate_save(key, now, {'t', ms(tat), 'u', until_ms}, math.max(tat, tonumber(r[2]) or 0))
  return 1
end

--[[ sweep: every worker's look, every half second, at the sinks with deliveries set
aside (lib/wait.lua), for what no finish saw: slots that freed when an in-flight lease
lapsed (a worker died mid-attempt) or a reload raised a sink's cap, and breakers whose
wait is over (no finish comes while one is open), and turns of a paced sink that came
within its horizon (lib/rate.lua). Those slots go to the waiting
deliveries, in order, each reserved. While a sink's breaker is open, its waiting
deliveries past their deadline go back in the queue, to be dead-lettered by their
claim — unless an operator paused the sink: then nothing of its leaves the waiting
set. The waiting deliveries of a sink no worker knows any more (after
``worker.unknown_sink_grace``) all go back in the queue, where a take ends them. The
event log's records past its retention (or over its cap) go too, oldest first.
KEYS
  1 waiting_sinks      the set of "tenant:sink" with deliveries set aside
  2 queue              arq's queue
ARGV
  1 prefix             the relay's key prefix
  2 lease_ms           a reserved slot's lease
  3 sinks              JSON: "tenant:sink" -> cap (concurrency), every sink this worker knows
  4 release            JSON: the "tenant:sink" whose waiting deliveries all go back
  5 wake               the channel that tells workers work is due
  6 log_cap            the event log's byte cap
  7 log_keep_ms        the event log's retention: older records go (at most 500 a sweep)
uses: clock wait event_log
flags: allow-oom
Returns {{job id queued, ...}, {"tenant:sink" this worker does not know, ...}}.
]]
local now = redis_now_ms()
local caps = cjson.decode(A.sinks)
local release = {}
for _, m in ipairs(cjson.decode(A.release)) do release[m] = true end
local p = A.prefix .. ':'
local started, unknown = {}, {}
local function add(ids)
  for _, id in ipairs(ids) do started[#started + 1] = id end
end
for _, member in ipairs(redis.call('SMEMBERS', K.waiting_sinks)) do
  local wait = p .. KEY.waiting .. ':' .. member
  local inflight = p .. KEY.inflight .. ':' .. member
  local breaker = p .. KEY.breaker .. ':' .. member
  local paused = p .. KEY.paused .. ':' .. member
  local att_base = p .. KEY.attempts .. ':' .. member .. ':'
  local job_base = p .. member .. ':'
  local cap = caps[member]
  if redis.call('EXISTS', wait) == 0 then
    redis.call('SREM', K.waiting_sinks, member)
  elseif cap then
    local n = wait_free(inflight, breaker, paused, cap, now, p .. KEY.rate .. ':' .. member)
    add(unpark(wait, K.waiting_sinks, member, inflight, K.queue, att_base, job_base, n, now,
      tonumber(A.lease_ms), true))
    if n == 0 and redis.call('HGET', breaker, 's') == 'o'
        and redis.call('EXISTS', paused) == 0 then
      -- open: the first in line past their deadline end (their claim dead-letters them)
      for _, id in ipairs(redis.call('ZRANGE', wait, 0, 99)) do
        local dl = tonumber(redis.call('HGET', att_base .. string.sub(id, #job_base + 1), 'dl'))
        if dl and dl <= now then
          redis.call('ZREM', wait, id)
          redis.call('HDEL', att_base .. string.sub(id, #job_base + 1), 'pk', 'pr')
          redis.call('ZADD', K.queue, now, id)
          started[#started + 1] = id
        end
      end
      if redis.call('EXISTS', wait) == 0 then redis.call('SREM', K.waiting_sinks, member) end
    end
  elseif release[member] then
    add(unpark(wait, K.waiting_sinks, member, inflight, K.queue, att_base, job_base, 1000, now,
      0, false))
  else
    unknown[#unknown + 1] = member
  end
end
if #started > 0 then redis.call('PUBLISH', A.wake, '') end
log_trim(p .. KEY.event_log_index, p .. KEY.event_log_bytes, p .. KEY.event_log .. ':',
  p .. KEY.event_log_copy .. ':', tonumber(A.log_cap), now - tonumber(A.log_keep_ms), 500)
return {started, unknown}

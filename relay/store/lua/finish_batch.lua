--[[ finish_batch: record how many deliveries went, in one call — the finishes of a
worker's concurrent deliveries, group-committed (relay/delivery/steps.py). Each is
lib/finish.lua: the rules are in finish.lua's header. Times are Redis' clock.
KEYS none
ARGV
  1 prefix             the relay's key prefix
  2 queue              arq's queue
  3 breaker_rule       JSON [min_failures, failure_rate, window_ms]: when failures open
                       a breaker (lib/breaker.lua)
  4 cooldown_ms        how long it stays open
  5 breaker_ttl_ms
  6 lease_ms           an in-flight slot's lease (one reserved for a waiting delivery)
  7... items           n, then per item: job_id, tenant, sink, event_id, chat, token,
                       outcome, delay_ms, status, error, effect, gone_url, class,
                       on_dead, cap (the sink's concurrency), n_fields, then that many
                       dead-letter fields (name, value, ...)
uses: clock finish delivery_keys
flags: allow-oom
Returns per item 0 if its run no longer held the delivery (a stale finish: nothing was
changed), else {next_job, breaker_change, started} (lib/finish.lua).
]]
local out = {}
local rule = cjson.decode(A.breaker_rule)
local i = 8
local now = redis_now_ms()
for n = 1, tonumber(ARGV[7]) do
  local id, tenant, sink, event_id, chat = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  local nfields = tonumber(ARGV[i + 15])
  local fields = {}
  for f = 1, nfields do fields[f] = ARGV[i + 15 + f] end
  local k = delivery_keys(A.prefix, A.queue, id, tenant, sink, event_id, chat)
  out[n] = finish(k, {
    now = now, token = ARGV[i + 5], job_id = id, outcome = ARGV[i + 6],
    delay_ms = ARGV[i + 7], status = ARGV[i + 8], error = ARGV[i + 9], effect = ARGV[i + 10],
    rule = rule, cooldown_ms = A.cooldown_ms, breaker_ttl_ms = A.breaker_ttl_ms,
    gone_url = ARGV[i + 11], class = ARGV[i + 12], member = sink .. ':' .. event_id,
    event_id = event_id, chat = chat, on_dead = ARGV[i + 13], cap = tonumber(ARGV[i + 14]),
    lease_ms = tonumber(A.lease_ms),
  }, fields)
  i = i + 16 + nfields
end
return out

-- One call of lib/breaker.lua's functions, for tests/store/test_breaker_judgement.py.
-- KEYS[1]: the breaker; ARGV: what (check | take_probe | record | batch), now, job_id,
-- then for record: effect, rule (JSON), cooldown_ms, ttl_ms; for batch (the records of
-- one script call, through a tally, as finish_batch.lua makes them): effects (JSON list
-- of [job_id, effect]), rule, cooldown_ms, ttl_ms — returns the changes.
local what, now, job_id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if what == 'check' then
  local verdict, wait = breaker_check(KEYS[1], now, job_id, 0, 1000)
  return {verdict, wait}
elseif what == 'take_probe' then
  breaker_take_probe(KEYS[1], now, job_id, 10000)
  return ''
elseif what == 'batch' then
  local rule, ttl = cjson.decode(ARGV[5]), tonumber(ARGV[7])
  local tally, changes = breaker_tally(), {}
  for n, one in ipairs(cjson.decode(ARGV[4])) do
    changes[n] = breaker_record(KEYS[1], now, one[1], one[2], rule, tonumber(ARGV[6]), ttl,
      tally)
  end
  breaker_tally_write(tally, now, rule, ttl)
  return changes
end
return breaker_record(KEYS[1], now, job_id, ARGV[4], cjson.decode(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7]))

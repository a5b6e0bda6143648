-- One call of lib/breaker.lua's functions, for tests/store/test_breaker_judgement.py.
-- KEYS[1]: the breaker; ARGV: what (check | take_probe | record), now, job_id, then for
-- record: effect, rule (JSON), cooldown_ms, ttl_ms.
local what, now, job_id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if what == 'check' then
  local verdict, wait = breaker_check(KEYS[1], now, job_id, 0, 1000)
  return {verdict, wait}
elseif what == 'take_probe' then
  breaker_take_probe(KEYS[1], now, job_id, 10000)
  return ''
end
return breaker_record(KEYS[1], now, job_id, ARGV[4], cjson.decode(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7]))

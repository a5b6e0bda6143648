--[[ rate_hold: a sink that answered 429 or 503 with a Retry-After holds its paced
deliveries back (lib/rate.lua's rate_hold): none starts, on any worker, before the
time it names; then the sink's configured pace resumes (relay/delivery/pace.py).
KEYS
  1 rate               the sink's pace hash
ARGV
  1 wait_ms            the Retry-After, ms from now (Redis' clock)
  2 interval_ms        the sink's configured interval between starts (1000 / rate)
uses: clock rate
flags: allow-oom
Returns 1 if the hold moved later, 0 if one at least as long already held.
]]
local now = redis_now_ms()
return rate_hold(K.rate, now, tonumber(A.interval_ms), now + tonumber(A.wait_ms))

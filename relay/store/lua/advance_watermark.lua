--[[ advance_watermark: raise a tenant's poll watermark, never lower it — two holders of
the poll lease may briefly overlap at a takeover (relay/upstream/tenant_poller.py).
KEYS
  1 watermark   Unix seconds (float) of the newest created_at ingested
ARGV
  1 value
Returns 1 if it moved, 0 if not.
]]
local cur = tonumber(redis.call('GET', K.watermark))
local new = tonumber(A.value)
if cur == nil or new > cur then
  redis.call('SET', K.watermark, A.value)
  return 1
end
return 0

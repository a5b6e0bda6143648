--[[ lease_renew: extend a lease only if it still holds our token (relay/upstream/lease.py).
KEYS
  1 lease
ARGV
  1 token
  2 ttl_ms
Returns 1 if renewed, 0 if the lease is not ours.
]]
if redis.call('GET', K.lease) == A.token then
  return redis.call('PEXPIRE', K.lease, A.ttl_ms)
end
return 0

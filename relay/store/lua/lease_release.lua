--[[ lease_release: give a lease up only if it still holds our token (relay/upstream/lease.py).
KEYS
  1 lease
ARGV
  1 token
Returns 1 if released, 0 if the lease is not ours.
]]
if redis.call('GET', K.lease) == A.token then
  return redis.call('DEL', K.lease)
end
return 0

--[[ purge: delete one dead letter, and the stored event once nothing else holds it
(relay/delivery/deadletters.py).
KEYS
  1 entry       the dead letter
  2 index       the tenant's dead letters by time
  3 counts      the tenant's dead letters by class
  4 ev          the stored event
ARGV
  1 member      the entry's member in the index
uses: stored_event
Returns 1 if it was deleted, 0 if it was gone already.
]]
local cls = redis.call('HGET', K.entry, 'class')
if not cls then return 0 end
redis.call('HINCRBY', K.counts, cls, -1)
redis.call('DEL', K.entry)
redis.call('ZREM', K.index, A.member)
event_release(K.ev)
return 1

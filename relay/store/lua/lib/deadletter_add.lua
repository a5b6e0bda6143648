--[[ deadletter_add: store one dead letter (relay/store/deadletters.py).
``fields`` is a table of the entry's flat name/value pairs, `class` among them.
An earlier entry of the same (event, sink) is replaced and its class count moved.
]]

local function deadletter_add(entry, index, counts, member, now, cls, fields)
  local old = redis.call('HGET', entry, 'class')
  if old then redis.call('HINCRBY', counts, old, -1) end
  redis.call('DEL', entry)
  redis.call('HSET', entry, unpack(fields))
  redis.call('ZADD', index, now, member)
  redis.call('HINCRBY', counts, cls, 1)
end

--[[ unreserve: a reserve the worker did not start goes back (relay/delivery/steps.py):
a delivery claimed ahead for a run that then failed or ended (finish_batch.lua's
reserve). Its claim counted no attempt and kept its place in its sink's line; its
in-progress mark goes, and it is in the queue, due: the next take starts it or sets it
aside again, in its place. Only while the mark still holds the reserve's token:
otherwise another run holds the delivery now, and nothing is changed.
KEYS
  1 in_progress arq's in-progress mark for the job
ARGV
  1 token       the reserve's fencing token
flags: allow-oom
Returns 1 if it went back, 0 if the reserve no longer held the delivery.
]]
if redis.call('GET', K.in_progress) ~= A.token then return 0 end
redis.call('DEL', K.in_progress)
return 1

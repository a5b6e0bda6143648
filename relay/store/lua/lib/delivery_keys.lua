--[[ delivery_keys: the keys of one (event, sink) delivery, built from the relay's key
prefix and the segments of relay/keys.py (the names ``Keys`` gives them).
uses: keys
]]

local function delivery_keys(prefix, queue, job_id, tenant, sink, event_id, chat)
  local p = prefix .. ':'
  local ts = tenant .. ':' .. sink
  return {
    ev = p .. KEY.event .. ':' .. tenant .. ':' .. event_id,
    attempts = p .. KEY.attempts .. ':' .. ts .. ':' .. event_id,
    breaker = p .. KEY.breaker .. ':' .. ts,
    inflight = p .. KEY.inflight .. ':' .. ts,
    gone = p .. KEY.sink_gone .. ':' .. ts,
    paused = p .. KEY.paused .. ':' .. ts,
    rate = p .. KEY.rate .. ':' .. ts,
    job = JOB_KEY_PREFIX .. job_id,
    queue = queue,
    retry = RETRY_KEY_PREFIX .. job_id,
    in_progress = IN_PROGRESS_KEY_PREFIX .. job_id,
    entry = p .. KEY.dead_letter .. ':' .. ts .. ':' .. event_id,
    index = p .. KEY.dead_letters .. ':' .. tenant,
    counts = p .. KEY.dead_letter_counts .. ':' .. tenant,
    chat = (chat ~= '' and (p .. KEY.chat_order .. ':' .. ts .. ':' .. chat)) or '',
    held = p .. KEY.held_chats .. ':' .. ts,
    wait = p .. KEY.waiting .. ':' .. ts,
    waiting = p .. KEY.waiting_sinks,
    member = ts,
    att_base = p .. KEY.attempts .. ':' .. ts .. ':',  -- + event id: a delivery's record
    job_base = p .. ts .. ':',  -- + event id: a delivery's job id
    log = p .. KEY.event_log .. ':' .. tenant .. ':' .. event_id,  -- the event's record
    log_copy = p .. KEY.event_log_copy .. ':' .. tenant .. ':' .. event_id,  -- its copy
    log_member = tenant .. ':' .. event_id,
    log_bytes = p .. KEY.event_log_bytes,
    log_index = p .. KEY.event_log_index,
  }
end

--[[ job_record: what a delivery's job id and arq job record say (relay/keys.py,
relay/store/jobs.py).
]]

-- tenant, sink, event id of a job id "prefix:tenant:sink:event_id" (slugs have no ':').
local function job_parts(prefix, id)
  local rest = id
  if string.sub(id, 1, #prefix + 1) == prefix .. ':' then rest = string.sub(id, #prefix + 2) end
  local t_end = string.find(rest, ':', 1, true) or (#rest + 1)
  local s_end = string.find(rest, ':', t_end + 1, true) or (#rest + 1)
  return string.sub(rest, 1, t_end - 1), string.sub(rest, t_end + 1, s_end - 1),
    string.sub(rest, s_end + 1)
end

-- An ordered delivery's chat id from its job record ('' if none).
local function job_chat(record)
  local ok, job = pcall(cjson.decode, record)
  local chat = ok and type(job) == 'table' and type(job.a) == 'table' and job.a[4] or ''
  if type(chat) ~= 'string' then chat = '' end
  return chat
end

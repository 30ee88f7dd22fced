"""The Lua scripts of the Redis Streams queue: every state change that must be atomic.

Only SUBMIT is refused when Redis is at `maxmemory` (a shebang script without `allow-oom`, refused
before any write); the worker-side scripts may run then, and FINISH deletes the job's payload
before it stores the result, so a full Redis drains itself.
"""

# drop_entry: acknowledge a delivery and delete its message, returning its payload bytes to the
# budget. holder: the consumer holding the delivery `msg` now (false once it was acknowledged).
_HELPERS = """
local function drop_entry(stream, group, msg, bytes_key)
  redis.call('XACK', stream, group, msg)
  local entry = redis.call('XRANGE', stream, msg, msg)
  if #entry == 0 then return end
  local fields = entry[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'size' then redis.call('DECRBY', bytes_key, fields[i + 1]) end
  end
  redis.call('XDEL', stream, msg)
end
local function holder(stream, group, msg)
  local pending = redis.call('XPENDING', stream, group, msg, msg, 1)
  return #pending == 1 and pending[1][2]
end
local function owns(stream, group, msg, worker)
  return holder(stream, group, msg) == worker
end
-- The webhook of a job that just reached `state`, when its meta asks for that event (the events
-- of service/webhooks/events.py): its outbox hash and due time are written by the script that
-- stores the terminal state, so no finished job misses its webhook (service/webhooks/outbox.py).
local WEBHOOK_EVENTS = {done = 'job.completed', failed = 'job.failed', expired = 'job.failed',
  cancelled = 'job.cancelled'}
local function schedule_webhook(job_key, due_key, hook_key, job_id, state, ttl)
  local ok, meta = pcall(cjson.decode, redis.call('HGET', job_key, 'meta') or '')
  if not ok or type(meta) ~= 'table' or type(meta.webhook) ~= 'table' then return end
  for _, wanted in ipairs(meta.webhook.events) do
    if wanted == WEBHOOK_EVENTS[state] and redis.call('EXISTS', hook_key) == 0 then
      local now = redis.call('TIME')
      redis.call('HSET', hook_key, 'url', meta.webhook.url, 'event', wanted, 'state', 'pending',
        'attempts', 0)
      redis.call('EXPIRE', hook_key, ttl)
      redis.call('ZADD', due_key, now[1] + now[2] / 1000000, job_id)
      return
    end
  end
end
"""

GROUP_CREATE = """#!lua flags=allow-oom
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(reply) == 'table' and reply.err and not string.find(reply.err, 'BUSYGROUP') then return reply end
return 1
"""

# No allow-oom: at maxmemory Redis refuses it before any write. KEYS[5]: the jobs waiting (queue
# positions; members older than a record's TTL are surely not waiting any more). KEYS[6], the
# idempotency key, only when the request has one (an empty key name would hash to another slot on
# Redis Cluster).
SUBMIT = """#!lua
if #KEYS == 6 then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {'existing', existing} end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[6])
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do freed = freed + tonumber(string.match(member, '^(%d+):')) end
  redis.call('DECRBY', KEYS[3], freed)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[6])
end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', tostring(depth)} end
local held = tonumber(redis.call('GET', KEYS[3]) or '0')
if held + tonumber(ARGV[7]) > tonumber(ARGV[2]) then return {'bytes', tostring(held)} end
local msg = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 8))
redis.call('INCRBY', KEYS[3], ARGV[7])
redis.call('HSET', KEYS[2], 'state', 'queued', 'meta', ARGV[4], 'msg', msg)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', tonumber(ARGV[6]) - tonumber(ARGV[5]))
if #KEYS == 6 then redis.call('SET', KEYS[6], ARGV[3], 'EX', ARGV[5]) end
return {'new', msg}
"""

# Returns the new fencing token, 0 when the job ended (cancelled, finished: delivery dropped), -1
# when another worker holds the delivery now (it was reclaimed from us). Either way it no longer
# waits (KEYS[4]).
START = (
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
local held_by = holder(KEYS[2], ARGV[1], ARGV[2])
if not held_by then return 0 end
if held_by ~= ARGV[3] then return -1 end
redis.call('ZREM', KEYS[4], ARGV[4])
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
  redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3])
  return fence
end
drop_entry(KEYS[2], ARGV[1], ARGV[2], KEYS[3])
return 0
"""
)

# Stores the terminal record unless another worker took the job over (then returns 0).
FINISH = (
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
if not owns(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[4] then return 0 end
drop_entry(KEYS[2], ARGV[1], ARGV[2], KEYS[4])
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'worker', ARGV[3], 'error', ARGV[6], 'result', ARGV[7],
  unpack(ARGV, 12))
redis.call('EXPIRE', KEYS[1], ARGV[8])
schedule_webhook(KEYS[1], KEYS[6], KEYS[7], ARGV[9], ARGV[5], ARGV[8])
if tonumber(ARGV[11]) > 0 then
  redis.call('INCRBY', KEYS[4], ARGV[11])
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[11] .. ':' .. ARGV[9])
end
redis.call('PUBLISH', KEYS[3], ARGV[9])
return 1
"""
)

CANCEL = (
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return state end
local msg = redis.call('HGET', KEYS[1], 'msg')
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('EXPIRE', KEYS[1], ARGV[2])
schedule_webhook(KEYS[1], KEYS[5], KEYS[6], ARGV[3], 'cancelled', ARGV[2])
drop_entry(KEYS[2], ARGV[1], msg, KEYS[4])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 'cancelled'
"""
)

# Re-queues our delivery of an unfinished job as a new message (same fields), waiting again in its
# place of acceptance (KEYS[4]); a finished job's delivery is only dropped.
RELEASE = (
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
if not owns(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then
  drop_entry(KEYS[2], ARGV[1], ARGV[2], KEYS[3])
  return 0
end
local entry = redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if #entry == 0 then return 0 end
local msg = redis.call('XADD', KEYS[2], '*', unpack(entry[1][2]))
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'msg', msg)
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
return 1
"""
)

# Presence, and keeps our own deliveries from being reclaimed; returns the ones another worker took.
HEARTBEAT = (
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
else
  redis.call('ZREM', KEYS[1], ARGV[2])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
local lost = {}
for i = 6, #ARGV do
  local held_by = holder(KEYS[2], ARGV[1], ARGV[i])
  if held_by == ARGV[2] then
    redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  elseif held_by then
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
)

# Moves an unreadable message to the dead-letter stream and fails its job (KEYS[5], with its webhook
# keys KEYS[6] and KEYS[7], passed only when the message names one).
DEAD_LETTER = (
    "#!lua flags=allow-oom\n"
    + _HELPERS
    + """
if not owns(KEYS[1], ARGV[1], ARGV[2], ARGV[7]) then return 0 end
drop_entry(KEYS[1], ARGV[1], ARGV[2], KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '*', unpack(ARGV, 8))
if #KEYS == 7 then
  local state = redis.call('HGET', KEYS[5], 'state')
  if state == 'queued' or state == 'running' then
    redis.call('HSET', KEYS[5], 'state', 'failed', 'error', ARGV[4])
    redis.call('EXPIRE', KEYS[5], ARGV[6])
    schedule_webhook(KEYS[5], KEYS[6], KEYS[7], ARGV[5], 'failed', ARGV[6])
    redis.call('PUBLISH', KEYS[4], ARGV[5])
  end
end
return 1
"""
)

# A cancellation request: a running job's worker ends it at its next step boundary (SIGNALS). Set
# on queued jobs too, so a job that starts between this and CANCEL is still ended.
REQUEST_CANCEL = """#!lua flags=allow-oom
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
return state
"""

# KEYS: n job hashes, then their n watch keys. Returns the (1-based) indices of the jobs whose
# cancellation was requested, and of those watched with previews.
SIGNALS = """#!lua flags=no-writes,allow-oom
local n = #KEYS / 2
local cancelled, watched = {}, {}
for i = 1, n do
  if redis.call('HEXISTS', KEYS[i], 'cancel') == 1 then table.insert(cancelled, i) end
  if redis.call('EXISTS', KEYS[n + i]) == 1 then table.insert(watched, i) end
end
return {cancelled, watched}
"""

# Appends a progress event to the job's capped stream, only while the job runs (a late event never
# recreates the log of a finished job). No allow-oom: at maxmemory progress is dropped.
PROGRESS = """#!lua
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return id
"""

# Jobs waiting ahead of ARGV[1] (-1 when it is not queued). Members that no longer wait (cancelled,
# expired, dead-lettered while queued) are dropped on the way, at most ARGV[3] per call; their job
# hashes share the queue's slot (ARGV[2] is the job key prefix).
POSITION = """#!lua flags=allow-oom
if redis.call('HGET', KEYS[2], 'state') ~= 'queued' then return -1 end
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if not rank then return -1 end
local stale = {}
if rank > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, math.min(rank, tonumber(ARGV[3])) - 1)) do
    if redis.call('HGET', ARGV[2] .. id, 'state') ~= 'queued' then table.insert(stale, id) end
  end
end
if #stale > 0 then redis.call('ZREM', KEYS[1], unpack(stale)) end
return rank - #stale
"""

"""The Lua scripts of the Redis queue and the subject store: every state change that must be atomic.

Only SUBMIT and PUT are refused when Redis is at `maxmemory` (shebang scripts without `allow-oom`,
refused before any write); the worker-side scripts may run then, and FINISH deletes the job's
payload before it stores the result, so a full Redis drains itself.

The first key of every script that uses the library below is the queue's stream: the library
derives every other key from its hash tag (keys.py, `lua_names`), so a script reaches an owner's
counters or a job of the fair order in the queue's one Cluster slot. Three parts, one copy each:
- the byte budget (budget.py's twin): `count_bytes`, `budget_hold`, `budget_release`, `budget_purge`;
- the tenant-fair order (fair.py's twin, the same arithmetic on the same numbers): `start_tag`,
  `fair_add`, `fair_unqueue`, `cost_ahead`;
- the deadline admission's throughput (policy.py's twin): `rate_finished`, `seconds_per_cost`.
"""

from service.queue.keys import lua_names
from service.queue.policy import RATE_HALF_LIFE_S

_LIBRARY = (
    lua_names()
    + f"local RATE_HALF_LIFE_S = {RATE_HALF_LIFE_S!r}\n"
    + """
-- Numbers stored or compared by Redis are written with 17 significant digits (exact doubles).
local function num(x) return string.format('%.17g', x) end
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fields_of(flat)
  local fields = {}
  for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
  return fields
end
local function entry_of(msg)
  local entry = redis.call('XRANGE', KEYS[1], msg, msg)
  if #entry == 0 then return nil end
  return fields_of(entry[1][2])
end

-- Byte budget. An expiring holding is the member "<size>|<owner>|<tier>|<kind>|<id>" of `held`.
local function count_bytes(size, owner, tier, kind)
  redis.call('INCRBY', K(N.bytes), size)
  if kind == 'subject' or kind == 'tokens' then redis.call('HINCRBY', K(N.totals), kind, size) end
  if tier ~= '' then redis.call('HINCRBY', K(N.tiers), tier .. ':bytes', size) end
  if owner ~= '' and kind ~= 'tokens' then
    redis.call('HINCRBY', K(N.owner .. owner), kind == 'subject' and 'subjects' or 'bytes', size)
  end
end
local function parse_held(member)
  local size, owner, tier, kind, id = string.match(member, '^(%d+)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return tonumber(size), owner, tier, kind, id
end
-- An owner that holds nothing is forgotten, its finish tags with it (fair.py's `forget`).
local function owner_gc(owner)
  if owner == '' then return end
  local key = K(N.owner .. owner)
  local held = redis.call('HMGET', key, 'jobs', 'bytes', 'subjects')
  if tonumber(held[1] or '0') == 0 and tonumber(held[2] or '0') == 0 and tonumber(held[3] or '0') == 0 then
    redis.call('DEL', key)
  end
end
local function budget_hold(size, owner, tier, kind, id, expires)
  local member = size .. '|' .. owner .. '|' .. tier .. '|' .. kind .. '|' .. id
  redis.call('ZADD', K(N.held), num(expires), member)
  if kind == 'tokens' then redis.call('ZADD', K(N.token_expiry), num(expires), member) end
  count_bytes(size, owner, tier, kind)
  return member
end
local function forget_holding(member)
  local size, owner, tier, kind, id = parse_held(member)
  count_bytes(-size, owner, tier, kind)
  if kind == 'tokens' then
    redis.call('ZREM', K(N.token_expiry), member)
    redis.call('DEL', K(N.tokens .. id))
  elseif kind == 'subject' then
    redis.call('DEL', K(N.subject .. id))
  end
  owner_gc(owner)
end
local function budget_release(member)
  if redis.call('ZREM', K(N.held), member) == 1 then forget_holding(member) end
end
local function budget_purge(now)
  local expired = redis.call('ZRANGEBYSCORE', K(N.held), '-inf', num(now))
  if #expired == 0 then return end
  redis.call('ZREMRANGEBYSCORE', K(N.held), '-inf', num(now))
  for _, member in ipairs(expired) do forget_holding(member) end
end

-- Tenant-fair order: start-time fair queuing by cost, one sorted set per priority class.
local function start_tag(owner, class)
  local v = tonumber(redis.call('HGET', K(N.sched), 'v:' .. class) or '0')
  local f = tonumber(redis.call('HGET', K(N.owner .. owner), 'f:' .. class) or '0')
  return math.max(v, f)
end
local function fair_add(owner, class, cost, tag, member, now)
  if class == 'batch' and redis.call('ZCARD', K(N.ready .. 'batch')) == 0 then
    redis.call('HSET', K(N.sched), 'batch_at', num(now))
  end
  local okey = K(N.owner .. owner)
  redis.call('HINCRBYFLOAT', okey, 'q:' .. class, num(cost))
  redis.call('HINCRBY', okey, 'n:' .. class, 1)
  redis.call('HINCRBYFLOAT', K(N.sched), 'q:' .. class, num(cost))
  redis.call('ZADD', K(N.ready .. class), num(tag), member)
  redis.call('SADD', K(N.active .. class), owner)
end
-- After its member left `ready:<class>`.
local function fair_unqueue(owner, class, cost)
  local okey = K(N.owner .. owner)
  if redis.call('HINCRBY', okey, 'n:' .. class, -1) > 0 then
    redis.call('HINCRBYFLOAT', okey, 'q:' .. class, num(-cost))
  else
    redis.call('HDEL', okey, 'q:' .. class, 'n:' .. class)
    redis.call('SREM', K(N.active .. class), owner)
  end
  if redis.call('ZCARD', K(N.ready .. class)) > 0 then
    redis.call('HINCRBYFLOAT', K(N.sched), 'q:' .. class, num(-cost))
  else
    redis.call('HDEL', K(N.sched), 'q:' .. class)
  end
end
local function cost_ahead(owner, class, tag)
  local ahead = 0
  if class == 'batch' then ahead = tonumber(redis.call('HGET', K(N.sched), 'q:interactive') or '0') end
  for _, other in ipairs(redis.call('SMEMBERS', K(N.active .. class))) do
    local flow = redis.call('HMGET', K(N.owner .. other), 'q:' .. class, 'f:' .. class, 'w')
    local queued = tonumber(flow[1] or '0')
    if other == owner then
      ahead = ahead + queued
    else
      local due = queued - (tonumber(flow[2] or '0') - tag) * tonumber(flow[3] or '1')
      ahead = ahead + math.min(math.max(due, 0), queued)
    end
  end
  return ahead
end

-- Throughput: cost finished per busy second, both decayed.
local function rate_finished(now, cost)
  local rate = redis.call('HMGET', K(N.rate), 't', 'c', 'b')
  local elapsed = math.max(0, now - tonumber(rate[1] or num(now)))
  local decay = 0.5 ^ (elapsed / RATE_HALF_LIFE_S)
  redis.call('HSET', K(N.rate), 't', num(now), 'c', num(tonumber(rate[2] or '0') * decay + cost),
    'b', num(tonumber(rate[3] or '0') * decay + elapsed))
end
local function seconds_per_cost()
  local rate = redis.call('HMGET', K(N.rate), 'c', 'b')
  local cost = tonumber(rate[1] or '0')
  if cost > 0 then return tonumber(rate[2] or '0') / cost end
  return nil
end

-- The group's lag (XINFO GROUPS, what KEDA scales workers on) is the number of jobs waiting in
-- the fair order: the group's cursor is put just past the last entry this queue added (past, so
-- that deleting that entry leaves no tombstone at or after the cursor, which would make Redis
-- report no lag), with the read counter at entries added minus jobs waiting. `sched` tracks the
-- entries added and the last id (TAKE reads them from XINFO STREAM once, and again whenever
-- entries it did not add appear).
local function added_entry(msg)
  if redis.call('HEXISTS', K(N.sched), 'added') == 1 then
    redis.call('HINCRBY', K(N.sched), 'added', 1)
    redis.call('HSET', K(N.sched), 'last', msg)
  end
end
local function count_entries()
  local info = fields_of(redis.call('XINFO', 'STREAM', KEYS[1]))
  redis.call('HSET', K(N.sched), 'added', info['entries-added'], 'last', info['last-generated-id'])
end
local function sync_lag()
  local tracked = redis.call('HMGET', K(N.sched), 'added', 'last')
  if not tracked[1] then return end
  local waiting = redis.call('ZCARD', K(N.ready .. 'interactive'))
    + redis.call('ZCARD', K(N.ready .. 'batch'))
  local ms, seq = string.match(tracked[2], '^(%d+)-(%d+)$')
  local past = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  redis.call('XGROUP', 'SETID', KEYS[1], GROUP, past, 'ENTRIESREAD', tonumber(tracked[1]) - waiting)
end

-- Deliveries. drop_entry: acknowledge and delete a message; its job's payload bytes and its
-- owner's unfinished job and cost are given back. holder: the consumer holding delivery `msg`.
local function drop_entry(group, msg)
  redis.call('XACK', KEYS[1], group, msg)
  local f = entry_of(msg)
  if not f then return end
  if f.size then count_bytes(-tonumber(f.size), f.owner or '', f.tier or '', 'job') end
  if f.owner then
    local okey = K(N.owner .. f.owner)
    if redis.call('HINCRBY', okey, 'jobs', -1) > 0 then
      redis.call('HINCRBYFLOAT', okey, 'cost', num(-tonumber(f.cost)))
    else
      redis.call('HDEL', okey, 'cost')
    end
    redis.call('HINCRBY', K(N.tiers), f.tier .. ':jobs', -1)
  end
  redis.call('XDEL', KEYS[1], msg)
end
local function holder(group, msg)
  local pending = redis.call('XPENDING', KEYS[1], group, msg, msg, 1)
  return #pending == 1 and pending[1][2]
end
local function owns(group, msg, worker)
  return holder(group, msg) == worker
end
-- The record of a job that ended: kept for `ttl`, its bytes (result or none) in the budget.
local function hold_record(job_id, size, f, now, ttl)
  if f and f.owner then budget_hold(size, f.owner, f.tier, 'result', job_id, now + ttl)
  elseif size > 0 then budget_hold(size, '', '', 'result', job_id, now + ttl) end
end

-- The webhook of a job that just reached `state`, when its meta asks for that event (the events
-- of service/webhooks/events.py): its outbox hash (with the owner, whose deliveries in flight are
-- capped) and due time are written by the script that stores the terminal state, so no finished
-- job misses its webhook (service/webhooks/outbox.py).
local WEBHOOK_EVENTS = {done = 'job.completed', failed = 'job.failed', expired = 'job.failed',
  cancelled = 'job.cancelled'}
local function schedule_webhook(job_id, state, ttl)
  local hook_key = K(N.webhook .. job_id)
  local ok, meta = pcall(cjson.decode, redis.call('HGET', K(N.job .. job_id), 'meta') or '')
  if not ok or type(meta) ~= 'table' or type(meta.webhook) ~= 'table' then return end
  for _, wanted in ipairs(meta.webhook.events) do
    if wanted == WEBHOOK_EVENTS[state] and redis.call('EXISTS', hook_key) == 0 then
      local owner = type(meta.owner) == 'string' and meta.owner or ''
      redis.call('HSET', hook_key, 'url', meta.webhook.url, 'event', wanted, 'state', 'pending',
        'attempts', 0, 'owner', owner)
      redis.call('EXPIRE', hook_key, ttl)
      redis.call('ZADD', K(N.webhooks_due), num(now_s()), job_id)
      return
    end
  end
end
"""
)


def _script(flags: str, body: str) -> str:
    return f"#!lua{flags}\n" + _LIBRARY + body


GROUP_CREATE = """#!lua flags=allow-oom
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(reply) == 'table' and reply.err and not string.find(reply.err, 'BUSYGROUP') then return reply end
return 1
"""

# No allow-oom: at maxmemory Redis refuses it before any write. ARGV: 1 max depth, 2 max bytes,
# 3 job id, 4 meta, 5 record TTL, 6 payload size, 7 owner, 8 tier, 9 class, 10 weight, 11 cost,
# 12-14 the owner's quota (jobs, bytes, cost), 15 deadline, 16 deadline admission (1/0),
# 17 idempotency key ('' = none), then the message's fields. The quota and admission checks are
# policy.py's `quota_refusal` and `deadline_refusal`; their replies carry what they compared.
SUBMIT = _script(
    "",
    """
local job_id, owner, tier, class = ARGV[3], ARGV[7], ARGV[8], ARGV[9]
local size, weight, cost = tonumber(ARGV[6]), tonumber(ARGV[10]), tonumber(ARGV[11])
local idem = ARGV[17] ~= '' and K(N.idem .. ARGV[17])
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {'existing', existing} end
end
local now = now_s()
budget_purge(now)
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', tostring(depth)} end
local held = tonumber(redis.call('GET', K(N.bytes)) or '0')
if held + size > tonumber(ARGV[2]) then return {'bytes', tostring(held)} end
local okey = K(N.owner .. owner)
local usage = redis.call('HMGET', okey, 'jobs', 'bytes', 'cost')
local jobs, bytes, inflight = tonumber(usage[1] or '0'), tonumber(usage[2] or '0'), tonumber(usage[3] or '0')
if jobs + 1 > tonumber(ARGV[12]) or bytes + size > tonumber(ARGV[13])
    or inflight + cost > tonumber(ARGV[14]) then
  return {'quota', tostring(jobs), tostring(bytes), num(inflight)}
end
local tag = start_tag(owner, class)
if ARGV[16] == '1' then
  local rate = seconds_per_cost()
  local ahead = cost_ahead(owner, class, tag)
  if rate and ahead > 0 and now + (ahead + cost) * rate > tonumber(ARGV[15]) then
    return {'deadline', num(ahead), num(rate), num(now)}
  end
end
if depth == 0 then redis.call('HSET', K(N.rate), 't', num(now)) end
local seq = redis.call('HINCRBY', K(N.sched), 'seq', 1)
local msg = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 18))
added_entry(msg)
local member = string.format('%015d', seq) .. ':' .. job_id .. ':' .. msg
count_bytes(size, owner, tier, 'job')
redis.call('HINCRBY', okey, 'jobs', 1)
redis.call('HINCRBYFLOAT', okey, 'cost', num(cost))
redis.call('HSET', okey, 'f:' .. class, num(tag + cost / weight), 'w', num(weight))
redis.call('HINCRBY', K(N.tiers), tier .. ':jobs', 1)
fair_add(owner, class, cost, tag, member, now)
redis.call('HSET', K(N.job .. job_id), 'state', 'queued', 'meta', ARGV[4], 'msg', msg, 'member', member,
  'class', class, 'tag', num(tag))
redis.call('EXPIRE', K(N.job .. job_id), ARGV[5])
if idem then redis.call('SET', idem, job_id, 'EX', ARGV[5]) end
redis.call('XADD', K(N.arrivals), 'MAXLEN', '~', 64, '*', 'job', job_id)
return {'new', msg}
""",
)

# Hands out up to ARGV[3] jobs to consumer ARGV[2] of group ARGV[1]: first messages no order
# knows (written by another version, or by hand: delivered so the worker dead-letters them), then
# the head of the fair order, batch only when no interactive job waits or ARGV[4] seconds after
# the last batch job was taken. A chosen message is delivered with XREADGROUP after moving the
# group's cursor just before it (the group's cursor means nothing else here: every delivery is
# made by this script), so it enters the consumer's pending list like any delivery: heartbeats,
# reclaim (XAUTOCLAIM), fencing and dead letters work as before. Returns the deliveries and the
# newest id of the arrivals stream (a taker that got nothing blocks on it from there).
TAKE = _script(
    " flags=allow-oom",
    """
local group, worker, wanted, batch_wait = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
local function deliver(msg)
  local before = redis.call('XREVRANGE', KEYS[1], '(' .. msg, '-', 'COUNT', 1)
  redis.call('XGROUP', 'SETID', KEYS[1], group, #before > 0 and before[1][1] or '0-0')
  local read = redis.call('XREADGROUP', 'GROUP', group, worker, 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if read and read[1] and read[1][2][1] then table.insert(out, read[1][2][1]) end
end
local function ordered(id, fields)
  local f = fields_of(fields)
  if not f.id then return false end
  local job = redis.call('HMGET', K(N.job .. f.id), 'msg', 'member', 'class')
  return job[1] == id and job[2] and redis.call('ZSCORE', K(N.ready .. job[3]), job[2]) ~= false
end
local known = redis.call('XPENDING', KEYS[1], group)[1] + redis.call('ZCARD', K(N.ready .. 'interactive'))
  + redis.call('ZCARD', K(N.ready .. 'batch'))
local strays = redis.call('XLEN', KEYS[1]) - known
local counted = strays > 0 or redis.call('HEXISTS', K(N.sched), 'added') == 0
if counted then count_entries() end
local cursor, scanned = '-', 0
while strays > 0 and #out < wanted and scanned < 1000 do
  local page = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', 100)
  if #page == 0 then break end
  for _, entry in ipairs(page) do
    scanned = scanned + 1
    cursor = '(' .. entry[1]
    if #out < wanted and #redis.call('XPENDING', KEYS[1], group, entry[1], entry[1], 1) == 0
        and not ordered(entry[1], entry[2]) then
      deliver(entry[1])
      strays = strays - 1
    end
  end
end
local now = now_s()
while #out < wanted do
  local interactive = redis.call('ZCARD', K(N.ready .. 'interactive'))
  local batch = redis.call('ZCARD', K(N.ready .. 'batch'))
  local class
  local batch_at = tonumber(redis.call('HGET', K(N.sched), 'batch_at') or '0')
  if batch > 0 and (interactive == 0 or now - batch_at >= batch_wait) then
    class = 'batch'
  elseif interactive > 0 then
    class = 'interactive'
  else
    break
  end
  local head = redis.call('ZRANGE', K(N.ready .. class), 0, 0, 'WITHSCORES')
  redis.call('ZREM', K(N.ready .. class), head[1])
  local msg = string.match(head[1], '^%d+:[^:]+:(.+)$')
  local f = entry_of(msg)
  if f then fair_unqueue(f.owner, class, tonumber(f.cost)) end
  local virtual = tonumber(redis.call('HGET', K(N.sched), 'v:' .. class) or '0')
  redis.call('HSET', K(N.sched), 'v:' .. class, num(math.max(virtual, tonumber(head[2]))))
  if class == 'batch' then redis.call('HSET', K(N.sched), 'batch_at', num(now)) end
  if f then deliver(msg) end
end
if counted or #out > 0 then sync_lag() end
local newest = redis.call('XREVRANGE', K(N.arrivals), '+', '-', 'COUNT', 1)
return {out, #newest > 0 and newest[1][1] or '0-0'}
""",
)

# ARGV: group, message, worker, job id. Returns the new fencing token, 0 when the job ended
# (cancelled, finished: delivery dropped), -1 when another worker holds the delivery now.
START = _script(
    " flags=allow-oom",
    """
local held_by = holder(ARGV[1], ARGV[2])
if not held_by then return 0 end
if held_by ~= ARGV[3] then return -1 end
local job = K(N.job .. ARGV[4])
local state = redis.call('HGET', job, 'state')
if state == 'queued' or state == 'running' then
  local fence = redis.call('HINCRBY', job, 'fence', 1)
  redis.call('HSET', job, 'state', 'running', 'worker', ARGV[3])
  return fence
end
drop_entry(ARGV[1], ARGV[2])
return 0
""",
)

# Stores the terminal record unless another worker took the job over (then returns 0). ARGV:
# group, message, worker, fence, state, error, result document, result TTL, job id, result size,
# then the result's fields. A done job's cost counts in the measured throughput.
FINISH = _script(
    " flags=allow-oom",
    """
if not owns(ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local job = K(N.job .. ARGV[9])
local state = redis.call('HGET', job, 'state')
if state == 'running' and redis.call('HGET', job, 'fence') ~= ARGV[4] then return 0 end
local f = entry_of(ARGV[2])
local now = now_s()
if f and f.cost then rate_finished(now, ARGV[5] == 'done' and tonumber(f.cost) or 0) end
drop_entry(ARGV[1], ARGV[2])
redis.call('HSET', job, 'state', ARGV[5], 'worker', ARGV[3], 'error', ARGV[6], 'result', ARGV[7],
  unpack(ARGV, 11))
redis.call('EXPIRE', job, ARGV[8])
schedule_webhook(ARGV[9], ARGV[5], ARGV[8])
hold_record(ARGV[9], tonumber(ARGV[10]), f, now, tonumber(ARGV[8]))
redis.call('PUBLISH', K(N.channel), ARGV[9])
return 1
""",
)

# ARGV: group, record TTL, job id. A queued job leaves the fair order (or, taken by a worker that
# has not started it, that worker skips it at start).
CANCEL = _script(
    " flags=allow-oom",
    """
local job = K(N.job .. ARGV[3])
local state = redis.call('HGET', job, 'state')
if state ~= 'queued' then return state end
local record = redis.call('HMGET', job, 'msg', 'member', 'class')
local f = entry_of(record[1])
redis.call('HSET', job, 'state', 'cancelled')
redis.call('EXPIRE', job, ARGV[2])
schedule_webhook(ARGV[3], 'cancelled', ARGV[2])
if record[2] and redis.call('ZREM', K(N.ready .. record[3]), record[2]) == 1 and f then
  fair_unqueue(f.owner, record[3], tonumber(f.cost))
end
drop_entry(ARGV[1], record[1])
hold_record(ARGV[3], 0, f, now_s(), tonumber(ARGV[2]))
sync_lag()
redis.call('PUBLISH', K(N.channel), ARGV[3])
return 'cancelled'
""",
)

# ARGV: group, message, worker, job id. Re-queues our delivery of an unfinished job as a new
# message (same fields) in its place of the fair order (its sequence and start tag); a finished
# job's delivery is only dropped.
RELEASE = _script(
    " flags=allow-oom",
    """
if not owns(ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local job = K(N.job .. ARGV[4])
local state = redis.call('HGET', job, 'state')
if state ~= 'queued' and state ~= 'running' then
  drop_entry(ARGV[1], ARGV[2])
  return 0
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #entry == 0 then return 0 end
local msg = redis.call('XADD', KEYS[1], '*', unpack(entry[1][2]))
added_entry(msg)
redis.call('XDEL', KEYS[1], ARGV[2])
local place = redis.call('HMGET', job, 'member', 'class', 'tag')
local f = fields_of(entry[1][2])
redis.call('HSET', job, 'state', 'queued', 'worker', '', 'msg', msg)
if place[1] and f.owner then
  local member = string.match(place[1], '^(%d+:[^:]+:)') .. msg
  redis.call('HSET', job, 'member', member)
  fair_add(f.owner, place[2], tonumber(f.cost), tonumber(place[3]), member, now_s())
end
redis.call('XADD', K(N.arrivals), 'MAXLEN', '~', 64, '*', 'job', ARGV[4])
return 1
""",
)

# Presence, and keeps our own deliveries from being reclaimed; returns the ones another worker took.
HEARTBEAT = _script(
    " flags=allow-oom",
    """
local workers = K(N.workers)
if ARGV[4] == '1' then
  redis.call('ZADD', workers, ARGV[3], ARGV[2])
else
  redis.call('ZREM', workers, ARGV[2])
end
redis.call('ZREMRANGEBYSCORE', workers, '-inf', ARGV[5])
local lost = {}
for i = 6, #ARGV do
  local held_by = holder(ARGV[1], ARGV[i])
  if held_by == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  elseif held_by then
    table.insert(lost, ARGV[i])
  end
end
return lost
""",
)

# Moves an unreadable message to the dead-letter stream and fails its job (when ARGV[5] names one
# that is still queued or running). ARGV: group, message, dead letters kept, error, job id, record
# TTL, worker, then the dead letter's fields.
DEAD_LETTER = _script(
    " flags=allow-oom",
    """
if not owns(ARGV[1], ARGV[2], ARGV[7]) then return 0 end
local f = entry_of(ARGV[2])
drop_entry(ARGV[1], ARGV[2])
redis.call('XADD', K(N.dead), 'MAXLEN', ARGV[3], '*', unpack(ARGV, 8))
if ARGV[5] ~= '' then
  local job = K(N.job .. ARGV[5])
  local state = redis.call('HGET', job, 'state')
  if state == 'queued' or state == 'running' then
    redis.call('HSET', job, 'state', 'failed', 'error', ARGV[4])
    redis.call('EXPIRE', job, ARGV[6])
    schedule_webhook(ARGV[5], 'failed', ARGV[6])
    hold_record(ARGV[5], 0, f, now_s(), tonumber(ARGV[6]))
    redis.call('PUBLISH', K(N.channel), ARGV[5])
  end
end
return 1
""",
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

# Jobs the fair order hands out before ARGV[1] (a batch job: after every interactive one); 0 when
# a worker took it and has not started it; -1 when it is not queued.
POSITION = _script(
    " flags=no-writes,allow-oom",
    """
local job = redis.call('HMGET', K(N.job .. ARGV[1]), 'state', 'member', 'class')
if job[1] ~= 'queued' then return -1 end
local rank = job[2] and redis.call('ZRANK', K(N.ready .. job[3]), job[2])
if not rank then return 0 end
if job[3] == 'batch' then rank = rank + redis.call('ZCARD', K(N.ready .. 'interactive')) end
return rank
""",
)

# Stores a subject (ARGV[1] 'subject') or a feature key's tokens ('tokens') for the store's TTL.
# ARGV: kind, id, size, expiry (unix s), max bytes, subject budget, owner, tier, the owner's subject
# share, then the hash's fields. A value already held (a refresh) only moves its expiry. Subjects
# and tokens share the subject budget, tokens giving way (soonest expiry first: they are a cache)
# to a new subject that fits its owner's share. No allow-oom: at maxmemory Redis refuses it first.
PUT = _script(
    "",
    """
local kind, id, size, expires = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local owner, tier = ARGV[7], ARGV[8]
local data = K(N[kind] .. id)
local now = now_s()
budget_purge(now)
local previous = redis.call('HGET', data, 'held')
if previous and redis.call('ZSCORE', K(N.held), previous) then
  redis.call('ZADD', K(N.held), num(expires), previous)
  if kind == 'tokens' then redis.call('ZADD', K(N.token_expiry), num(expires), previous) end
else
  if kind == 'subject' then
    local mine = tonumber(redis.call('HGET', K(N.owner .. owner), 'subjects') or '0')
    local share = tonumber(ARGV[9])
    if share < tonumber(ARGV[6]) and mine + size > share then return {'key_subjects', tostring(mine)} end
  end
  local function used()
    local totals = redis.call('HMGET', K(N.totals), 'subject', 'tokens')
    return tonumber(totals[1] or '0') + tonumber(totals[2] or '0')
  end
  local function room()
    return used() + size <= tonumber(ARGV[6])
      and tonumber(redis.call('GET', K(N.bytes)) or '0') + size <= tonumber(ARGV[5])
  end
  while not room() do
    local soonest = kind == 'subject' and redis.call('ZRANGE', K(N.token_expiry), 0, 0)
    if not soonest or #soonest == 0 then
      if used() + size > tonumber(ARGV[6]) then return {'subjects', tostring(used())} end
      return {'bytes', redis.call('GET', K(N.bytes)) or '0'}
    end
    budget_release(soonest[1])
  end
  previous = budget_hold(size, kind == 'subject' and owner or '', tier, kind, id, expires)
end
redis.call('DEL', data)
redis.call('HSET', data, 'held', previous, 'size', size, unpack(ARGV, 10))
redis.call('PEXPIREAT', data, math.floor(expires * 1000))
return {'ok', ''}
""",
)

# ARGV: a subject's id. Removes it and its feature key's tokens; returns 1 when it existed.
DELETE = _script(
    " flags=allow-oom",
    """
local data = K(N.subject .. ARGV[1])
local fields = redis.call('HMGET', data, 'held', 'key')
if not fields[1] then return 0 end
budget_release(fields[1])
redis.call('DEL', data)
if fields[2] then
  local tokens = redis.call('HGET', K(N.tokens .. fields[2]), 'held')
  if tokens then budget_release(tokens) end
  redis.call('DEL', K(N.tokens .. fields[2]))
end
return 1
""",
)

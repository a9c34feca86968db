"""The Lua scripts behind the event log (see event_log.py for what each is for).

KEYS are always the job's meta hash, events stream, alive key and deadline key (in that
order; ``CREATE`` adds the watched key). Each script runs atomically, so the checks and
writes of one step cannot interleave with another gateway's or worker's.
"""

_FINALIZE = """
local function finalize(data, retention)
  redis.call('XADD', KEYS[2], '*', 'd', data, 'f', '1')
  redis.call('HSET', KEYS[1], 'final', '1', 'owner', '-')
  redis.call('EXPIRE', KEYS[1], retention)
  redis.call('EXPIRE', KEYS[2], retention)
  redis.call('DEL', KEYS[3], KEYS[4])
end
local function owned()
  local owner = redis.call('HGET', KEYS[1], 'owner')
  return owner and owner ~= ''
end
"""

# Meta hash fields: kind, request (JSON), owner ('' while waiting, the attempt's token while
# running, '-' once ended), started, published, final, requeues.

# KEYS: meta, events, alive, deadline, watched. ARGV: kind, request, queued event,
# queue timeout ms, ttl s, disconnect grace ms (0: none), the creating key's digest.
CREATE = """
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'request', ARGV[2], 'owner', '', 'key', ARGV[7])
local id = redis.call('XADD', KEYS[2], '*', 'd', ARGV[3])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
if ARGV[6] ~= '0' then redis.call('SET', KEYS[5], '1', 'PX', ARGV[6]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return id
"""

# KEYS: meta, events, alive, deadline.
# ARGV: owner, alive ms, started event, worker-lost error, no-worker error, retention s.
CLAIM = (
    _FINALIZE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 'final' end
if owned() then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 'busy' end
elseif redis.call('EXISTS', KEYS[4]) == 0 then
  finalize(ARGV[5], ARGV[6])
  return 'expired'
end
if redis.call('HEXISTS', KEYS[1], 'published') == 1 then
  finalize(ARGV[4], ARGV[6])
  return 'lost'
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'batch', '0')
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
if redis.call('HSETNX', KEYS[1], 'started', '1') == 1 then
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[3])
end
return 'run'
"""
)

# ARGV: owner, retention s, published ('1' or '0'), batch number, then (event, final)
# pairs. A batch number at or below the last one applied is a retry of a batch that did
# reach Redis (the reply was lost): it is acknowledged, not written twice.
APPEND = (
    _FINALIZE
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if tonumber(ARGV[4]) <= tonumber(redis.call('HGET', KEYS[1], 'batch') or '0') then return 1 end
redis.call('HSET', KEYS[1], 'batch', ARGV[4])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'published', '1') end
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '1' then
    finalize(ARGV[i], ARGV[2])
    return 1
  end
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[i])
end
return 1
"""
)

# An attempt that stops before any output hands the job back, to run again at once.
# ARGV: owner, queue timeout ms.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'published') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', '')
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
return 1
"""

# ARGV: error event, retention s. Returns 1 if it ended the job, 0 if ended before, -1 if gone.
END = (
    _FINALIZE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
finalize(ARGV[1], ARGV[2])
return 1
"""
)

# The watchdog's check of a job that has been silent. ARGV: worker-lost error, no-worker
# error, retention s, queue timeout ms. Returns 0 healthy or ended, -1 gone, 1 ended now
# (worker lost), 2 handed back to the queue (its worker died before any output: the caller
# enqueues it), 3 ended now (no worker started it in time).
CHECK = (
    _FINALIZE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
if owned() then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
  if redis.call('HEXISTS', KEYS[1], 'published') == 1 then
    finalize(ARGV[1], ARGV[3])
    return 1
  end
  redis.call('HSET', KEYS[1], 'owner', '')
  redis.call('HINCRBY', KEYS[1], 'requeues', 1)
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
  return 2
end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
finalize(ARGV[2], ARGV[3])
return 3
"""
)

"""The Lua scripts behind the event log (see event_log.py for what each is for).

KEYS are always the job's meta hash, events stream, alive key and deadline key (in that
order; most add more after them). Each script runs atomically, so the checks and
writes of one step cannot interleave with another gateway's or worker's.
"""

from . import keys

# Every write to a job's stream rings the doorbell (keys.ACTIVITY; gateway/relay.py).
_RING = f"""
local function ring()
  redis.call('XADD', '{keys.ACTIVITY}', 'MAXLEN', '~', '{keys.ACTIVITY_LEN}', '*', 'k', KEYS[2])
end
"""

_FINALIZE = (
    _RING
    + """
local function finalize(data, retention)
  redis.call('XADD', KEYS[2], '*', 'd', data, 'f', '1')
  ring()
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
)

# Meta hash fields: kind, request (JSON), key (digest of the creating API key), owner (''
# while waiting, the attempt's token while running, '-' once ended), batch (the owner's
# last applied append), started, published, final, requeues.

# KEYS: meta, events, alive, deadline, the waiting set, the running index, watched, arq's
# queue, the arq job's key. ARGV: owner, alive ms, started event, worker-lost error,
# no-worker error, retention s, the arq id the job came under (it leaves arq's queue and
# the waiting set, whatever the outcome: arq's own bookkeeping of a running job is this
# script's, see worker/pickup.py), when the heartbeat would lapse (ms), 'get' (check that
# a GET job still has a reader), the client-gone error.
# Returns {status} or, to run it, {'run', request}. A GET job whose readers all left
# while it waited ends here, before a single upstream token is paid for.
CLAIM = (
    _FINALIZE
    + """
redis.call('ZREM', KEYS[5], ARGV[7])
redis.call('ZREM', KEYS[8], ARGV[7])
redis.call('DEL', KEYS[9])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return {'final'} end
if owned() then
  if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy'} end
elseif redis.call('EXISTS', KEYS[4]) == 0 then
  finalize(ARGV[5], ARGV[6])
  return {'expired'}
end
if redis.call('HEXISTS', KEYS[1], 'published') == 1 then
  finalize(ARGV[4], ARGV[6])
  return {'lost'}
end
if ARGV[9] == 'get' and redis.call('HGET', KEYS[1], 'kind') == 'get'
    and redis.call('EXISTS', KEYS[7]) == 0 then
  finalize(ARGV[10], ARGV[6])
  return {'unwatched'}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'batch', '0')
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[8], KEYS[1]:match('{(.-)}'))
redis.call('DEL', KEYS[4])
if redis.call('HSETNX', KEYS[1], 'started', '1') == 1 then
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[3])
  ring()
end
return {'run', redis.call('HGET', KEYS[1], 'request')}
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
ring()
return 1
"""
)

# A job that produced no output goes back to the queue (its attempt stopped, or its worker
# died), unless it has been handed back too often already: a job that kills every worker
# must not run forever. Returns the number of hand-backs so far, or -1 if it ended it.
_HAND_BACK = """
local function hand_back(queue_timeout_ms, max_requeues, too_many, retention)
  local count = redis.call('HINCRBY', KEYS[1], 'requeues', 1)
  if count > tonumber(max_requeues) then
    finalize(too_many, retention)
    return -1
  end
  redis.call('HSET', KEYS[1], 'owner', '')
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[4], '1', 'PX', queue_timeout_ms)
  return count
end
"""

# Put a job on arq's queue (what arq's ``enqueue_job`` writes, without its WATCH round
# trips: our arq ids are never reused), count it as waiting and wake a worker, in the same
# step as the rest of the script: no crash in between can leave a job unqueued.
# KEYS 5-8: arq's job key, arq's queue, the waiting set, the wake list.
_QUEUE_AGAIN = """
local function queue_again(queue_timeout_ms, arq_id, payload, now_ms, wake_last, wake_entry)
  redis.call('PSETEX', KEYS[5], queue_timeout_ms, payload)
  redis.call('ZADD', KEYS[6], now_ms, arq_id)
  redis.call('ZADD', KEYS[7], now_ms, arq_id)
  redis.call('LPUSH', KEYS[8], wake_entry or arq_id)
  redis.call('LTRIM', KEYS[8], 0, wake_last)
end
"""

# An attempt that stops before any output (shutdown, job timeout) hands the job back and
# queues it for arq again, in one step: a worker shutting down may not get a second one.
# KEYS 5-8: arq's job key, arq's queue, the waiting set, the wake list.
# ARGV: owner, queue timeout ms, max requeues, too-many error, retention s, arq id,
# arq job payload, enqueue time ms, the wake list's last index.
# Returns 0 if it was not ours or had output, else as hand_back.
RELEASE = (
    _FINALIZE
    + _HAND_BACK
    + _QUEUE_AGAIN
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'published') == 1 then return 0 end
local count = hand_back(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if count > 0 then queue_again(ARGV[2], ARGV[6], ARGV[7], ARGV[8], ARGV[9]) end
return count
"""
)

# A new job, in one step: unless the queue is full, its stream with the ``queued`` event
# (its place in the queue filled in here), its meta hash, and its arq job, with a worker
# woken. KEYS 5-8 as for RELEASE, then watched. ARGV: kind, request, the queued event
# before and after its position, queue timeout ms, ttl s, disconnect grace ms (0: none),
# the creating key's digest, max queued jobs, now ms, arq id, arq job payload, the wake
# list's last index, the largest request the wake-up carries. The wake-up is the arq id,
# then, for a request up to that size, the time and the request, so that the worker that
# pops it can call the LLM while its claim is on its way (worker/pickup.py). Returns the
# job's place in the queue, or minus the jobs waiting when the queue is full (and writes
# nothing). The shebang makes Redis refuse the whole script
# when it is out of memory; without it, the pruning (a write that frees memory) would let
# the rest of the script through.
CREATE = (
    "#!lua\n"
    + _RING
    + _QUEUE_AGAIN
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', tonumber(ARGV[10]) - tonumber(ARGV[5]))
local waiting = redis.call('ZCARD', KEYS[7])
if waiting >= tonumber(ARGV[9]) then return -waiting end
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'request', ARGV[2], 'owner', '', 'key', ARGV[8])
redis.call('XADD', KEYS[2], '*', 'd', ARGV[3] .. (waiting + 1) .. ARGV[4])
ring()
redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
if ARGV[7] ~= '0' then redis.call('SET', KEYS[9], '1', 'PX', ARGV[7]) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
local wake_entry = ARGV[11]
if #ARGV[2] <= tonumber(ARGV[14]) then
  wake_entry = ARGV[11] .. ' ' .. ARGV[10] .. ' ' .. ARGV[2]
end
queue_again(ARGV[5], ARGV[11], ARGV[12], ARGV[10], ARGV[13], wake_entry)
return waiting + 1
"""
)

# ARGV: error event, retention s, the job id. Returns 1 if it ended the job (and told its
# worker, on keys.ENDED), 0 if ended before, -1 if gone.
END = (
    _FINALIZE
    + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
finalize(ARGV[1], ARGV[2])
redis.pcall('PUBLISH', '{keys.ENDED}', ARGV[3])  -- a Redis user without the channel: heartbeat
return 1
"""
)

# The watchdog's check of a job that has been silent. KEYS 5-8 as for RELEASE, then the
# workers index. ARGV: worker-lost error, no-worker error, retention s, queue timeout ms,
# max requeues, too-many error, arq id, arq job payload, enqueue time (now) ms, the wake
# list's last index. Returns 0 healthy (or already ended), -1 gone, 1 ended now (worker
# lost: it had output, or no worker is alive to run it again, so the client hears within
# WORKER_LOST_TIMEOUT_S), 2 handed back and queued again (its worker died before any
# output), 3 ended now (no worker started it in time), 4 ended now (handed back too often).
CHECK = (
    _FINALIZE
    + _HAND_BACK
    + _QUEUE_AGAIN
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
if owned() then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if redis.call('HEXISTS', KEYS[1], 'published') == 1
    or redis.call('ZCOUNT', KEYS[9], '(' .. now, '+inf') == 0 then
    finalize(ARGV[1], ARGV[3])
    return 1
  end
  if hand_back(ARGV[4], ARGV[5], ARGV[6], ARGV[3]) < 0 then return 4 end
  queue_again(ARGV[4], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
  return 2
end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
finalize(ARGV[2], ARGV[3])
return 3
"""
)

-- Streamgate's Redis Functions: every step of a job's life that must be atomic.
--
-- The state machine these functions implement is drawn in docs/architecture.md ("A job's
-- life"). functions.py loads this file as the library `streamgate_v<VERSION>` and names
-- each function `sg<VERSION>_<name>` (the `PREFIX` it prepends below), so processes of two
-- releases can share one Redis during a rolling upgrade. Python calls each through one
-- typed wrapper (event_log.py, heartbeat.py, sessions.py, ...).
--
-- Rules every function keeps:
-- * Every key it touches is declared in KEYS (Redis Cluster needs that), unpacked into named
--   locals at the top; ARGV likewise.
-- * Time is Redis's own (`TIME`): the hosts' clocks never meet in a comparison.
-- * A job's keys carry the hash tag {<job id>}; its meta hash holds its state:
--     owner     '' waiting, '<worker>:<hex>' the attempt running it, '-' ended
--     final     '1' once the final event is written (nothing follows it)
--     published '1' once the job streamed output (it never runs again)
--     batch     the owning attempt's last applied append (retries are not written twice)
--     last      the id of the stream's last entry (the doorbell tells what a write follows)
--     ended_by  the attempt whose append wrote the final event (its retry is acknowledged)
--     counted   '1' once the job's usage is counted (exactly once)
--     requeues  how often it was handed back; queued  when it was last queued (ms)
--     arq       the arq id it was last queued under (its waiting set member)
--     started, kind, request, key
-- * The running index holds one member per running attempt, '<job id> <owner>', scored
--   by when its heartbeat lapses: an attempt is alive while its score is ahead of Redis's
--   clock (no key per job: renewing thousands is one ZADD). The waiting set holds one
--   member per arq id queued, scored by when.

-- Doorbells kept (approximately): the last 10 s. By time, not by entries: one entry may name
-- a thousand streams. A gateway behind by more finds the streams on its 5 s sweep.
local ACTIVITY_KEEP_MS = 10000
local MANY_MAX = 1000 -- items one variadic command takes: Lua's unpack has a limit
local DAY_MS = 86400000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- sg:{<job id>}:meta, or in a Cluster's shard sg:{<tag>}:<job id>:meta
local function job_id_of(meta)
  return meta:match('^sg:{[^}]*}:([^:]+):meta$') or meta:match('{(.-)}')
end

local function attempt(job_id, owner)
  return job_id .. ' ' .. owner
end

local function owned_by(owner)
  return owner and owner ~= '' and owner ~= '-'
end

-- A job's keys, in the order every job function's KEYS start with.
local function job_keys(keys)
  return {
    meta = keys[1], events = keys[2], deadline = keys[3], activity = keys[4],
    running = keys[5],
  }
end

-- Every write to a job's stream rings the doorbell (gateway/relay.py) while it exists: a
-- gateway that follows it keeps it alive (a TTL it renews), and re-reads every stream
-- whenever it may have lapsed. Without one, the XADD would be Redis's costliest step of a
-- token for nobody. An entry names the streams written ('k' <stream>); the workers'
-- writes add what they wrote, so that a gateway delivers it from the doorbell alone,
-- reading a stream only to catch up (its key lookup and seek were most of a gateway's
-- reads): after 'k', 'p' <the stream's last entry before the write>, then per entry 'i'
-- <id>, 'd' <data> (and 'f' '1' after the final event's). A gateway delivers such a group
-- to each reader that has every entry up to 'p', and reads the stream for any other. One
-- entry holds every stream of a write: a write of many jobs rings once.
local GROUP_FIELDS_MAX = 4000 -- fields of one doorbell entry: Lua's unpack has a limit
local GROUP_BYTES_MAX = 65536 -- a write's data the doorbell copies, at most, per stream

-- Whether a gateway follows the doorbell: a write that finds none builds no group.
local function followed(activity)
  return redis.call('EXISTS', activity) == 1
end

-- `groups`: per stream its fields ('k' <stream>, then what the write added, if it says);
-- `now`: Redis's time, if the caller has read it; `known`: the caller found it followed.
local function ring_groups(activity, groups, now, known)
  if #groups == 0 or not (known or followed(activity)) then return end
  local min_id = (now or now_ms()) - ACTIVITY_KEEP_MS
  local fields = {}
  local function flush()
    if #fields > 0 then redis.call('XADD', activity, 'MINID', '~', min_id, '*', unpack(fields)) end
    fields = {}
  end
  for _, group in ipairs(groups) do
    local size = 0
    for i = 6, #group, 2 do size = size + #group[i] end
    if #group > GROUP_FIELDS_MAX or size > GROUP_BYTES_MAX then
      group = {group[1], group[2]} -- just its name: the gateways read the stream
    end
    if #fields + #group > GROUP_FIELDS_MAX then flush() end
    for _, value in ipairs(group) do fields[#fields + 1] = value end
  end
  flush()
end

-- A write that rings with the stream's name alone (the gateways read the stream).
local function ring(j, now)
  ring_groups(j.activity, {{'k', j.events}}, now)
end

-- A stream's doorbell group, to which its entries are added as they are written.
local function group_of(events, last)
  return {'k', events, 'p', last or ''}
end

local function add_entry(group, id, data)
  group[#group + 1] = 'i'
  group[#group + 1] = id
  group[#group + 1] = 'd'
  group[#group + 1] = data
end

-- Whether the job's attempt `owner` beats: its running index entry is ahead of `now`.
local function beating(j, owner, now)
  local lapses = redis.call('ZSCORE', j.running, attempt(job_id_of(j.meta), owner))
  return lapses and tonumber(lapses) > now
end

-- The running attempt, if any, leaves the running index: it no longer owns the job.
-- `owner`: the job's owner, if the caller has read it.
local function drop_attempt(j, owner)
  owner = owner or redis.call('HGET', j.meta, 'owner')
  if owned_by(owner) then redis.call('ZREM', j.running, attempt(job_id_of(j.meta), owner)) end
end

-- The one final event: nothing is written to the stream after it. `owner` as for
-- drop_attempt; `record`: more fields of the meta hash to set with it; `group`: the
-- doorbell group of the write it ends, if it carries one.
local function finalize(j, data, retention_s, owner, record, group)
  local id = redis.call('XADD', j.events, '*', 'd', data, 'f', '1')
  if group then
    add_entry(group, id, data)
    group[#group + 1] = 'f'
    group[#group + 1] = '1'
    ring_groups(j.activity, {group})
  else
    ring(j)
  end
  drop_attempt(j, owner)
  redis.call('HSET', j.meta, 'final', '1', 'owner', '-', unpack(record or {}))
  redis.call('EXPIRE', j.meta, retention_s)
  redis.call('EXPIRE', j.events, retention_s)
  redis.call('DEL', j.deadline)
end

-- A job's keys outlive whatever may still happen to it (a wait, a run, the retention).
local function extend(j, ttl_s)
  redis.call('EXPIRE', j.meta, ttl_s, 'GT')
  redis.call('EXPIRE', j.events, ttl_s, 'GT')
end

-- Put a job on arq's queue (what arq's enqueue_job writes, without its WATCH round trips:
-- our arq ids are never reused), count it as waiting (its meta hash, q.meta, says under
-- which id) and wake a worker.
local function queue_again(q, queue_timeout_ms, arq_id, payload, now, wake_last, wake_entry)
  redis.call('HSET', q.meta, 'arq', arq_id)
  redis.call('PSETEX', q.arq_job, queue_timeout_ms, payload)
  redis.call('ZADD', q.queue, now, arq_id)
  redis.call('ZADD', q.pending, now, arq_id)
  if redis.call('LPUSH', q.wake, wake_entry or arq_id) > tonumber(wake_last) + 1 then
    redis.call('LTRIM', q.wake, 0, wake_last)
  end
end

-- A job that produced no output goes back to the queue unless it was handed back too
-- often already: a job that kills every worker must not run forever. Returns the number of
-- hand-backs so far, or -1 if it ended the job.
local function hand_back(j, h, owner)
  local count = redis.call('HINCRBY', j.meta, 'requeues', 1)
  if count > tonumber(h.max_requeues) then
    finalize(j, h.too_many, h.retention_s, owner)
    return -1
  end
  drop_attempt(j, owner)
  redis.call('HSET', j.meta, 'owner', '', 'queued', now_ms())
  redis.call('SET', j.deadline, '1', 'PX', h.queue_timeout_ms)
  extend(j, h.queued_ttl_s)
  return count
end

local function register(name, callback, flags)
  redis.register_function{function_name = PREFIX .. name, callback = callback, flags = flags}
end

-- create: a new job, unless the queue is full: its meta hash, its stream with the
-- `queued` event (its place filled in here), its arq job, a worker woken. The wake-up is
-- the arq id, then, for a small request, the enqueue time and the request, so the worker
-- that pops it can call the LLM while its claim is on its way (worker/pickup.py).
-- Returns {the job's place in the queue, Redis's time}, or {minus the jobs waiting, ...}
-- (writing nothing). Jobs that waited past the queue timeout do not count: the janitor
-- ends them. ARGV[14], when not '0': the time (Redis's, ms) past which its gateway no
-- longer waits for the answer: a create that Redis runs later (it hung, and woke with the
-- create unread) writes nothing and returns {0, ...}, for its client was answered
-- otherwise (an error, or the job on another shard).
register('create', function(keys, args)
  local j = job_keys(keys)
  local pending, queue, wake, watched, arq_job = keys[6], keys[7], keys[8], keys[9], keys[10]
  local kind, request, queued_before, queued_after, queue_timeout_ms, ttl_s, watched_ms,
        key_digest, max_queued, arq_id, payload, wake_last, wake_request_max,
        answered_by = unpack(args)
  local now = now_ms()
  if answered_by ~= '0' and now > tonumber(answered_by) then return {0, now} end
  local waiting = redis.call('ZCOUNT', pending, '(' .. (now - tonumber(queue_timeout_ms)), '+inf')
  if waiting >= tonumber(max_queued) then return {-waiting, now} end
  local id = redis.call('XADD', j.events, '*', 'd', queued_before .. (waiting + 1) .. queued_after)
  redis.call('HSET', j.meta, 'kind', kind, 'request', request, 'owner', '', 'key', key_digest,
             'queued', now, 'last', id)
  ring(j, now)
  redis.call('SET', j.deadline, '1', 'PX', queue_timeout_ms)
  if watched_ms ~= '0' then redis.call('SET', watched, '1', 'PX', watched_ms) end
  redis.call('EXPIRE', j.meta, ttl_s)
  redis.call('EXPIRE', j.events, ttl_s)
  local wake_entry = arq_id
  if #request <= tonumber(wake_request_max) then
    wake_entry = arq_id .. ' ' .. now .. ' ' .. request
  end
  local q = {arq_job = arq_job, queue = queue, pending = pending, wake = wake, meta = j.meta}
  queue_again(q, queue_timeout_ms, arq_id, payload, now, wake_last, wake_entry)
  return {waiting + 1, now}
end)

-- claim: make an attempt the job's owner. The arq id it came under leaves arq's queue and
-- the waiting set whatever the outcome (arq's bookkeeping of a running job is ours, see
-- worker/pickup.py). Returns {status}, or {'run', request, when it was queued (ms), now
-- (ms), the digest of its API key}: the wait its trace shows is on Redis's clock. A job
-- that already streamed
-- output is never run again; a GET job whose readers all left while it waited ends here,
-- before a single upstream token is paid for.
register('claim', function(keys, args)
  local j = job_keys(keys)
  local pending, queue, watched, arq_job = keys[6], keys[7], keys[8], keys[9]
  local owner, alive_ms, started, worker_lost, no_worker, retention_s, queued_as,
        check_readers, client_gone, run_ttl_s = unpack(args)
  redis.call('ZREM', pending, queued_as)
  redis.call('ZREM', queue, queued_as)
  redis.call('DEL', arq_job)
  -- one read of its state (every job's meta hash has its kind, from create on)
  local kind, final, previous, published, was_started, request, queued, key = unpack(
    redis.call('HMGET', j.meta, 'kind', 'final', 'owner', 'published', 'started', 'request',
               'queued', 'key'))
  if not kind then return {'gone'} end
  if final then return {'final'} end
  local now = now_ms()
  if owned_by(previous) then
    if beating(j, previous, now) then return {'busy'} end
  elseif redis.call('EXISTS', j.deadline) == 0 then
    finalize(j, no_worker, retention_s, previous)
    return {'expired'}
  end
  if published then
    finalize(j, worker_lost, retention_s, previous)
    return {'lost'}
  end
  if check_readers == '1' and kind == 'get' and redis.call('EXISTS', watched) == 0 then
    finalize(j, client_gone, retention_s, previous)
    return {'unwatched'}
  end
  local job_id = job_id_of(j.meta)
  if owned_by(previous) then redis.call('ZREM', j.running, attempt(job_id, previous)) end
  if was_started then
    -- 'last' from the stream itself: an attempt of an older library may have written it
    local tail = redis.call('XREVRANGE', j.events, '+', '-', 'COUNT', 1)[1]
    redis.call('HSET', j.meta, 'owner', owner, 'batch', '0', 'last', tail and tail[1] or '')
  else
    local id = redis.call('XADD', j.events, '*', 'd', started)
    ring(j, now)
    redis.call('HSET', j.meta, 'owner', owner, 'batch', '0', 'started', '1', 'last', id)
  end
  redis.call('ZADD', j.running, now + tonumber(alive_ms), attempt(job_id, owner))
  redis.call('DEL', j.deadline)
  extend(j, run_ttl_s)
  return {'run', request, tonumber(queued) or now, now, key or ''}
end)

-- The job's token usage, counted once (meta 'counted') into its key's usage hash per day
-- (Redis's, UTC, as days since 1970) and model: fields '<day>|<model>|<figure>'. A job
-- whose upstream reported no usage counts as unknown, not as zero tokens.
local MAX_TOKENS = 9007199254740992 -- 2^53: a count HINCRBY and JSON both hold exactly

local function whole(text)
  local n = tonumber(text)
  return n ~= nil and n >= 0 and n <= MAX_TOKENS and n == math.floor(n)
end

local function count_usage(j, usage, model, prompt, completion, total, retention_s)
  if redis.call('HEXISTS', j.meta, 'counted') == 1 then return false end
  local prefix = math.floor(now_ms() / DAY_MS) .. '|' .. model .. '|'
  if prompt == '' then
    redis.call('HINCRBY', usage, prefix .. 'unknown_jobs', 1)
  else
    redis.call('HINCRBY', usage, prefix .. 'jobs', 1)
    redis.call('HINCRBY', usage, prefix .. 'prompt_tokens', prompt)
    redis.call('HINCRBY', usage, prefix .. 'completion_tokens', completion)
    redis.call('HINCRBY', usage, prefix .. 'total_tokens', total)
  end
  redis.call('EXPIRE', usage, retention_s)
  redis.call('HSET', j.meta, 'counted', '1') -- last: set only once the counts are in
  return true
end

-- append: a batch of the owning attempt's events. A batch number at or below the last one
-- applied is a retry of a batch whose reply was lost: acknowledged, not written twice.
-- A batch without the final event, by far the most common call (a token or two), needs
-- only KEYS meta, events, activity and ARGV owner, batch, published, then its events:
-- every key and argument less is work Redis does per token. A batch ending with the final
-- event has the job's five keys, then the session's turns (when ARGV[5], the turn, is not
-- empty: memory never holds a turn whose answer the client saw fail) and the usage hash
-- (when ARGV[8], the model, is not empty: counted exactly once), and ARGV 4-12 say what
-- goes with it (see below); its events start at ARGV[13] and the last one is final.
-- Returns 1 written (or a retry), 0 not this attempt's.

-- The owner check of an append: its answer if the batch is not to be written (1 a retry,
-- 0 not this attempt's), else nil and whether the job had output before.
local function fenced(meta, owner, batch)
  local state = redis.call('HMGET', meta, 'owner', 'batch', 'published', 'last')
  local applied = tonumber(state[2]) or 0
  if state[1] ~= owner then
    -- the retry of this attempt's own final batch (its reply was lost) is acknowledged
    local ours = redis.call('HGET', meta, 'ended_by') == owner
    return (ours and batch <= applied) and 1 or 0
  end
  if batch <= applied then return 1 end
  return nil, state[3], state[4]
end

-- What the meta hash records of a written batch (its number, as the caller sent it, that
-- the job has output, once, and the stream's last entry): set last, so that a batch that
-- failed midway is not taken for written by its retry.
local function applied(batch_arg, published, published_before, last_id)
  local record = {'batch', batch_arg}
  if published == '1' and not published_before then
    record[#record + 1] = 'published'
    record[#record + 1] = '1'
  end
  if last_id then
    record[#record + 1] = 'last'
    record[#record + 1] = last_id
  end
  return record
end

-- A batch's events (ARGV[first..last]) written under the attempt's fence: nil, what the
-- meta hash is to record of it once written and its doorbell group (if `rings`: the
-- doorbell is followed), else append's answer (1 a retry, 0 not this attempt's).
local function write_events(meta, events, owner, batch_arg, published, args, first, last, rings)
  local verdict, published_before, last_before = fenced(meta, owner, tonumber(batch_arg))
  if verdict then return verdict end
  local group, id = rings and group_of(events, last_before), nil
  for i = first, last do
    id = redis.call('XADD', events, '*', 'd', args[i])
    if group then add_entry(group, id, args[i]) end
  end
  return nil, applied(batch_arg, published, published_before, id), group
end

-- write_events, the record set at once: a batch without the final event. Returns nil and
-- its doorbell group once written (none if it had no events or `rings` is false), else
-- append's answer.
local function write_batch(meta, events, owner, batch_arg, published, args, first, last, rings)
  local verdict, record, group = write_events(meta, events, owner, batch_arg, published, args,
                                              first, last, rings)
  if verdict then return verdict end
  redis.call('HSET', meta, unpack(record))
  if last >= first then return nil, group end
end

register('append', function(keys, args)
  local final = #keys >= 5
  local meta, events = keys[1], keys[2]
  local owner, batch, published = args[1], args[2], args[3]
  local first = final and 13 or 4
  local retention_s, turn, max_turns, turns_retention_s, model, prompt, completion, total,
        usage_retention_s
  if final then
    retention_s, turn, max_turns, turns_retention_s, model, prompt, completion, total,
      usage_retention_s = unpack(args, 4, 12)
    if model ~= '' and prompt ~= '' and not (whole(prompt) and whole(completion) and whole(total)) then
      return redis.error_reply('usage figures must be whole numbers of tokens') -- before writes
    end
  end
  local last = #args - (final and 1 or 0)
  local activity = keys[final and 4 or 3]
  local rings = followed(activity)
  if not final then
    local verdict, group = write_batch(meta, events, owner, batch, published, args, first, last,
                                       rings)
    if verdict then return verdict end
    if group then ring_groups(activity, {group}, nil, true) end
    return 1
  end
  local verdict, record, group = write_events(meta, events, owner, batch, published, args, first,
                                              last, rings)
  if verdict then return verdict end
  -- Output is recorded at once: were a step below to fail, a job whose output was written
  -- must never run again.
  if published == '1' then redis.call('HSET', meta, 'published', '1') end
  local j = job_keys(keys) -- finalize rings for the batch
  if turn ~= '' then
    local turns = keys[6]
    redis.call('RPUSH', turns, turn)
    redis.call('LTRIM', turns, -tonumber(max_turns), -1)
    redis.call('EXPIRE', turns, turns_retention_s)
  end
  if model ~= '' then
    local usage = keys[turn ~= '' and 7 or 6]
    count_usage(j, usage, model, prompt, completion, total, usage_retention_s)
  end
  record[#record + 1] = 'ended_by'
  record[#record + 1] = owner
  finalize(j, args[#args], retention_s, owner, record, group)
  return 1
end)

-- append_each: the batches without a final event of many jobs of one shard, in one call
-- (a call costs Redis more than the few commands of a one-token batch), ringing the
-- doorbell once for them all. KEYS: the
-- doorbell, then each job's meta and events; ARGV per job: owner, batch, published, the
-- number of its events, its events. Returns per job what append does, or that job's
-- error alone (the others are written).
register('append_each', function(keys, args)
  local activity = keys[1]
  -- The whole call is checked before any write: a malformed one writes nothing.
  local a = 1
  for _ = 2, #keys, 2 do
    local count = tonumber(args[a + 3])
    if not count or count < 0 or count % 1 ~= 0 then a = #args + 2 break end
    a = a + 4 + count
  end
  if #keys % 2 ~= 1 or a ~= #args + 1 then
    return redis.error_reply('append_each: its keys and arguments do not match')
  end
  local rings = followed(activity)
  local results, groups = {}, {}
  a = 1
  for k = 2, #keys, 2 do
    local meta, events = keys[k], keys[k + 1]
    local owner, batch, published, count = args[a], args[a + 1], args[a + 2],
      tonumber(args[a + 3])
    local first, last = a + 4, a + 3 + count
    a = last + 1
    local ok, verdict, group = pcall(write_batch, meta, events, owner, batch, published, args,
                                     first, last, rings)
    if not ok then
      results[#results + 1] = {err = type(verdict) == 'table' and verdict.err or tostring(verdict)}
    elseif verdict then
      results[#results + 1] = verdict
    else
      results[#results + 1] = 1
      if group then groups[#groups + 1] = group end
    end
  end
  -- every job's events are written: a doorbell that fails (never, but for a key of the wrong
  -- type) is read on the gateways' sweep, rather than fail them all
  pcall(ring_groups, activity, groups, nil, rings)
  return results
end)

-- release: an attempt that stops before any output (shutdown) hands the job back and
-- queues it for arq again, in one step: a worker shutting down may not get a second one.
-- Returns 0 if it was not ours or had output, else as hand_back.
register('release', function(keys, args)
  local j = job_keys(keys)
  local q = {pending = keys[6], queue = keys[7], wake = keys[8], arq_job = keys[9], meta = j.meta}
  local owner, queue_timeout_ms, max_requeues, too_many, retention_s, queued_ttl_s, arq_id,
        payload, wake_last = unpack(args)
  local current, published = unpack(redis.call('HMGET', j.meta, 'owner', 'published'))
  if current ~= owner or published then return 0 end
  local count = hand_back(j, {
    max_requeues = max_requeues, too_many = too_many, retention_s = retention_s,
    queue_timeout_ms = queue_timeout_ms, queued_ttl_s = queued_ttl_s,
  }, owner)
  if count > 0 then queue_again(q, queue_timeout_ms, arq_id, payload, now_ms(), wake_last) end
  return count
end)

-- end: end a job from outside (a cancel) unless it has ended, and tell its worker on the
-- ended-jobs channel. A job still waiting leaves the waiting set (KEYS[6]) at once: the
-- queue's cap counts jobs that may still run. Returns 1 ended now, 0 ended before, -1
-- unknown.
register('end', function(keys, args)
  local j = job_keys(keys)
  local pending = keys[6]
  local error_event, retention_s, channel = unpack(args)
  local kind, final, owner, arq_id = unpack(
    redis.call('HMGET', j.meta, 'kind', 'final', 'owner', 'arq'))
  if not kind then return -1 end
  if final then return 0 end
  finalize(j, error_event, retention_s, owner)
  if owner == '' and arq_id then redis.call('ZREM', pending, arq_id) end
  -- pcall: a Redis user without the channel is told by the heartbeat instead
  redis.pcall('PUBLISH', channel, job_id_of(j.meta))
  return 1
end)

-- check: a gateway's look at a job it relays that has been silent, or that the janitor found
-- lapsed in the running index or late in the waiting set (ARGV names those members; each
-- leaves its index once the job no longer needs it there). Returns 0 healthy or already
-- ended, -1 unknown, 1 ended now (worker lost: it had output, or no worker is alive to run
-- it again), 2 handed back and queued again (its worker died before any output), 3 ended
-- now (no worker started it in time), 4 ended now (handed back too often).
register('check', function(keys, args)
  local j = job_keys(keys)
  local q = {pending = keys[6], queue = keys[7], wake = keys[8], arq_job = keys[9], meta = j.meta}
  local workers = keys[10]
  local worker_lost, no_worker, retention_s, queue_timeout_ms, max_requeues, too_many,
        queued_ttl_s, arq_id, payload, wake_last, running_member, pending_member = unpack(args)
  local function settled(result)
    if running_member ~= '' then redis.call('ZREM', j.running, running_member) end
    if pending_member ~= '' then redis.call('ZREM', q.pending, pending_member) end
    return result
  end
  local kind, final, owner, published = unpack(
    redis.call('HMGET', j.meta, 'kind', 'final', 'owner', 'published'))
  if not kind then return settled(-1) end
  if final then return settled(0) end
  if owned_by(owner) then
    if pending_member ~= '' then redis.call('ZREM', q.pending, pending_member) end
    local current = attempt(job_id_of(j.meta), owner)
    if running_member ~= '' and running_member ~= current then
      redis.call('ZREM', j.running, running_member) -- an attempt that has since ended
    end
    local now = now_ms()
    if beating(j, owner, now) then return 0 end
    if published or redis.call('ZCOUNT', workers, '(' .. now, '+inf') == 0 then
      finalize(j, worker_lost, retention_s, owner)
      return 1
    end
    local count = hand_back(j, {
      max_requeues = max_requeues, too_many = too_many, retention_s = retention_s,
      queue_timeout_ms = queue_timeout_ms, queued_ttl_s = queued_ttl_s,
    }, owner)
    if count < 0 then return 4 end
    queue_again(q, queue_timeout_ms, arq_id, payload, now, wake_last)
    return 2
  end
  if running_member ~= '' then redis.call('ZREM', j.running, running_member) end
  if redis.call('EXISTS', j.deadline) == 1 then return 0 end
  finalize(j, no_worker, retention_s, owner)
  return settled(3)
end)

-- due: the janitor's work, read on Redis's clock: running attempts whose heartbeat lapsed
-- and arq ids that waited past the queue timeout, at most `limit` of each.
register('due', function(keys, args)
  local running, pending = keys[1], keys[2]
  local limit, queue_timeout_ms = unpack(args)
  local now = now_ms()
  return {
    redis.call('ZRANGEBYSCORE', running, '-inf', now, 'LIMIT', 0, limit),
    redis.call('ZRANGEBYSCORE', pending, '-inf', now - tonumber(queue_timeout_ms), 'LIMIT', 0, limit),
  }
end, {'no-writes'})

-- beat: a worker's heartbeat. The worker counts as alive (KEYS[2], idle ones too); each
-- attempt it runs that still owns its job is renewed: its entry in the running index
-- (KEYS[1]), which the step that ends its ownership removes (finalize, hand_back, a
-- takeover). ARGV: alive ms, worker name, then the attempts' members ('<job id> <owner>').
-- Returns Redis's time (ms), then per attempt: 0 go on, 1 no longer this attempt's job.
-- Workers silent for a day leave the workers index. An attempt that exits still owning
-- its job (its final write failed) keeps its entry until it lapses, for the janitor to
-- end the job. (An attempt whose job's meta hash vanished while it ran, evicted or
-- deleted, keeps its entry too: its next append, which the meta hash fences, stops it.)
register('beat', function(keys, args)
  local running, workers = keys[1], keys[2]
  local now = now_ms()
  local lapses = tostring(now + tonumber(args[1])) -- formatted once, not per attempt
  redis.call('ZADD', workers, lapses, args[2])
  redis.call('ZREMRANGEBYSCORE', workers, '-inf', now - DAY_MS)
  local out = {now}
  for first = 3, #args, MANY_MAX do
    local last = math.min(first + MANY_MAX - 1, #args)
    local renewed = {}
    for i = first, last do
      renewed[#renewed + 1] = lapses
      renewed[#renewed + 1] = args[i]
    end
    -- Every entry present moves forward, so CH counts them all: the common case needs no
    -- read. Fewer (an attempt gone, or a second beat within a millisecond): ask which.
    local moved = redis.call('ZADD', running, 'XX', 'CH', unpack(renewed))
    local scores = moved < last - first + 1 and redis.call('ZMSCORE', running,
                                                           unpack(args, first, last))
    for i = first, last do
      out[#out + 1] = (scores and scores[i - first + 1] == false) and 1 or 0
    end
  end
  return out
end)

-- beating: per job in KEYS after the running index (its meta hash), 1 if an attempt owns
-- it and beats, else 0: a gateway's idle check leaves the ones that beat alone.
register('beating', function(keys)
  local now = now_ms()
  local out = {}
  for i = 2, #keys do
    local j = {meta = keys[i], running = keys[1]}
    local owner = redis.call('HGET', j.meta, 'owner')
    out[i - 1] = (owned_by(owner) and beating(j, owner, now)) and 1 or 0
  end
  return out
end, {'no-writes'})

-- watch: mark every job in KEYS (their watched keys) as read, for ARGV[1] ms: one call for
-- a thousand relayed jobs.
register('watch', function(keys, args)
  for _, key in ipairs(keys) do redis.call('SET', key, '1', 'PX', args[1]) end
  return #keys
end)

-- lease: hold KEYS[1] for ARGV[1] (a holder's name) for ARGV[2] ms, if free or already
-- its own. Returns 1 held, 0 held by another.
register('lease', function(keys, args)
  local holder = redis.call('GET', keys[1])
  if holder and holder ~= args[1] then return 0 end
  redis.call('SET', keys[1], args[1], 'PX', args[2])
  return 1
end)

-- take: one chat from a caller's sliding window (KEYS[1]), the chats of the last window,
-- one member each. ARGV: window ms, limit, a new member. Returns {1, 0} taken, or
-- {0, seconds until a chat leaves the window}.
register('take', function(keys, args)
  local window = keys[1]
  local window_ms, limit, member = tonumber(args[1]), tonumber(args[2]), args[3]
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', window, '-inf', now - window_ms)
  if redis.call('ZCARD', window) >= limit then
    local oldest = tonumber(redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')[2])
    return {0, math.ceil((oldest + window_ms - now) / 1000)}
  end
  redis.call('ZADD', window, now, member)
  redis.call('PEXPIRE', window, window_ms)
  return {1, 0}
end)

-- unlock: free a session (KEYS[1], its lock) held by job ARGV[1], once that job has ended
-- (KEYS[2], its meta hash, has its final event, or has expired): an attempt whose job was
-- handed back and queued again must not free the session of the run still to come.
-- Returns 1 if it did.
register('unlock', function(keys, args)
  local lock, meta = keys[1], keys[2]
  if redis.call('GET', lock) ~= args[1] then return 0 end
  if redis.call('EXISTS', meta) == 1 and redis.call('HEXISTS', meta, 'final') == 0 then
    return 0
  end
  return redis.call('DEL', lock)
end)

-- count_stopped: an attempt stopped from outside (its job cancelled mid-answer) counts the
-- job's usage, once, if the job has ended (a job handed back is counted by the run still to
-- come). KEYS: meta, the key's usage hash. ARGV: model, retention s, then prompt, completion
-- and total tokens ('' for unknown: a request was in flight). Returns 1 if this counted it.
register('count_stopped', function(keys, args)
  local j = {meta = keys[1]}
  local prompt, completion, total = args[3], args[4], args[5]
  if prompt ~= '' and not (whole(prompt) and whole(completion) and whole(total)) then
    return redis.error_reply('usage figures must be whole numbers of tokens')
  end
  if redis.call('HEXISTS', j.meta, 'final') == 0 then return 0 end
  return count_usage(j, keys[2], args[1], prompt, completion, total, args[2]) and 1 or 0
end)

-- refresh: give a session's lock, held by job ARGV[1], ARGV[2] s to live again.
register('refresh', function(keys, args)
  if redis.call('GET', keys[1]) == args[1] then return redis.call('EXPIRE', keys[1], args[2]) end
  return 0
end)

-- Authorize: check every policy of an agent and its ancestors, and reserve the
-- estimate on all of them, atomically (one script = one Redis round trip).
--
-- Every key shares one hash tag (the hierarchy's partition), so this runs on one
-- Redis Cluster slot.
--
-- Kept to the fewest and cheapest Redis calls (this script and finish.lua are most
-- of Redis's CPU): the reservation id's stem is derived from (agent, request id), so
-- its record doubles as the idempotency key; the record and the event metadata are
-- built by the service as single strings and stored as they came. The id's
-- generation (the time of the Authorize that made it) tells apart the reservations
-- of a request id used again after the done marker of its last one aged out.
--
-- KEYS[1] reservation key of the request (string: the live record "L...", or "D..."
--         once finished; one key for every reservation of the request id)
-- KEYS[2] expiry index    (zset: reservation id stem by expiry time, ms: one entry
--         per record, which names the reservation the record holds)
-- KEYS[3] outbox          (stream: events to relay to Kafka)
-- KEYS[3+i] counter of policy i (calendar: hash {s, r}; rolling: hash {s:<b>, r:<b>})
-- KEYS[#KEYS] the partition's budget-state marker (see below)
--
-- ARGV[1] now (ms)            ARGV[2] reservation id this request would make
--                             (<stem>_<generation>)      ARGV[3] amount (micros)
-- ARGV[4] expires at (ms)     ARGV[5] event metadata (JSON, copied into events; with
--                             "generation":"<ms>", which names the reservation)
-- ARGV[6] reservation record without its last line (the metadata, appended here)
-- ARGV[7] allow-event id      ARGV[8] deny-event id
-- ARGV[9] number of policies  ARGV[10] the request's reservation id stem
-- then 6 per policy: policy id, limit, mode ('c'|'r'), bucket (rolling), oldest
--                    counted bucket (rolling), counter expire-at (s, 0 = never)
--
-- Returns {'lost'} (the marker is missing: nothing read, nothing written) |
--         {'allow', used_1..used_n} | {'deny', index, used_1..used_n} |
--         {'dup', reservation id, used_1..used_n} |
--         {'finished', reservation id, done-marker line, used_1..used_n}
-- where used_i = spent + reserved of policy i before this request ('dup': now), and
-- the reservation id is the one the record holds (the stem and the generation in its
-- text; the stem alone for a record made before generations, or a tombstone).

-- Numbers reach Redis as strings: Lua would print large ones as 1e+15, so amounts are
-- passed through as the decimal text they arrived in.

-- The partition's budget state must be there. A Redis that lost its data (FLUSHALL,
-- a failover to an empty replica, a restart without persistence) has lost the
-- marker with the counters: deciding on the emptied counters would hand every
-- agent its whole budget back, so nothing is decided until `caracal budget
-- rebuild` has put the counters back from the ledger and the marker with them.
-- (MARKER_PRESENT: the group-commit script already found it, for this run.)
if not MARKER_PRESENT and redis.call('EXISTS', KEYS[#KEYS]) == 0 then
  return {'lost'}
end

local amount = tonumber(ARGV[3])
local npol = tonumber(ARGV[9])
local HDR, STRIDE = 10, 6

local used = {}
-- Calendar counters this request creates: only they need their EXPIREAT (it stays
-- with the key; only these scripts write budget counters, and none removes a TTL).
local fresh = {}
local deny = 0
for i = 1, npol do
  local b = HDR + (i - 1) * STRIDE
  local key = KEYS[3 + i]
  local u = 0
  if ARGV[b + 3] == 'c' then
    local v = redis.call('HMGET', key, 's', 'r')
    u = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
    fresh[i] = (not v[1]) and (not v[2])
  else
    -- Rolling window: sum the sub-buckets still in the window; drop older ones.
    local oldest = tonumber(ARGV[b + 5])
    local all = redis.call('HGETALL', key)
    local stale = {}
    for j = 1, #all, 2 do
      local bucket = tonumber(string.sub(all[j], 3))
      if bucket == nil or bucket < oldest then
        stale[#stale + 1] = all[j]
      else
        u = u + (tonumber(all[j + 1]) or 0)
      end
    end
    if #stale > 0 then
      redis.call('HDEL', key, unpack(stale))
    end
  end
  used[i] = u
  if deny == 0 and u + amount > tonumber(ARGV[b + 2]) then
    deny = i
  end
end

-- The request's record, if it has one. When every policy allows, the record is
-- written now, only if there is none (SET NX GET: one call both looks and writes;
-- a record already there is returned and left as it is).
local rec
if deny == 0 then
  rec = redis.call('SET', KEYS[1], ARGV[6] .. ARGV[5], 'NX', 'GET')
else
  rec = redis.call('GET', KEYS[1])
end

-- A retry of a request this agent already made. Live: its reservation stands;
-- report what is used now. Finished (settled, released, expired, or released by
-- request id before this Authorize arrived): refused, reserving nothing, with how
-- it ended; answering allow would give a client that reuses request ids a free call.
if rec then
  -- The reservation the record holds (made by an earlier Authorize of this request,
  -- at another time): its generation is in the record's text.
  local rid = ARGV[10]
  local gen = nil
  local at = string.find(rec, '"generation":"', 1, true)
  if at then gen = string.match(rec, '^(%d+)"', at + 14) end
  if gen then rid = rid .. '_' .. gen end
  local out = {'dup', rid}
  if string.sub(rec, 1, 1) == 'D' then
    local head = string.match(rec, '^[^\n]*')
    redis.call('XADD', KEYS[3], '*',
      'type', 'decision', 'kind', 'authorize', 'decision', 'deny', 'reason', 'request_finished',
      'event_id', ARGV[8], 'reservation_id', rid, 'amount', ARGV[3], 'at_ms', ARGV[1],
      'meta', ARGV[5])
    out = {'finished', rid, head}
  end
  for i = 1, npol do out[#out + 1] = used[i] end
  return out
end

if deny > 0 then
  redis.call('XADD', KEYS[3], '*',
    'type', 'decision', 'kind', 'authorize', 'decision', 'deny', 'reason', 'budget_exceeded',
    'event_id', ARGV[8], 'policy_id', ARGV[HDR + (deny - 1) * STRIDE + 1],
    'amount', ARGV[3], 'at_ms', ARGV[1], 'meta', ARGV[5])
  local out = {'deny', deny}
  for i = 1, npol do out[#out + 1] = used[i] end
  return out
end

for i = 1, npol do
  local b = HDR + (i - 1) * STRIDE
  local key = KEYS[3 + i]
  if ARGV[b + 3] == 'c' then
    redis.call('HINCRBY', key, 'r', ARGV[3])
    local expire_at = tonumber(ARGV[b + 6])
    if expire_at > 0 and fresh[i] then
      redis.call('EXPIREAT', key, expire_at)
    end
  else
    redis.call('HINCRBY', key, 'r:' .. ARGV[b + 4], ARGV[3])
  end
end

index_add(KEYS[2], ARGV[4], ARGV[10])
-- The allow event carries the record (without its metadata line, which the relay
-- appends from 'meta') and its expiry: `caracal budget rebuild` restores the
-- reservations still open from the decisions topic when Redis lost them
-- (admin/ledger/reopen.rs).
redis.call('XADD', KEYS[3], '*',
  'type', 'decision', 'kind', 'authorize', 'decision', 'allow', 'event_id', ARGV[7],
  'reservation_id', ARGV[2], 'amount', ARGV[3], 'at_ms', ARGV[1], 'meta', ARGV[5],
  'record', ARGV[6], 'expires_at_ms', ARGV[4])

local out = {'allow'}
for i = 1, npol do out[#out + 1] = used[i] end
return out

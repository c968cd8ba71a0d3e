-- Authorize: check every policy of an agent and its ancestors, and reserve the
-- estimate on all of them, atomically (one script = one Redis round trip).
--
-- Every key shares one hash tag (the hierarchy's partition), so this runs on one
-- Redis Cluster slot.
--
-- KEYS[1] request key      (idempotency: the stored answer of this request id)
-- KEYS[2] reservation key  (hash: the reservation record)
-- KEYS[3] expiry index     (zset: reservation id by expiry time, ms)
-- KEYS[4] outbox           (stream: events to relay to Kafka)
-- KEYS[4+i] counter of policy i (calendar: hash {s, r}; rolling: hash {s:<b>, r:<b>})
--
-- ARGV[1]  now (ms)              ARGV[2]  reservation id     ARGV[3] amount (micros)
-- ARGV[4]  expires at (ms)       ARGV[5]  request key TTL (s) ARGV[6] request id
-- ARGV[7]  agent id              ARGV[8]  root agent id       ARGV[9] currency
-- ARGV[10] provider              ARGV[11] model               ARGV[12] resource
-- ARGV[13] allow-event id        ARGV[14] deny-event id       ARGV[15] number of policies
-- then 9 per policy: policy id, owner agent id, limit, mode ('c'|'r'), bucket,
--                    oldest counted bucket (rolling), counter expire-at (s, 0 = never),
--                    bucket width (s, rolling), on expiry ('charge'|'release')
--
-- Returns {'dup', answer} | {'allow', used_1..used_n} | {'deny', index, used_1..used_n}
-- where used_i = spent + reserved of policy i before this request.

-- Numbers reach Redis as strings: Lua would print large ones as 1e+15, so amounts are
-- passed through as the decimal text they arrived in, or formatted with %d.
local existing = redis.call('GET', KEYS[1])
if existing then
  return {'dup', existing}
end

local amount = tonumber(ARGV[3])
local npol = tonumber(ARGV[15])
local HDR, STRIDE = 15, 9

local used = {}
local deny = 0
for i = 1, npol do
  local b = HDR + (i - 1) * STRIDE
  local key = KEYS[4 + i]
  local limit = tonumber(ARGV[b + 3])
  local u = 0
  if ARGV[b + 4] == 'c' then
    local v = redis.call('HMGET', key, 's', 'r')
    u = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  else
    -- Rolling window: sum the sub-buckets still in the window; drop older ones.
    local oldest = tonumber(ARGV[b + 6])
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
  if deny == 0 and u + amount > limit then
    deny = i
  end
end

if deny > 0 then
  local b = HDR + (deny - 1) * STRIDE
  redis.call('XADD', KEYS[4], '*',
    'type', 'decision', 'event_id', ARGV[14], 'kind', 'authorize', 'decision', 'deny',
    'reason', 'budget_exceeded', 'request_id', ARGV[6], 'agent_id', ARGV[7],
    'root_agent_id', ARGV[8], 'policy_id', ARGV[b + 1], 'reservation_id', '',
    'amount', ARGV[3], 'currency', ARGV[9], 'provider', ARGV[10], 'model', ARGV[11],
    'resource', ARGV[12], 'at_ms', ARGV[1])
  local out = {'deny', deny}
  for i = 1, npol do out[#out + 1] = used[i] end
  return out
end

local policies = {}
for i = 1, npol do
  local b = HDR + (i - 1) * STRIDE
  local key = KEYS[4 + i]
  local field = 'r'
  local sfield = 's'
  if ARGV[b + 4] ~= 'c' then
    field = 'r:' .. ARGV[b + 5]
    sfield = 's:' .. ARGV[b + 5]
  end
  redis.call('HINCRBY', key, field, ARGV[3])
  local expire_at = tonumber(ARGV[b + 7])
  if expire_at > 0 then
    redis.call('EXPIREAT', key, expire_at)
  end
  -- What finish.lua needs to undo or charge this reservation and to report the
  -- remaining budget: counter key and fields, policy, limit, and for rolling windows
  -- the bucket width (s) and how many older buckets are counted, and what expiry does.
  policies[i] = {key = key, r = field, s = sfield, id = ARGV[b + 1], limit = ARGV[b + 3],
    m = ARGV[b + 4], w = tonumber(ARGV[b + 8]), n = tonumber(ARGV[b + 5]) - tonumber(ARGV[b + 6]),
    e = ARGV[b + 9]}
end

redis.call('HSET', KEYS[2],
  'amount', ARGV[3], 'request_id', ARGV[6], 'agent_id', ARGV[7], 'root_agent_id', ARGV[8],
  'currency', ARGV[9], 'provider', ARGV[10], 'model', ARGV[11], 'resource', ARGV[12],
  'created_ms', ARGV[1], 'expires_ms', ARGV[4], 'policies', cjson.encode(policies))
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])

local out = {'allow'}
for i = 1, npol do out[#out + 1] = used[i] end
-- The answer a retry of this request id gets back: reservation id and the used
-- amounts it was computed from.
-- (cjson prints numbers with 14 digits: amounts are stored as %d strings.)
local used_text = {}
for i = 1, npol do used_text[i] = string.format('%d', used[i]) end
redis.call('SET', KEYS[1], cjson.encode({rid = ARGV[2], used = used_text}), 'EX', tonumber(ARGV[5]))

redis.call('XADD', KEYS[4], '*',
  'type', 'decision', 'event_id', ARGV[13], 'kind', 'authorize', 'decision', 'allow',
  'reason', '', 'request_id', ARGV[6], 'agent_id', ARGV[7], 'root_agent_id', ARGV[8],
  'policy_id', '', 'reservation_id', ARGV[2], 'amount', ARGV[3], 'currency', ARGV[9],
  'provider', ARGV[10], 'model', ARGV[11], 'resource', ARGV[12], 'at_ms', ARGV[1])
return out

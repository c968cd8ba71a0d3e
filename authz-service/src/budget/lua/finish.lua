-- Finish a reservation: settle (charge the actual cost), release (charge nothing),
-- or expire (each policy charges the reserved amount or releases it, as its
-- on-expiry setting said when the reservation was made).
-- Exactly once per reservation: the record is deleted and a "done" marker keeps the
-- answer for retries.
--
-- The counter keys are read from the reservation record; they carry the same hash
-- tag as the declared keys, so they live in the same Redis Cluster slot.
--
-- KEYS[1] reservation key   KEYS[2] expiry index   KEYS[3] outbox   KEYS[4] done marker
-- ARGV[1] mode: settle | release | expire
-- ARGV[2] now (ms)          ARGV[3] reservation id   ARGV[4] done-marker TTL (s)
-- ARGV[5] actual cost (settle; micros)  ARGV[6] event id
-- ARGV[7] input tokens  ARGV[8] output tokens  ARGV[9] cached input tokens
-- ARGV[10] price version  ARGV[11] release reason
--
-- Returns {'unknown'} | {'done', answer} |
--         {mode, reserved, charged, currency, then per policy: id, limit, used after}

local done = redis.call('GET', KEYS[4])
if done then
  return {'done', done}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end

local mode = ARGV[1]
local now_ms = tonumber(ARGV[2])
local rec = redis.call('HGETALL', KEYS[1])
local r = {}
for j = 1, #rec, 2 do r[rec[j]] = rec[j + 1] end
local amount = tonumber(r['amount'])
local policies = cjson.decode(r['policies'])

-- spent + reserved of a policy now (rolling: the buckets still in its window).
local function used_of(p)
  if p.m == 'c' then
    local v = redis.call('HMGET', p.key, 's', 'r')
    return (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  end
  local oldest = math.floor(now_ms / (1000 * p.w)) - p.n
  local all = redis.call('HGETALL', p.key)
  local u = 0
  for j = 1, #all, 2 do
    local bucket = tonumber(string.sub(all[j], 3))
    if bucket ~= nil and bucket >= oldest then u = u + (tonumber(all[j + 1]) or 0) end
  end
  return u
end

local charged = 0
local charged_ids = {}
local out = {mode, amount, 0, r['currency']}
for i, p in ipairs(policies) do
  redis.call('HINCRBY', p.key, p.r, string.format('%d', -amount))
  local charge = 0
  if mode == 'settle' then
    charge = tonumber(ARGV[5])
  elseif mode == 'expire' and p.e ~= 'release' then
    charge = amount
  end
  if charge > 0 then
    redis.call('HINCRBY', p.key, p.s, string.format('%d', charge))
    charged_ids[#charged_ids + 1] = p.id
    charged = charge
  end
  out[#out + 1] = p.id
  out[#out + 1] = p.limit
  out[#out + 1] = used_of(p)
end
if mode == 'settle' then charged = tonumber(ARGV[5]) end
out[3] = charged

redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])

local fields
if mode == 'settle' or charged > 0 then
  local kind = 'settle'
  if mode == 'expire' then kind = 'expire_charge' end
  fields = {'type', 'charge', 'kind', kind, 'reserved', r['amount'], 'charged', string.format('%d', charged),
    'input_tokens', ARGV[7], 'output_tokens', ARGV[8], 'cached_input_tokens', ARGV[9],
    'price_version', ARGV[10], 'policy_ids', table.concat(charged_ids, ',')}
else
  local kind = 'release'
  if mode == 'expire' then kind = 'expire_release' end
  fields = {'type', 'decision', 'kind', kind, 'decision', 'allow', 'reason', ARGV[11],
    'policy_id', '', 'amount', r['amount'], 'resource', r['resource'] or ''}
end
local common = {
  'event_id', ARGV[6], 'reservation_id', ARGV[3], 'request_id', r['request_id'],
  'agent_id', r['agent_id'], 'root_agent_id', r['root_agent_id'], 'currency', r['currency'],
  'provider', r['provider'], 'model', r['model'], 'at_ms', ARGV[2]
}
for _, f in ipairs(common) do fields[#fields + 1] = f end
redis.call('XADD', KEYS[3], '*', unpack(fields))

redis.call('SET', KEYS[4], cjson.encode({mode = mode, amount = r['amount'],
  charged = string.format('%d', charged), currency = r['currency']}),
  'EX', tonumber(ARGV[4]))
return out

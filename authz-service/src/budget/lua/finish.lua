-- Finish a reservation: settle (charge the actual cost), release (charge nothing),
-- or expire (each policy charges the reserved amount or releases it, as its
-- on-expiry setting said when the reservation was made).
-- Exactly once per reservation: the live record is replaced by a "done" marker that
-- keeps the answer for retries (and tells a retried Authorize the request is done).
--
-- The counter keys are read from the reservation record; they carry the same hash
-- tag as the declared keys, so they live in the same Redis Cluster slot.
--
-- KEYS[1] reservation key   KEYS[2] expiry index   KEYS[3] outbox
-- ARGV[1] mode: settle | release | expire
-- ARGV[2] now (ms)          ARGV[3] reservation id   ARGV[4] done-marker TTL (s)
-- ARGV[5] actual cost (settle; micros)  ARGV[6] event id
-- ARGV[7] input tokens  ARGV[8] output tokens  ARGV[9] cached input tokens
-- ARGV[10] price version  ARGV[11] release reason
--
-- The live record (built by the service, one line each, tab-separated):
--   L <amount> <currency> <number of policies>
--   per policy: <counter key> <policy id> <limit> <c|r> <bucket> <bucket width s>
--               <older buckets counted> <charge|release on expiry>
--   <event metadata (JSON)>
-- The done marker: D <mode> <reserved> <charged> <currency>
--
-- Returns {'unknown'} | {'done', marker} |
--         {mode, reserved, charged, currency, then per policy: id, limit, used after}

local rec = redis.call('GET', KEYS[1])
if not rec then
  -- Never made, or its marker aged out: make sure the sweeper stops visiting it.
  redis.call('ZREM', KEYS[2], ARGV[3])
  return {'unknown'}
end
if string.sub(rec, 1, 1) == 'D' then
  return {'done', rec}
end

local lines = {}
for line in string.gmatch(rec, '[^\n]+') do lines[#lines + 1] = line end
local amount_s, currency, npol_s = string.match(lines[1], '^L\t(%d+)\t([^\t]+)\t(%d+)$')
if not amount_s then
  return redis.error_reply('caracal: corrupt reservation record ' .. KEYS[1])
end
local npol = tonumber(npol_s)
local meta = lines[npol + 2] or '{}'

local mode = ARGV[1]
local now_ms = tonumber(ARGV[2])
local amount = tonumber(amount_s)
-- %d, not '-' .. amount_s: Redis refuses "-0" as an integer.
local minus = string.format('%d', -amount)
local charge_all = 0
if mode == 'settle' then charge_all = tonumber(ARGV[5]) end

local charged = 0
local charged_ids = {}
local out = {mode, amount, 0, currency}
for i = 1, npol do
  local key, id, limit, m, bucket, width, n, on_expiry = string.match(lines[i + 1],
    '^([^\t]+)\t([^\t]+)\t(%-?%d+)\t([cr])\t(%-?%d+)\t(%d+)\t(%d+)\t(%a+)$')
  if not key then
    return redis.error_reply('caracal: corrupt policy line in ' .. KEYS[1])
  end
  local rf, sf = 'r', 's'
  if m == 'r' then rf = 'r:' .. bucket; sf = 's:' .. bucket end
  local charge = charge_all
  if mode == 'expire' and on_expiry ~= 'release' then charge = amount end

  local r_after = redis.call('HINCRBY', key, rf, minus)
  local s_after = nil
  if charge > 0 then
    s_after = redis.call('HINCRBY', key, sf, string.format('%d', charge))
    charged_ids[#charged_ids + 1] = id
    charged = charge
  end
  -- spent + reserved of the policy now (rolling: the buckets still in its window).
  local u = 0
  if m == 'c' then
    if s_after == nil then s_after = tonumber(redis.call('HGET', key, 's')) or 0 end
    u = r_after + s_after
  else
    local oldest = math.floor(now_ms / (1000 * tonumber(width))) - tonumber(n)
    local all = redis.call('HGETALL', key)
    for j = 1, #all, 2 do
      local b = tonumber(string.sub(all[j], 3))
      if b ~= nil and b >= oldest then u = u + (tonumber(all[j + 1]) or 0) end
    end
  end
  out[#out + 1] = id
  out[#out + 1] = limit
  out[#out + 1] = u
end
if mode == 'settle' then charged = charge_all end
out[3] = charged
local charged_s = string.format('%d', charged)

redis.call('ZREM', KEYS[2], ARGV[3])
if mode == 'settle' or charged > 0 then
  local kind = 'settle'
  if mode == 'expire' then kind = 'expire_charge' end
  redis.call('XADD', KEYS[3], '*',
    'type', 'charge', 'kind', kind, 'event_id', ARGV[6], 'reservation_id', ARGV[3],
    'reserved', amount_s, 'charged', charged_s, 'input_tokens', ARGV[7],
    'output_tokens', ARGV[8], 'cached_input_tokens', ARGV[9], 'price_version', ARGV[10],
    'policy_ids', table.concat(charged_ids, ','), 'at_ms', ARGV[2], 'meta', meta)
else
  local kind = 'release'
  if mode == 'expire' then kind = 'expire_release' end
  redis.call('XADD', KEYS[3], '*',
    'type', 'decision', 'kind', kind, 'decision', 'allow', 'reason', ARGV[11],
    'event_id', ARGV[6], 'reservation_id', ARGV[3], 'amount', amount_s,
    'at_ms', ARGV[2], 'meta', meta)
end

redis.call('SET', KEYS[1], 'D\t' .. mode .. '\t' .. amount_s .. '\t' .. charged_s .. '\t' .. currency,
  'EX', tonumber(ARGV[4]))
return out

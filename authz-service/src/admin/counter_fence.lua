-- Retire budget counters an admin change stops using, atomically with the check
-- that they hold nothing (see admin/counters.rs for why).
--
-- Every key of one call shares one hash tag (one partition): one Redis Cluster slot.
--
-- KEYS[1..n]    counters to retire: each must hold no spend and no open reservation
--               in its current window; then each gets a fence, a reserved amount
--               larger than any limit, so a replica whose cache still has the old
--               configuration is refused on it instead of spending where the new
--               configuration will not look. The fence lives ARGV[3] seconds.
-- KEYS[n+1..]   counters to resume: a fence an earlier change left on them is removed
--               (the configuration uses them again).
--
-- ARGV[1] n     ARGV[2] fence amount (micros)   ARGV[3] fence TTL (s)
-- ARGV[4] name of the rolling fence field (a bucket newer than any real one)
-- then 2 per key: mode ('c'|'r'), then for a retired key the oldest counted bucket
-- (rolling; 0 for calendar), for a resumed key its normal expire-at (s, 0 = never).
--
-- Returns {'ok'} or {'busy', index, used}: retired counter `index` (1-based) holds
-- `used` micros (spent + reserved) in its current window; nothing was written.

local n = tonumber(ARGV[1])
local fence = tonumber(ARGV[2])
local fence_s = ARGV[2]
local ttl = tonumber(ARGV[3])
local fence_field = ARGV[4]
local HDR = 4

-- What a counter holds in its current window, its own fence excluded.
local function used(key, mode, oldest)
  if mode == 'c' then
    local v = redis.call('HMGET', key, 's', 'r')
    local r = tonumber(v[2]) or 0
    if r >= fence then r = r - fence end
    return (tonumber(v[1]) or 0) + r
  end
  local u = 0
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    if all[j] ~= fence_field then
      local bucket = tonumber(string.sub(all[j], 3))
      if bucket ~= nil and bucket >= oldest then
        u = u + (tonumber(all[j + 1]) or 0)
      end
    end
  end
  return u
end

for i = 1, n do
  local b = HDR + (i - 1) * 2
  local u = used(KEYS[i], ARGV[b + 1], tonumber(ARGV[b + 2]))
  if u ~= 0 then
    return {'busy', i, u}
  end
end

for i = 1, n do
  local b = HDR + (i - 1) * 2
  local key = KEYS[i]
  if ARGV[b + 1] == 'c' then
    local r = tonumber(redis.call('HGET', key, 'r')) or 0
    if r < fence then
      redis.call('HINCRBY', key, 'r', fence_s)
    end
  else
    redis.call('HSET', key, fence_field, fence_s)
  end
  -- The counter held nothing that counts: dropping it with the fence loses nothing.
  redis.call('EXPIRE', key, ttl)
end

for i = n + 1, #KEYS do
  local b = HDR + (i - 1) * 2
  local key = KEYS[i]
  if ARGV[b + 1] == 'c' then
    local r = tonumber(redis.call('HGET', key, 'r')) or 0
    if r >= fence then
      redis.call('HINCRBY', key, 'r', string.format('%d', -fence))
      local expire_at = tonumber(ARGV[b + 2])
      if expire_at > 0 then
        redis.call('EXPIREAT', key, expire_at)
      else
        redis.call('PERSIST', key)
      end
    end
  elseif redis.call('HDEL', key, fence_field) == 1 then
    redis.call('PERSIST', key)
  end
end

return {'ok'}

-- Finish a reservation: settle (charge the actual cost), release (charge nothing),
-- or expire (each policy charges the reserved amount or releases it, as its
-- on-expiry setting said when the reservation was made).
-- Exactly once per reservation: the live record is replaced by a "done" marker that
-- keeps the answer for retries (and tells a retried Authorize the request is done).
--
-- A Settle that arrives after expiry (a call longer than provisionalChargeExpiration)
-- is not dropped: the expire marker keeps the policy lines of the record, so the
-- late Settle charges, per policy, the actual cost minus what expiry charged there
-- (a negative difference refunds expiry's over-charge), on the same counters, once:
-- the marker then becomes a settle marker, and a retried Settle changes nothing.
--
-- The counter keys are read from the reservation record; they carry the same hash
-- tag as the declared keys, so they live in the same Redis Cluster slot.
--
-- Which reservation: KEYS[1] is the record of a request id (see authorize.lua), and a
-- request id used again after the marker of its last reservation aged out makes a
-- new reservation there. The caller names the reservation by its id, stem and
-- generation (ARGV[3], ARGV[6]); an id whose generation is not the record's is
-- 'unknown' (an id of an earlier reservation never finishes a later one). An id
-- without a generation (issued before generations existed, ReleaseByRequest's, or
-- the sweeper's: the expiry index holds stems, one entry per record, its score the
-- expiry of the reservation the record holds) names whatever the record holds.
-- Events carry the record's reservation id, and their event id is
-- `<reservation id>/<mode>`.
--
-- KEYS[1] reservation key   KEYS[2] expiry index   KEYS[3] outbox
-- KEYS[4] the partition's budget-state marker (missing: {'lost'}; see authorize.lua)
-- KEYS[5] the partition's parked finishes (hash: stem -> the call's arguments): a
--         Settle or Release that finds the marker missing is kept there, and
--         `caracal budget rebuild` applies it once the reservation is restored, so
--         a charge made while Redis was lost still lands (once: one entry per stem)
-- ARGV[1] mode: settle | release | expire
-- ARGV[2] now (ms)          ARGV[3] reservation id stem   ARGV[4] done-marker TTL (s)
-- ARGV[5] actual cost (settle; micros)
-- ARGV[6] generation the caller's reservation id names ('' = none)
-- ARGV[7] input tokens  ARGV[8] output tokens  ARGV[9] cached input tokens
-- ARGV[10] price version  ARGV[11] release reason
-- ARGV[12] currency: settle: the actual cost's ('' = unchecked), refused unless it is
--          the reservation's; release with ARGV[13] = '1': the tombstone's
-- ARGV[13] '1': a release that finds no record leaves a released tombstone, so an
--          Authorize of that request arriving later reserves nothing
--          (ReleaseByRequest after an Authorize that timed out, maybe before it ran)
--
-- The live record (built by the service, one line each, tab-separated):
--   L <amount> <currency> <number of policies>
--   per policy: <counter key> <policy id> <limit> <c|r> <bucket> <bucket width s>
--               <older buckets counted> <charge|release on expiry>
--   <event metadata (JSON; "generation":"<ms>" since generations exist)>
-- The done marker: D <mode> <reserved> <charged> <currency>
-- An expire marker goes on with the policy and metadata lines of the live record
-- (what a late Settle needs); a settle or release marker with the generation alone,
-- {"generation":"<ms>"} (a tombstone has none). Only the first line is ever
-- returned.
--
-- Returns {'lost'} | {'unknown'} | {'tombstone'} | {'done', first line of the marker} |
--         {'currency', reservation currency} (settle refused, nothing changed) |
--         {mode | 'late_settle', reserved, charged, currency,
--          then per policy: id, limit, used after}

-- A policy line, read in place from its first character (the position after it
-- is the last capture: the line must end there).
local POLICY_LINE = '^([^\t\n]+)\t([^\t\n]+)\t(%-?%d+)\t([cr])\t(%-?%d+)\t(%d+)\t(%d+)\t(%a+)()'

local stem, named = ARGV[3], ARGV[6]

-- (MARKER_PRESENT: the group-commit script already found it, for this run.)
if not MARKER_PRESENT and redis.call('EXISTS', KEYS[4]) == 0 then
  if ARGV[1] ~= 'expire' then
    -- mode, now, generation, cost, input, output, cached, price version, currency,
    -- tombstone, done-marker TTL, reason (last: free text).
    redis.call('HSET', KEYS[5], stem, table.concat({ARGV[1], ARGV[2], ARGV[6], ARGV[5],
      ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[12], ARGV[13], ARGV[4], ARGV[11]}, '\t'))
  end
  return {'lost'}
end

local rec = redis.call('GET', KEYS[1])
if not rec then
  -- Never made, or its marker aged out: make sure the sweeper stops visiting it.
  index_remove(KEYS[2], stem)
  if ARGV[1] == 'release' and ARGV[13] == '1' then
    redis.call('SET', KEYS[1], 'D\trelease\t0\t0\t' .. ARGV[12], 'EX', tonumber(ARGV[4]))
    return {'tombstone'}
  end
  return {'unknown'}
end

-- The record is read where it lies, never cut into lines: Lua hashes every byte
-- of every string it makes, and an unanchored pattern is tried at every position.
local gen = nil
local gen_at = string.find(rec, '"generation":"', 1, true)
if gen_at then gen = string.match(rec, '^(%d+)"', gen_at + 14) end
if named ~= '' and named ~= gen then
  -- Another reservation of the request id (the named one ended and its marker aged
  -- out), or a record that cannot confirm the generation: not the named one. The
  -- index entry, if any, is the record's reservation's: left alone.
  return {'unknown'}
end
local rid = stem
if gen then rid = stem .. '_' .. gen end

local mode = ARGV[1]
local now_ms = tonumber(ARGV[2])
local head = string.match(rec, '^[^\n]*')
local late = false
if string.sub(rec, 1, 1) == 'D' then
  if mode ~= 'settle' or string.sub(head, 1, 9) ~= 'D\texpire\t' or not string.find(rec, '\n') then
    -- Done already (a retry, or another way first): nothing for the sweeper here.
    index_remove(KEYS[2], stem)
    return {'done', head}
  end
  late = true
end

-- Line 2 on: the policy lines, then the event metadata.
local body = #head + 2
local amount_s, currency, npol
if late then
  amount_s, currency = string.match(head, '^D\texpire\t(%d+)\t%-?%d+\t([^\t]+)$')
  -- The expire marker's lines after its first: the policy lines and the metadata.
  npol = -1
  local p = body
  while p <= #rec do
    npol = npol + 1
    local e = string.find(rec, '\n', p, true)
    if not e then break end
    p = e + 1
  end
else
  local npol_s
  amount_s, currency, npol_s = string.match(head, '^L\t(%d+)\t([^\t]+)\t(%d+)$')
  npol = tonumber(npol_s)
end
if not amount_s or npol < 0 then
  return redis.error_reply('caracal: corrupt reservation record ' .. KEYS[1])
end
if mode == 'settle' and ARGV[12] ~= '' and ARGV[12] ~= currency then
  return {'currency', currency}
end
local amount = tonumber(amount_s)
local cost = 0
if mode == 'settle' then cost = tonumber(ARGV[5]) end

-- spent + reserved of a policy now (rolling: the buckets still in its window).
local function used_of(key, m, width, n)
  local u = 0
  if m == 'c' then
    local v = redis.call('HMGET', key, 's', 'r')
    u = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  else
    local oldest = math.floor(now_ms / (1000 * tonumber(width))) - tonumber(n)
    local all = redis.call('HGETALL', key)
    for j = 1, #all, 2 do
      local b = tonumber(string.sub(all[j], 3))
      if b ~= nil and b >= oldest then u = u + (tonumber(all[j + 1]) or 0) end
    end
  end
  return u
end

-- Validate every policy line before changing anything: a corrupt record must not
-- be half-finished.
local pols = {}
local at = body
for i = 1, npol do
  local key, id, limit, m, bucket, width, n, on_expiry, after = string.match(rec, POLICY_LINE, at)
  if not key or (after <= #rec and string.byte(rec, after) ~= 10) then
    return redis.error_reply('caracal: corrupt policy line in ' .. KEYS[1])
  end
  pols[i] = {key, id, limit, m, bucket, width, n, on_expiry}
  at = after + 1
end
-- The metadata line (the last; '{}' when a record has none).
local meta = '{}'
if at <= #rec then
  local e = string.find(rec, '\n', at, true)
  if e then meta = string.sub(rec, at, e - 1) else meta = string.sub(rec, at) end
  if meta == '' then meta = '{}' end
end

local out = {mode, amount, 0, currency}
local charged = 0
local charged_ids = {}

if late then
  -- The reserved amount left the 'r' fields at expiry; what expiry charged to a
  -- policy is in its spent field. Bring each policy's spent to the actual cost.
  out[1] = 'late_settle'
  for i = 1, npol do
    local key, id, limit, m, bucket, width, n, on_expiry = unpack(pols[i])
    local at_expiry = 0
    if on_expiry ~= 'release' then at_expiry = amount end
    local diff = cost - at_expiry
    -- Counters of a window that is over are left alone: a calendar counter whose
    -- key Redis already dropped (window end + grace passed) is not recreated (it
    -- would never expire, and nobody can spend in that window any more); a rolling
    -- bucket that left the window no longer counts (authorize.lua deletes it).
    local open
    if m == 'c' then
      open = redis.call('EXISTS', key) == 1
    else
      open = tonumber(bucket) >= math.floor(now_ms / (1000 * tonumber(width))) - tonumber(n)
    end
    if open and diff ~= 0 then
      local sf = 's'
      if m == 'r' then sf = 's:' .. bucket end
      redis.call('HINCRBY', key, sf, string.format('%d', diff))
    end
    charged_ids[#charged_ids + 1] = id
    out[#out + 1] = id
    out[#out + 1] = limit
    out[#out + 1] = open and used_of(key, m, width, n) or 0
  end
  charged = cost
else
  -- %d, not '-' .. amount_s: Redis refuses "-0" as an integer.
  local minus = string.format('%d', -amount)
  for i = 1, npol do
    local key, id, limit, m, bucket, width, n, on_expiry = unpack(pols[i])
    local rf, sf = 'r', 's'
    if m == 'r' then rf = 'r:' .. bucket; sf = 's:' .. bucket end
    local charge = cost
    if mode == 'expire' and on_expiry ~= 'release' then charge = amount end

    local r_after = redis.call('HINCRBY', key, rf, minus)
    local s_after = nil
    if charge > 0 then
      s_after = redis.call('HINCRBY', key, sf, string.format('%d', charge))
      charged_ids[#charged_ids + 1] = id
      charged = charge
    end
    local u
    if m == 'c' then
      -- The two fields are at hand: no third call on the hot path.
      if s_after == nil then s_after = tonumber(redis.call('HGET', key, 's')) or 0 end
      u = r_after + s_after
    else
      u = used_of(key, m, width, n)
    end
    out[#out + 1] = id
    out[#out + 1] = limit
    out[#out + 1] = u
  end
  if mode == 'settle' then charged = cost end
end
out[3] = charged
local charged_s = string.format('%d', charged)

local event_id = rid .. '/' .. mode
index_remove(KEYS[2], stem)
if mode == 'settle' or charged > 0 then
  -- A late settle's event carries the reservation's final charge (the actual
  -- cost): it supersedes the expire_charge event of the same reservation.
  local kind = 'settle'
  if late then kind = 'late_settle' elseif mode == 'expire' then kind = 'expire_charge' end
  redis.call('XADD', KEYS[3], '*',
    'type', 'charge', 'kind', kind, 'event_id', event_id, 'reservation_id', rid,
    'reserved', amount_s, 'charged', charged_s, 'input_tokens', ARGV[7],
    'output_tokens', ARGV[8], 'cached_input_tokens', ARGV[9], 'price_version', ARGV[10],
    'policy_ids', table.concat(charged_ids, ','), 'at_ms', ARGV[2], 'meta', meta)
else
  local kind = 'release'
  if mode == 'expire' then kind = 'expire_release' end
  redis.call('XADD', KEYS[3], '*',
    'type', 'decision', 'kind', kind, 'decision', 'allow', 'reason', ARGV[11],
    'event_id', event_id, 'reservation_id', rid, 'amount', amount_s,
    'at_ms', ARGV[2], 'meta', meta)
end

local marker = 'D\t' .. mode .. '\t' .. amount_s .. '\t' .. charged_s .. '\t' .. currency
if mode == 'expire' then
  -- Keep what a late Settle needs: the policy lines and the event metadata (which
  -- holds the generation).
  marker = marker .. string.sub(rec, #head + 1)
elseif gen then
  -- Keep the generation: a retry names this reservation, an older id does not.
  marker = marker .. '\n{"generation":"' .. gen .. '"}'
end
redis.call('SET', KEYS[1], marker, 'EX', tonumber(ARGV[4]))
return out


-- Group commit (store.rs, `Lane`): several calls of one partition in one script
-- run. Above this, the build put lua/batch_prelude.lua, then authorize.lua and
-- finish.lua as the bodies of `authorize(KEYS, ARGV, MARKER_PRESENT)` and
-- `finish(...)`; each call gets exactly the KEYS and ARGV it would get as a script
-- of its own, and is decided in arrival order with its own reply. A refusal is
-- that call's answer alone, and so is an error (as a script of its own, a call
-- that fails midway keeps what it wrote). The expiry index's writes of the run
-- are made at its end (see the prelude).
--
-- ARGV[1]   number of calls n
-- ARGV[2..] per call: script ('a' authorize | 'f' finish), its number of keys,
--           its number of arguments (3 each)
-- then every call's arguments, call after call; KEYS: every call's keys, likewise.
--
-- Returns one reply per call, in order: the script's own reply, or an error.

local n = tonumber(ARGV[1])
local replies = {}
local k, a = 0, 1 + 3 * n
-- Every call of a run is of one partition, so one look at its budget-state marker
-- serves them all (no script removes the marker; only a rebuild writes it). A
-- call whose marker key is another's, or when it is missing, looks for itself.
local marker, present = nil, false
for c = 1, n do
  local h = 2 + 3 * (c - 1)
  local nk, na = tonumber(ARGV[h + 1]), tonumber(ARGV[h + 2])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + j] end
  k, a = k + nk, a + na
  local script, its_marker = authorize, keys[nk]
  if ARGV[h] == 'f' then script, its_marker = finish, keys[4] end
  if marker == nil and its_marker then
    marker = its_marker
    present = redis.call('EXISTS', marker) == 1
  end
  local ok, reply = pcall(script, keys, args, present and its_marker == marker)
  if ok then
    replies[c] = reply
  elseif type(reply) == 'table' and reply.err then
    replies[c] = reply
  else
    replies[c] = {err = 'caracal: ' .. tostring(reply)}
  end
end
flush_index_writes()
return replies


-- Group commit (store.rs, `Lane`): several calls of one partition in one script
-- run. Above this, the build put authorize.lua and finish.lua as the bodies of
-- `authorize(KEYS, ARGV)` and `finish(KEYS, ARGV)`; each call gets exactly the
-- KEYS and ARGV it would get as a script of its own, and is decided in arrival
-- order with its own reply. A refusal is that call's answer alone, and so is an
-- error (as a script of its own, a call that fails midway keeps what it wrote).
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
for c = 1, n do
  local h = 2 + 3 * (c - 1)
  local nk, na = tonumber(ARGV[h + 1]), tonumber(ARGV[h + 2])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + j] end
  k, a = k + nk, a + na
  local script = authorize
  if ARGV[h] == 'f' then script = finish end
  local ok, reply = pcall(script, keys, args)
  if ok then
    replies[c] = reply
  elseif type(reply) == 'table' and reply.err then
    replies[c] = reply
  else
    replies[c] = {err = 'caracal: ' .. tostring(reply)}
  end
end
return replies

-- The group-commit script's start (store.rs puts authorize.lua, finish.lua and
-- batch.lua after it). The calls of a run write the expiry index through these:
-- the writes are kept in order and made at the end of the run, as one ZADD and
-- one ZREM per index key, each member getting what its last write said (writes to
-- different members commute; of one member's, the last decides). Nothing in a run
-- reads the index (only the sweeper does, between runs), so no call can tell.
local index_writes = {}
local function index_add(key, score, member)
  index_writes[#index_writes + 1] = {key, member, score}
end
local function index_remove(key, member)
  index_writes[#index_writes + 1] = {key, member, false}
end
local function flush_index_writes()
  local writes = index_writes
  index_writes = {}
  local last, keys = {}, {}
  for _, w in ipairs(writes) do
    local of_key = last[w[1]]
    if not of_key then
      of_key = {scores = {}, members = {}}
      last[w[1]] = of_key
      keys[#keys + 1] = w[1]
    end
    if of_key.scores[w[2]] == nil then
      of_key.members[#of_key.members + 1] = w[2]
    end
    of_key.scores[w[2]] = w[3]
  end
  for _, key in ipairs(keys) do
    local adds, removes = {}, {}
    for _, member in ipairs(last[key].members) do
      local score = last[key].scores[member]
      if score then
        adds[#adds + 1] = score
        adds[#adds + 1] = member
      else
        removes[#removes + 1] = member
      end
    end
    -- In slices: unpack is bounded by Lua's C stack (a few thousand values).
    for i = 1, #adds, 512 do
      redis.call('ZADD', key, unpack(adds, i, math.min(i + 511, #adds)))
    end
    for i = 1, #removes, 256 do
      redis.call('ZREM', key, unpack(removes, i, math.min(i + 255, #removes)))
    end
  end
end

-- Put before authorize.lua or finish.lua when it runs as a script of its own
-- (store.rs): the budget-state marker is looked at by the script itself, and the
-- expiry index is written at once. (lua/batch_prelude.lua is the group-commit
-- script's.)
local MARKER_PRESENT = false
local function index_add(key, score, member) redis.call('ZADD', key, score, member) end
local function index_remove(key, member) redis.call('ZREM', key, member) end

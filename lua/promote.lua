-- Move delayed jobs whose backoff is over back onto their streams.
-- KEYS come in pairs: delayed set, job stream (urgent pair first).
-- ARGV[1] most jobs moved per pair. Returns how many moved.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local moved = 0
for i = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
  for _, job in ipairs(due) do
    -- Added before it is removed: a script that fails midway keeps what it wrote.
    redis.call('XADD', KEYS[i + 1], '*', 'job', job)
    redis.call('ZREM', KEYS[i], job)
    moved = moved + 1
  end
end
return moved

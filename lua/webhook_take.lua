-- Lease the deliveries that are due: push their due time out by the lease, so
-- a deliverer that dies mid-attempt leaves them to be tried again later.
-- KEYS[1] due ZSET, KEYS[2] pending hash
-- ARGV[1] now ms, ARGV[2] lease ms, ARGV[3] most to take
-- Returns the leased deliveries' JSON.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    table.insert(out, body)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out

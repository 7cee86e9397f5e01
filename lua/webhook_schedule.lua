-- Schedule webhook deliveries; one already scheduled under the same id is
-- left as it is (its attempt count and due time stand), so scheduling twice is harmless.
-- KEYS[1] due ZSET (score = due ms), KEYS[2] pending hash (id -> delivery JSON)
-- ARGV[1] due ms, then pairs of (id, delivery JSON)
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]), ARGV[i])
    added = added + 1
  end
end
return added

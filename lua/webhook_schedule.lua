-- Schedule webhook deliveries; one already scheduled under the same id is
-- left as it is (its attempt count and due time stand), so scheduling twice is harmless.
-- KEYS[1] due ZSET (score = due ms), KEYS[2] pending hash (id -> delivery JSON)
-- ARGV[1] due ms (the end of its lease, when the scheduling process sends
-- it itself), then pairs of (id, delivery JSON)
-- Returns the ids added.
local added = {}
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]), ARGV[i])
    table.insert(added, ARGV[i])
  end
end
return added

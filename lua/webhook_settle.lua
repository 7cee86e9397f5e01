-- Settle one delivery. ARGV[2] = "retry": store its new JSON and make it due
-- at ARGV[3]. "done": forget it. "dead": forget it and keep its JSON on the
-- capped dead list.
-- KEYS[1] due ZSET, KEYS[2] pending hash, KEYS[3] dead list
-- ARGV[1] id, ARGV[2] outcome, ARGV[3] due ms (retry), ARGV[4] delivery JSON, ARGV[5] dead list cap
if ARGV[2] == 'retry' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
  return 1
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == 'dead' then
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
return 1

-- Put a job that failed retryably back to wait out its backoff: ack and drop
-- its stream entry, park a copy (attempts counted) in the delayed set until
-- Redis' own clock says it is due, and keep its in-flight marker alive that
-- long, so misses meanwhile attach to it instead of enqueueing again.
-- KEYS[1] job stream, KEYS[2] delayed set, KEYS[3] in-flight marker
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] delay (ms), ARGV[4] job JSON,
-- ARGV[5] job id, ARGV[6] in-flight TTL (s) counted from the due time
-- Returns 1 when parked, 0 when the entry was no longer pending.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return 0
end
-- Parked before it is acked: a script that fails midway keeps what it wrote.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + delay, ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[5] then
  redis.call('EXPIRE', KEYS[3], math.ceil(delay / 1000) + tonumber(ARGV[6]))
end
return 1

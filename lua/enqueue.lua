-- Enqueue a job once per dedupe key, attaching the caller's callback either way.
-- KEYS[1] in-flight marker, KEYS[2] callback list, KEYS[3] job stream
-- ARGV[1] in-flight TTL (s), ARGV[2] callback URL or "", ARGV[3] job id, ARGV[4] job JSON
-- Returns 1 when a job was added, 0 when one was already in flight.
if ARGV[2] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[2])
end
local fresh = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', tonumber(ARGV[1]))
if fresh then
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[4])
  return 1
end
return 0

-- Enqueue a job once per dedupe key, attaching the caller's callback either way
-- (once: an identical one already attached is not added again).
-- KEYS[1] in-flight marker, KEYS[2] callback list, KEYS[3] job stream,
-- KEYS[4] (optional) a marker to set first, in flight or not: the index's
-- "absent until rendered", so the render's index entry comes after it
-- ARGV[1] in-flight TTL (s), ARGV[2] callback URL or "", ARGV[3] job id, ARGV[4] job JSON,
-- ARGV[5] the KEYS[4] marker's TTL (s)
-- Returns 1 when a job was added, 0 when one was already in flight.
if KEYS[4] then
  redis.call('SET', KEYS[4], 1, 'EX', tonumber(ARGV[5]))
end
-- A caller attached already (a client retrying its batch) is not attached
-- twice: it would get the same webhook twice under two ids.
if ARGV[2] ~= '' and not redis.call('LPOS', KEYS[2], ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[2])
end
local fresh = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', tonumber(ARGV[1]))
if fresh then
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[4])
  return 1
end
return 0

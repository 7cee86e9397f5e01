-- Restarts a claimed entry's idle time, so it is not taken over while its
-- worker is still on it; only if this consumer still holds it (one that
-- took it over meanwhile keeps it). XCLAIM ... JUSTID leaves the delivery
-- count as it is.
-- KEYS[1] job stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id.
-- Returns 1 when held, 0 when the entry is no longer this consumer's.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if pending[1] and pending[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  return 1
end
return 0

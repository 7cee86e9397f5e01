-- Extends a lock only if this holder still has it, so one that expired and
-- was taken by another process meanwhile is never taken back.
-- KEYS[1] lock key; ARGV[1] the holder's token, ARGV[2] its new lifetime (ms).
-- Returns 1 when extended, 0 when the lock is no longer this holder's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0

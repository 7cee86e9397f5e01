-- Releases a lock only if this holder still has it (it may have expired and
-- been taken by another process meanwhile).
-- KEYS[1] lock key; ARGV[1] the holder's token. Returns 1 when released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0

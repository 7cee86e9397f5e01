-- Finish a job: ack and drop its stream entry, clear its in-flight marker
-- (only if it is still this job's) and drop the callbacks attached to it,
-- but only when the caller has filed all of them (ARGV[7], how many it has):
-- otherwise change nothing and hand them all back, so a subscriber that
-- attached meanwhile is filed before the ack drops it.
-- With ARGV[4] set, the job is dead-lettered: a copy goes to KEYS[4] with the reason.
-- KEYS[1] job stream, KEYS[2] in-flight marker, KEYS[3] callback list, KEYS[4] dead-letter stream
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] job id, ARGV[4] failure reason or "", ARGV[5] job JSON,
-- ARGV[6] most dead letters kept (older ones are trimmed), ARGV[7] callbacks filed
-- Returns {1, {}} when finished, {0, callbacks} when some are not filed yet.
if redis.call('LLEN', KEYS[3]) > tonumber(ARGV[7]) then
  return {0, redis.call('LRANGE', KEYS[3], 0, -1)}
end
-- The dead letter first: a script that fails midway keeps what it wrote,
-- so the job is never dropped before its copy is kept.
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', tonumber(ARGV[6]), '*', 'job', ARGV[5], 'reason', ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return {1, {}}

-- wrk script for the miss storm: each request asks for the next of VARIANTS
-- distinct missing variants (path prefix MISS_PREFIX, names 0000.png ...),
-- cycling, until TOTAL requests were answered across all threads; every
-- answer must be a 202. Configured through the environment:
--   MISS_PREFIX  e.g. /media/cache/small/default/miss/
--   MISS_VARIANTS (1000)  MISS_TOTAL (10000)  MISS_THREADS (wrk -t)
local threads = {}
local counter = 1

setup = function(thread)
   thread:set("id", counter)
   table.insert(threads, thread)
   counter = counter + 1
end

init = function(args)
   prefix = os.getenv("MISS_PREFIX")
   variants = tonumber(os.getenv("MISS_VARIANTS") or "1000")
   local total = tonumber(os.getenv("MISS_TOTAL") or "10000")
   local nthreads = tonumber(os.getenv("MISS_THREADS") or "1")
   -- Thread k (1-based) sends requests k-1, k-1+n, k-1+2n, ... of the global sequence.
   budget = math.floor(total / nthreads)
   if id <= total % nthreads then budget = budget + 1 end
   seq = id - 1
   step = nthreads
   sent = 0
   answered = 0
   accepted = 0
   other = 0
   first_other = ""
end

request = function()
   if sent >= budget then
      -- Past this thread's share: wrk keeps every connection busy, so ask for
      -- a variant already asked (the answer is not counted) until stop lands.
      return wrk.format("GET", prefix .. string.format("%04d.png", 0))
   end
   local path = prefix .. string.format("%04d.png", seq % variants)
   seq = seq + step
   sent = sent + 1
   return wrk.format("GET", path)
end

response = function(status, headers, body)
   answered = answered + 1
   if answered > budget then
      wrk.thread:stop()
      return
   end
   if status == 202 then
      accepted = accepted + 1
   else
      other = other + 1
      if first_other == "" then first_other = tostring(status) end
   end
   if answered == budget then
      -- Tell benches/load/run this thread is through: wrk itself would sleep
      -- out its whole -d before printing, so the script interrupts it.
      local dir = os.getenv("MISS_DONE_DIR")
      if dir then
         local f = io.open(dir .. "/thread-" .. id, "w")
         if f then f:close() end
      end
      wrk.thread:stop()
   end
end

done = function(summary, latency, requests)
   local accepted_all, other_all, firsts = 0, 0, ""
   for _, thread in ipairs(threads) do
      accepted_all = accepted_all + thread:get("accepted")
      other_all = other_all + thread:get("other")
      local f = thread:get("first_other")
      if f ~= "" then firsts = firsts .. f .. " " end
   end
   local e = summary.errors
   io.write(string.format(
      "WRK requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d"
         .. " err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d"
         .. " accepted=%d other=%d\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.status, e.timeout, accepted_all, other_all))
   if firsts ~= "" then io.write("WRK first non-202 statuses: " .. firsts .. "\n") end
end

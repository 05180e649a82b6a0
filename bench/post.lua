-- wrk script: POST the body in $BENCH_BODY with Content-Type $BENCH_CONTENT_TYPE, and at
-- the end print one JSON line (prefixed BENCH_JSON) with the counts and p50/p90/p99.
-- Latencies from wrk are in microseconds; non-2xx answers count as errors.
--
-- With $BENCH_WINDOW_FROM and $BENCH_WINDOW_TO (CLOCK_MONOTONIC seconds, the clock of
-- Python's time.monotonic), it also gives the times of the 2xx answers that arrive inside
-- that window ("window_times") and counts the others ("window_bad"), from which
-- bench/run.py takes the rate at which answers come. Why: wrk's own count is of the
-- answers before its deadline, from a cold start. For a server that answers a batch of 8
-- every 350 ms, the batch cut off by the deadline (half a batch on average) and the
-- first, partial batches after the cold start both go uncounted: 2-4 % of an 8 s point.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"

local window_from = tonumber(os.getenv("BENCH_WINDOW_FROM") or "")
local window_to = tonumber(os.getenv("BENCH_WINDOW_TO") or "")
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

if window_from and window_to then
   local ffi = require("ffi")
   ffi.cdef [[
      typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
      int clock_gettime(int clk_id, bench_timespec *tp);
   ]]
   local CLOCK_MONOTONIC = 1
   local now = ffi.new("bench_timespec")
   window_times, window_bad = {}, 0 -- globals: read from each thread's state by done()

   -- Defined only with a window: wrk hands every answer to Lua once a script has one.
   function response(status, headers, body)
      ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
      local t = tonumber(now.tv_sec) + tonumber(now.tv_nsec) * 1e-9
      if t >= window_from and t < window_to then
         if status >= 200 and status < 300 then
            window_times[#window_times + 1] = t
         else
            window_bad = window_bad + 1
         end
      end
   end
end

function done(summary, latency, requests)
   local times, bad = {}, -1 -- -1: no window asked for
   if window_from and window_to then
      bad = 0
      for _, thread in ipairs(threads) do
         for _, t in ipairs(thread:get("window_times")) do
            times[#times + 1] = string.format("%.6f", t)
         end
         bad = bad + thread:get("window_bad")
      end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors_connect": %d, "errors_read": %d, "errors_write": %d, ' ..
      '"errors_status": %d, "errors_timeout": %d, ' ..
      '"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "max_us": %.1f, "mean_us": %.1f, ' ..
      '"window_bad": %d, "window_times": [%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, bad, table.concat(times, ", ")))
end

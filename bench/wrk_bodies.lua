-- wrk script: POST the request bodies of the file named by $WRK_BODIES (one JSON body per
-- line), in rotation, and print a machine-readable summary line for bench/wrk.py:
--
--   WRK_BODIES=/tmp/bodies.txt wrk -t1 -c64 -d10s -s bench/wrk_bodies.lua http://127.0.0.1:8080/enrich
--
-- wrk is closed-loop (a connection sends its next request only after the previous answer), so
-- its throughput is the saturated ceiling while its latency percentiles are only indicative:
-- they omit the requests a stalled server kept from being sent (use bench/openloop for those).
--
-- With WRK_CHECK_SEGMENTS set, every response is also checked for a non-empty "segment_ids"
-- list (proof the server read the bodies); this costs a Lua call per response, so leave it off
-- for throughput numbers.

-- Each wrk thread runs this file in its own Lua state: these are per-thread.
local requests = {}
local index = 0
-- Main state only: the threads, to sum their counters in done().
local threads = {}

segment_responses = 0 -- global so that done() can read it with thread:get()

function setup(thread)
   threads[#threads + 1] = thread
   -- Threads start at different bodies so that the mix is the same from the first second.
   thread:set("start_index", #threads - 1)
end

function init(args)
   local path = os.getenv("WRK_BODIES")
   if path == nil or path == "" then
      error("WRK_BODIES must name a file holding one request body per line")
   end
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   for line in io.lines(path) do
      line = line:gsub("\r$", "")
      if line ~= "" then
         -- Formatted once here, so request() only hands out a prepared string.
         requests[#requests + 1] = wrk.format("POST", nil, nil, line)
      end
   end
   if #requests == 0 then
      error("no request body in " .. path)
   end
   index = (start_index or 0) % #requests
end

function request()
   index = index % #requests + 1
   return requests[index]
end

if os.getenv("WRK_CHECK_SEGMENTS") ~= nil and os.getenv("WRK_CHECK_SEGMENTS") ~= "" then
   function response(status, headers, body)
      if status == 200 and body ~= nil and body:find('"segment_ids":["', 1, true) then
         segment_responses = segment_responses + 1
      end
   end
end

function done(summary, latency, requests_stats)
   local segments = 0
   for _, thread in ipairs(threads) do
      segments = segments + (thread:get("segment_responses") or 0)
   end
   local e = summary.errors
   local function int(x)
      return string.format("%d", math.floor(x + 0.5))
   end
   io.write("WRK_JSON {",
      '"requests":', int(summary.requests),
      ',"duration_us":', int(summary.duration),
      ',"bytes":', int(summary.bytes),
      ',"errors_status":', int(e.status),
      ',"errors_connect":', int(e.connect),
      ',"errors_read":', int(e.read),
      ',"errors_write":', int(e.write),
      ',"errors_timeout":', int(e.timeout),
      ',"segment_responses":', int(segments),
      ',"p50_us":', int(latency:percentile(50)),
      ',"p90_us":', int(latency:percentile(90)),
      ',"p99_us":', int(latency:percentile(99)),
      ',"p999_us":', int(latency:percentile(99.9)),
      ',"max_us":', int(latency.max),
      ',"mean_us":', int(latency.mean),
      "}\n")
end

-- wrk_unique_kv.lua -- closed-loop KV load for wrk 4.x (LuaJIT).
--
-- Every request of mode "put" carries a key that is unique across threads,
-- connections and runs: <prefix>/<run_tag>/t<thread>/<counter>.
-- Mode "range" reads keys <prefix>/<run_tag>/<i> for a random i in [0, nkeys),
-- which the caller must have written beforehand.
--
-- Usage (etcd v3 JSON gateway, the defaults):
--   wrk -t2 -c64 -d10s --latency --timeout 10s -s wrk_unique_kv.lua \
--       http://127.0.0.1:23791 -- put  <run_tag>
--   wrk -t2 -c64 -d10s --latency --timeout 10s -s wrk_unique_kv.lua \
--       http://127.0.0.1:23791 -- range <run_tag> <nkeys>
--
-- Reuse against another HTTP API: change only the environment, not the script.
--   WRK_PATH         request path            (put: /v3/kv/put, range: /v3/kv/range)
--   WRK_METHOD       HTTP method             (POST)
--   WRK_BODY         body template; placeholders {{key}} {{key_b64}}
--                    {{value}} {{value_b64}} are substituted per request
--                    (put:   {"key":"{{key_b64}}","value":"{{value_b64}}"}
--                     range: {"key":"{{key_b64}}"})
--   WRK_CONTENT_TYPE Content-Type header     (application/json)
--   WRK_VALUE_BYTES  raw value size in bytes (256)
--   WRK_KEY_PREFIX   key prefix              (bench)
--   WRK_AUTH_TOKEN   sent as X-Auth-Token when set (drplane's copy of the shared
--                    script adds only this; everything else is unchanged)
-- Example for a hypothetical API:
--   WRK_PATH=/api/v1/kv WRK_BODY='{"key":"{{key}}","value":"{{value}}"}' \
--     wrk ... -s wrk_unique_kv.lua http://127.0.0.1:8080 -- put run42
--
-- done() prints one machine-readable line:
--   WRK_RESULT {"requests":..,"duration_s":..,"rps":..,"p50_ms":..,...}
-- Non-2xx/3xx answers count as errors.status (wrk counts status > 399).

local bit = require("bit")

-- ---------------------------------------------------------------- base64
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local b64chars = {}
for i = 1, 64 do b64chars[i - 1] = B64:sub(i, i) end

local function b64(s)
  local out, n = {}, #s
  local i = 1
  while i <= n - 2 do
    local a, b, c = s:byte(i, i + 2)
    local v = bit.bor(bit.lshift(a, 16), bit.lshift(b, 8), c)
    out[#out + 1] = b64chars[bit.band(bit.rshift(v, 18), 63)]
      .. b64chars[bit.band(bit.rshift(v, 12), 63)]
      .. b64chars[bit.band(bit.rshift(v, 6), 63)]
      .. b64chars[bit.band(v, 63)]
    i = i + 3
  end
  local rest = n - i + 1
  if rest == 2 then
    local a, b = s:byte(i, i + 1)
    local v = bit.bor(bit.lshift(a, 16), bit.lshift(b, 8))
    out[#out + 1] = b64chars[bit.band(bit.rshift(v, 18), 63)]
      .. b64chars[bit.band(bit.rshift(v, 12), 63)]
      .. b64chars[bit.band(bit.rshift(v, 6), 63)] .. "="
  elseif rest == 1 then
    local v = bit.lshift(s:byte(i), 16)
    out[#out + 1] = b64chars[bit.band(bit.rshift(v, 18), 63)]
      .. b64chars[bit.band(bit.rshift(v, 12), 63)] .. "=="
  end
  return table.concat(out)
end

-- ---------------------------------------------------------------- setup (main thread)
local thread_counter = 0
function setup(thread)
  thread:set("thread_id", thread_counter)
  thread_counter = thread_counter + 1
end

-- ---------------------------------------------------------------- per-thread state
local mode, run_tag, nkeys
local path, method, body_tpl, headers
local prefix, value, value_b64
local counter = 0

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local function render(tpl, key)
  -- plain (non-pattern) substitution; function replacements avoid '%' issues
  local s = tpl
  s = s:gsub("{{key_b64}}", function() return b64(key) end)
  s = s:gsub("{{value_b64}}", function() return value_b64 end)
  s = s:gsub("{{key}}", function() return key end)
  s = s:gsub("{{value}}", function() return value end)
  return s
end

function init(args)
  mode = args[1] or "put"
  run_tag = args[2] or tostring(os.time())
  nkeys = tonumber(args[3] or "1000")
  if mode ~= "put" and mode ~= "range" then
    error("mode must be put or range, got " .. tostring(mode))
  end
  prefix = env("WRK_KEY_PREFIX", "bench")
  local vbytes = tonumber(env("WRK_VALUE_BYTES", "256"))
  -- deterministic printable value of exactly vbytes bytes
  local pat = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
  value = string.rep(pat, math.ceil(vbytes / #pat)):sub(1, vbytes)
  value_b64 = b64(value)
  method = env("WRK_METHOD", "POST")
  if mode == "put" then
    path = env("WRK_PATH", "/v3/kv/put")
    body_tpl = env("WRK_BODY", '{"key":"{{key_b64}}","value":"{{value_b64}}"}')
  else
    path = env("WRK_PATH", "/v3/kv/range")
    body_tpl = env("WRK_BODY", '{"key":"{{key_b64}}"}')
  end
  headers = { ["Content-Type"] = env("WRK_CONTENT_TYPE", "application/json") }
  local token = env("WRK_AUTH_TOKEN", nil)
  if token then headers["X-Auth-Token"] = token end
  -- different seed per thread for range mode
  math.randomseed(os.time() + 7919 * (thread_id or 0))
end

function request()
  local key
  if mode == "put" then
    key = prefix .. "/" .. run_tag .. "/t" .. (thread_id or 0) .. "/" .. counter
    counter = counter + 1
  else
    key = prefix .. "/" .. run_tag .. "/" .. math.random(0, nkeys - 1)
  end
  return wrk.format(method, path, headers, render(body_tpl, key))
end

-- ---------------------------------------------------------------- report (main thread)
function done(summary, latency, requests)
  local dur_s = summary.duration / 1e6
  local e = summary.errors
  local function ms(us) return string.format("%.3f", us / 1000) end
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_s":%.3f,"rps":%.1f,"ok_rps":%.1f,' ..
    '"p50_ms":%s,"p75_ms":%s,"p90_ms":%s,"p99_ms":%s,"p999_ms":%s,' ..
    '"mean_ms":%s,"max_ms":%s,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, dur_s, summary.requests / dur_s,
    (summary.requests - e.status) / dur_s,
    ms(latency:percentile(50)), ms(latency:percentile(75)), ms(latency:percentile(90)),
    ms(latency:percentile(99)), ms(latency:percentile(99.9)),
    ms(latency.mean), ms(latency.max),
    e.connect, e.read, e.write, e.status, e.timeout))
end

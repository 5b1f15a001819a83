-- The engine side of one Lua runtime: sandbox environments, the coroutine driver and the Lua half
-- of the `mix` library.  This chunk runs once, with the full globals of the runtime, before any
-- user code; it receives `host`, a table of Python functions (see connmix_tx/lua/runtime.py), and
-- returns the table of functions the Python side drives.  User code never sees `host`.
local raw_host, memory_limit_address = ...

local _G = _G
local assert, error, pairs, ipairs, select, type, tostring, setmetatable, pcall =
      assert, error, pairs, ipairs, select, type, tostring, setmetatable, pcall
local co_create, co_resume, co_status, co_yield, co_running =
      coroutine.create, coroutine.resume, coroutine.status, coroutine.yield, coroutine.running
local sethook, traceback = debug.sethook, debug.traceback
local setfenv, load, concat, unpack = setfenv, load, table.concat, unpack
-- Scripts may change the shared `string` table; the engine keeps its own references.
local str_byte, str_find, str_sub = string.byte, string.find, string.sub

local engine = {}

-- Memory (docs/robustness.md) ----------------------------------------------------------------
-- The allocator's limit lives in the LuaRuntime object (lupa's MemoryStatus.limit); Python
-- hands its address over.  User code runs under the script's budget (soft); the engine's own
-- code and every host call run under the budget plus a headroom (hard), so the unprotected
-- Lua API calls Python makes (pushing arguments and results, building tables, raising errors)
-- never meet an allocation failure: that would longjmp through Python and abort the process.
local ffi = require("ffi")
local memory_limit = nil
if memory_limit_address then
  memory_limit = ffi.cast("uint64_t *", ffi.cast("uintptr_t", memory_limit_address))
end
local soft_limit, hard_limit = 0, 0
local soft_on = false

local function set_soft()
  soft_on = true
  if memory_limit then memory_limit[0] = soft_limit end
end

local function set_hard()
  soft_on = false
  if memory_limit then memory_limit[0] = hard_limit end
end

-- LuaJIT has no emergency collection: garbage a slice leaves near the budget (a loop under
-- pcall that ran out) would make the next allocation fail.  After each slice, when usage is in
-- the last eighth of the budget and grew by a sixteenth since the last full collection there,
-- collect before the next callback; a script keeping most of its budget in globals gets a full
-- collection every 64th slice only.
local gc_count = collectgarbage
local gc_high, gc_step, gc_after = math.huge, math.huge, 0

local gc_slices, gc_pending = 0, false

local function collect_when_high()
  local used = gc_count("count")
  if used <= gc_high then
    gc_after = 0
    return
  end
  gc_slices = gc_slices + 1
  if used > gc_after + gc_step or gc_slices >= 64 then
    -- At the start of the next callback: by then Python has let go of the coroutine that just
    -- ran, whose stack may hold what it allocated.
    gc_pending = true
  end
end

local function collect_if_pending()
  if gc_pending then
    gc_pending = false
    gc_count("collect")
    gc_after, gc_slices = gc_count("count"), 0
  end
end

-- A full collection (the Python side asks after a memory error, or before a large result).
function engine.collect()
  gc_count("collect")
  gc_after = 0
end

function engine.set_memory_limits(soft, hard)
  soft_limit, hard_limit = soft, hard
  gc_high, gc_step = soft / 1024 * 0.875, soft / 1024 / 16
  set_hard()
end

-- Set when a host function raised: lupa keeps the Python exception, and with it the frames of
-- the Python caller (which may hold the coroutine), until another exception replaces it.  The
-- driver tells the Python side after the slice, which then drops it.
local python_raised = false

local function host_done(was_soft, ok, ...)
  if not ok then
    -- The error is the Python exception, whose traceback holds Python frames that may hold
    -- the coroutine: a reference cycle across the two heaps that no collector breaks.  Lua
    -- gets its text only.
    python_raised = true
    local err = (...)
    if type(err) == "userdata" then err = tostring(err) end
    if was_soft then set_soft() end
    error(err, 0)
  end
  if was_soft then set_soft() end
  return ...
end

-- A host (Python) function as Lua calls it: under the hard limit, back to the soft one after.
local function guarded(fn)
  return function(...)
    local was_soft = soft_on
    set_hard()
    return host_done(was_soft, pcall(fn, ...))
  end
end

local host = {}
for name, value in pairs(raw_host) do
  if type(value) == "userdata" then value = guarded(value) end
  host[name] = value
end
do
  local extensions = {}
  for name, fn in pairs(raw_host.extensions) do extensions[name] = guarded(fn) end
  host.extensions = extensions
end

-- Marks a yield that waits for the Python side (as opposed to a script's own yield).
local WAIT = {}

-- The coroutine the driver is running right now, and the client id it runs for.
local active = nil
local current_cid = nil
-- Engine coroutine -> client id (weak keys: a coroutine dropped by Python is collected).
local coroutine_cid = setmetatable({}, { __mode = "k" })
-- Set while a framing callback (protocol_*) runs: those may not wait.
local in_protocol = false

local instruction_limit = 0
local function limit_hook()
  if co_running() == nil then
    -- Back in the engine's own code (the main thread) after the slice ended: disarm.
    sethook()
    return
  end
  -- From now on every instruction of the script fails, so it cannot swallow the error with
  -- pcall and carry on looping; the hook is cleared when the run-slice ends.
  sethook(limit_hook, "", 1)
  error("instruction limit exceeded", 0)
end

local function arm_limit()
  if instruction_limit > 0 then sethook(limit_hook, "", instruction_limit) end
end

local function disarm_limit()
  if instruction_limit > 0 then sethook() end
end

local function copy(t, without)
  local c = {}
  for k, v in pairs(t) do
    if k ~= without then c[k] = v end
  end
  return c
end

-- Coroutines the engine drives (callbacks, framing, top levels, error conversion): scripts may
-- see them (coroutine.running) but cannot resume them.
local engine_owned = setmetatable({}, { __mode = "k" })

-- Nested coroutine.resume calls use the C stack: without a bound a script can overflow it.
local MAX_RESUME_DEPTH = 64
local resume_depth = 0

local function resumed(ok, ...)
  resume_depth = resume_depth - 1
  return ok, ...
end

local function sandbox_resume(co, ...)
  if engine_owned[co] then return false, "cannot resume a coroutine of the engine" end
  if resume_depth >= MAX_RESUME_DEPTH then
    error("coroutines nested deeper than " .. MAX_RESUME_DEPTH, 2)
  end
  resume_depth = resume_depth + 1
  return resumed(co_resume(co, ...))
end

local function wrapped(ok, ...)
  if not ok then error((...), 0) end
  return ...
end

local function sandbox_wrap(fn)
  local co = co_create(fn)
  return function(...) return wrapped(sandbox_resume(co, ...)) end
end

-- Patterns: the matcher of string.find/match/gmatch/gsub backtracks, and count hooks do not
-- fire inside C functions.  A pattern with k repeated items (*, +, -) over a subject of n
-- bytes may try about C(n + k - 1, k - 1) ways; beyond MAX_PATTERN_COST it is refused.
local MAX_PATTERN_COST = 2e8

local function repeated_items(p)
  local k, i, n = 0, 1, #p
  while i <= n do
    local c = str_sub(p, i, i)
    local item_end
    if c == "%" then
      local d = str_sub(p, i + 1, i + 1)
      if d == "b" then item_end = i + 3
      elseif d == "f" then
        local close = str_find(p, "]", i + 4, true)
        i = (close or n) + 1
        item_end = nil
      else item_end = i + 1 end
    elseif c == "[" then
      local j = i + 1
      if str_sub(p, j, j) == "^" then j = j + 1 end
      if str_sub(p, j, j) == "]" then j = j + 1 end
      while j <= n and str_sub(p, j, j) ~= "]" do
        if str_sub(p, j, j) == "%" then j = j + 1 end
        j = j + 1
      end
      item_end = j
    else
      item_end = i
    end
    if item_end then
      local q = str_sub(p, item_end + 1, item_end + 1)
      if q == "*" or q == "+" or q == "-" then
        k = k + 1
        i = item_end + 2
      else
        i = item_end + 1
      end
    end
  end
  return k
end

local pattern_k = setmetatable({}, { __mode = "k" })

local function check_pattern(fname, s, p, plain)
  if plain or type(s) ~= "string" or type(p) ~= "string" then return end
  local k = pattern_k[p]
  if k == nil then
    k = repeated_items(p)
    if #p <= 256 then pattern_k[p] = k end
  end
  if k < 3 then return end
  local n, cost = #s, 1
  for i = 1, k - 1 do
    cost = cost * (n + i) / i
    if cost > MAX_PATTERN_COST then
      error("bad argument #2 to '" .. fname .. "' (pattern too complex for a subject of " .. n .. " bytes)", 3)
    end
  end
end

local function new_string_library()
  local lib = copy(string, "dump")
  local find, match, gmatch, gsub = string.find, string.match, string.gmatch, string.gsub
  function lib.find(s, p, init, plain)
    check_pattern("find", s, p, plain)
    return find(s, p, init, plain)
  end
  function lib.match(s, p, init)
    check_pattern("match", s, p)
    return match(s, p, init)
  end
  function lib.gmatch(s, p)
    check_pattern("gmatch", s, p)
    return gmatch(s, p)
  end
  function lib.gsub(s, p, repl, n)
    check_pattern("gsub", s, p)
    return gsub(s, p, repl, n)
  end
  return lib
end

-- The string metatable is shared by every string of the runtime: scripts cannot reach it.
-- getmetatable("") gives a copy ({__index = string}); the real __index is the string table of
-- the generation in use.
local string_meta = debug.getmetatable("")

-- Sandboxed standard library (docs/lua-api.md, "The runtime"): fresh tables for every compiled
-- generation, so a script's changes to them do not survive a hot reload.
local function new_libraries(env)
  env.string = new_string_library()
  env.table, env.math, env.bit = copy(table), copy(math), copy(bit)
  local co_lib = copy(coroutine)
  co_lib.resume, co_lib.wrap = sandbox_resume, sandbox_wrap
  env.coroutine = co_lib
  env.os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime }
  env.debug = { traceback = traceback }
end
string_meta.__index = new_string_library()
string_meta.__metatable = { __index = string_meta.__index }

-- Every chunk of user code (entry, modules, load/loadstring).  While an instruction limit is set
-- their functions run in the interpreter, where count hooks fire (they do not fire in compiled
-- traces); the engine's own code here stays compiled.
local user_chunks = setmetatable({}, { __mode = "k" })

local function load_text(source, chunkname, env)
  if type(source) ~= "string" then
    return nil, "source must be a string"
  end
  if str_byte(source, 1) == 27 then
    return nil, "binary chunks are not allowed"
  end
  local fn, err = load(source, chunkname, "t")
  if not fn then return nil, err end
  setfenv(fn, env)
  user_chunks[fn] = true
  if instruction_limit > 0 then jit.off(fn, true) end
  return fn
end

-- Waiting ------------------------------------------------------------------------------------

local function can_wait()
  return active ~= nil and co_running() == active and not in_protocol
end

-- Suspend the running engine coroutine until the Python side settles `token`.
local function await(token)
  if not can_wait() then
    host.forget(token)
    if in_protocol then error("cannot wait in protocol_*", 2) end
    error("cannot wait here", 2)
  end
  return co_yield(WAIT, token)
end

-- Host functions that may wait answer `0, results...` (done) or `1, token` (must wait).
local function settle(mode, ...)
  if mode == 1 then return await(...) end
  return ...
end

-- JSON (docs/lua-api.md) --------------------------------------------------------------------------
-- Encoding runs here, in Lua, because walking a table from Python costs a boundary crossing per
-- value.  Output is byte-identical to the Python rules in connmix_tx/lua/convert.py (sorted
-- keys, integral numbers without a fraction, UTF-8 as is); text with bytes >= 0x80 is checked
-- by the host, which replaces invalid UTF-8 byte by byte with U+FFFD.

local floor, huge, str_format, str_gsub, tbl_sort = math.floor, math.huge, string.format, string.gsub, table.sort
local MAX_EXACT, MAX_DEPTH, MAX_NODES = 2 ^ 53, 128, 100000
local nodes_left = MAX_NODES
local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
                  ["\r"] = "\\r", ["\t"] = "\\t" }
for byte = 0, 31 do
  local c = string.char(byte)
  if not ESCAPES[c] then ESCAPES[c] = str_format("\\u%04x", byte) end
end

local function encode_number(n)
  if n ~= n or n == huge or n == -huge then error("cannot encode NaN or infinity", 0) end
  if n == floor(n) then
    if n >= -MAX_EXACT and n <= MAX_EXACT then return str_format("%d", n) end
    if n > -1e21 and n < 1e21 then return str_format("%.0f", n) end  -- as Go writes them
  end
  local short = str_format("%.15g", n)
  if tonumber(short) == n then return short end
  local longer = str_format("%.16g", n)
  if tonumber(longer) == n then return longer end
  return str_format("%.17g", n)
end

local SPECIAL = '[%z\1-\31"\\]'

-- Pieces go into `out` one by one and are joined once by table.concat: no intermediate string
-- is built (every Lua string is interned, so concatenations cost).
-- Strings seen recently, with their escaped form (header names and values repeat in every
-- message); emptied when it grows past ESCAPED_MAX entries.
local escaped, escaped_count, ESCAPED_MAX = {}, 0, 4096

local function put_string(s, out, n)
  local e = escaped[s]
  if e == nil then
    e = s
    if str_find(s, SPECIAL) then e = str_gsub(s, SPECIAL, ESCAPES) end
    if #s <= 256 then
      if escaped_count >= ESCAPED_MAX then escaped, escaped_count = {}, 0 end
      escaped[s], escaped_count = e, escaped_count + 1
    end
  end
  out[n + 1], out[n + 2], out[n + 3] = '"', e, '"'
  return n + 3
end

-- Appends the JSON of `v` to `out` after position `n`; returns the new position.
local encode_value

local function encode_table(t, depth, seen, out, n)
  if depth >= MAX_DEPTH then error("nesting deeper than " .. MAX_DEPTH, 0) end
  if seen[t] then error("cyclic table", 0) end
  nodes_left = nodes_left - 1
  if nodes_left < 0 then error("value too large (more than " .. MAX_NODES .. " tables)", 0) end
  seen[t] = true
  local count, array = 0, true
  for k in pairs(t) do
    count = count + 1
    if array and (type(k) ~= "number" or k < 1 or k ~= floor(k)) then array = false end
  end
  if count == 0 then
    n = n + 1; out[n] = "[]"
  elseif array and t[count] ~= nil and #t == count then
    n = n + 1; out[n] = "["
    for i = 1, count do
      if i > 1 then n = n + 1; out[n] = "," end
      n = encode_value(t[i], depth + 1, seen, out, n)
    end
    n = n + 1; out[n] = "]"
  else
    local keys, names, nkeys = {}, {}, 0
    for k in pairs(t) do
      local kind, name = type(k), k
      if kind == "number" then name = encode_number(k)
      elseif kind == "boolean" then name = tostring(k)
      elseif kind ~= "string" then error("cannot use a " .. kind .. " as an object key", 0) end
      if names[name] == nil then  -- {[1]=..., ["1"]=...}: the first in traversal order wins
        nkeys = nkeys + 1
        keys[nkeys] = name
        names[name] = k
      end
    end
    if nkeys > 1 then tbl_sort(keys) end
    for i = 1, nkeys do
      local name = keys[i]
      n = n + 1; out[n] = i == 1 and "{" or ","
      n = put_string(name, out, n)
      n = n + 1; out[n] = ":"
      n = encode_value(t[names[name]], depth + 1, seen, out, n)
    end
    n = n + 1; out[n] = "}"
  end
  seen[t] = nil
  return n
end

encode_value = function(v, depth, seen, out, n)
  local kind = type(v)
  if kind == "string" then return put_string(v, out, n) end
  n = n + 1
  if kind == "number" then out[n] = encode_number(v)
  elseif kind == "boolean" then out[n] = v and "true" or "false"
  elseif kind == "nil" then out[n] = "null"
  elseif kind == "table" then return encode_table(v, depth, seen, out, n - 1)
  else error("cannot encode a " .. kind, 0) end
  return n
end

-- Returns the JSON text, or nil and the error.
local function json_encode(v)
  local out = {}
  nodes_left = MAX_NODES
  local ok, err = pcall(encode_value, v, 0, {}, out, 0)
  if not ok then return nil, tostring(err) end
  local text = concat(out)
  if str_find(text, "[\128-\255]") then text = host.valid_utf8(text) end
  return text, nil
end

-- The connection object (docs/lua-api.md) ---------------------------------------------------

local Conn = { __metatable = false }
Conn.__index = Conn

local function conn_object(cid)
  return setmetatable({ _cid = cid }, Conn)
end

function Conn:client_id() return self._cid end
function Conn:remote_addr() return host.conn_remote_addr(self._cid) end
-- The context as a Lua table, rebuilt from the host only when its version changed; callers get
-- a deep copy (docs/lua-api.md), made here rather than by converting from Python every time.
local context_cache = {}

local function deep_copy(t)
  local c = {}
  for k, v in pairs(t) do
    if type(v) == "table" then v = deep_copy(v) end
    c[k] = v
  end
  return c
end

function Conn:context()
  local version = host.conn_context_version(self._cid)
  local cached = context_cache[self._cid]
  if cached == nil or cached.version ~= version then
    cached = { version = version, table = host.conn_context(self._cid) }
    if version then context_cache[self._cid] = cached end
  end
  return deep_copy(cached.table)
end

function engine.forget_connection(cid)
  context_cache[cid] = nil
end
function Conn:context_value(key) return host.conn_context_value(self._cid, key) end
function Conn:set_context(t)
  if type(t) ~= "table" then error("bad argument #1 to 'set_context' (table expected)", 2) end
  return host.conn_set_context(self._cid, t)
end
function Conn:set_context_value(key, value) return host.conn_set_context_value(self._cid, key, value) end
function Conn:wait_context_value(key, timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0
                         or timeout == math.huge) then
    error("bad argument #2 to 'wait_context_value' (non-negative finite number expected)", 2)
  end
  if not can_wait() then
    error(in_protocol and "cannot wait in protocol_*" or "cannot wait here", 2)
  end
  return settle(host.conn_wait_context_value(self._cid, key, timeout))
end
function Conn:subscribe(...) return host.conn_subscribe(self._cid, ...) end
function Conn:unsubscribe(...) return host.conn_unsubscribe(self._cid, ...) end
function Conn:send(data, kind) return host.conn_send(self._cid, data, kind) end
function Conn:close() return host.conn_close(self._cid) end
function Conn:clear_buffer() return host.conn_clear_buffer(self._cid) end

-- The mix library (docs/lua-api.md) ---------------------------------------------------------

local LEVELS = { debug = true, info = true, warn = true, error = true }

-- Waiting mix functions check first, so that nothing is sent for a call that cannot wait.
local function must_wait()
  if not can_wait() then
    error(in_protocol and "cannot wait in protocol_*" or "cannot wait here", 3)
  end
end

-- The redis object of mix.redis.connection (docs/lua-api.md, Redis); its name lives here, out of
-- reach.
local Redis = { __metatable = false }
Redis.__index = Redis
local redis_names = setmetatable({}, { __mode = "k" })

local function pass(...) return ... end

local function python_result(ok, ...)
  if ok then return ... end
  error(tostring((...)), 3)
end

function Redis:command(...)
  local name = redis_names[self]
  if name == nil then error("bad argument #1 to 'command' (redis object expected; call r:command(...))", 2) end
  must_wait()
  return settle(python_result(pcall(host.redis_command, name, ...)))
end

local function new_mix()
  local mix = {
    DEBUG = "debug", INFO = "info", WARN = "warn", ERROR = "error",
    server = {}, queue = {}, mesh = {},
  }
  mix.json_encode = json_encode
  function mix.json_decode(s)
    if type(s) ~= "string" then error("bad argument #1 to 'json_decode' (string expected)", 2) end
    return python_result(pcall(host.json_decode, s))
  end
  function mix.log(level, msg)
    if not LEVELS[level] then error("bad argument #1 to 'log' (unknown level '" .. tostring(level) .. "')", 2) end
    host.log(level, tostring(msg), current_cid)
    return true
  end
  function mix.websocket()
    if host.server_kind ~= "websocket" then return nil, "not a websocket server" end
    if current_cid == nil then return nil, "no current connection" end
    return conn_object(current_cid)
  end
  function mix.socket_tcp()
    if host.server_kind ~= "socket" then return nil, "not a socket server" end
    if current_cid == nil then return nil, "no current connection" end
    return conn_object(current_cid)
  end
  mix.socket = { tcp = mix.socket_tcp }
  mix.socket_tcp = nil
  function mix.server.option(name) return host.server_option(name) end
  local queue_waits = host.queue_waits ~= nil and host.queue_waits()
  function mix.queue.push(topic, data)
    local text, err = json_encode(data)
    if text == nil then return nil, "json: " .. err end
    if queue_waits then must_wait() end
    return settle(host.queue_push(current_cid, topic, text))
  end
  function mix.mesh.send(client_id, data, kind)
    return settle(host.mesh_send(current_cid, client_id, data, kind))
  end
  function mix.mesh.publish(channel, data, kind)
    return settle(host.mesh_publish(current_cid, channel, data, kind))
  end
  mix.http = {}
  function mix.http.request(method, url, options)
    must_wait()
    return settle(python_result(pcall(host.http_request, method, url, options)))
  end
  mix.redis = {}
  function mix.redis.connection(name)
    local canonical, err = python_result(pcall(host.redis_connection, name))
    if canonical == nil then return nil, err end
    local r = setmetatable({}, Redis)
    redis_names[r] = canonical
    return r
  end
  for name, py_fn in pairs(host.extensions) do
    -- Further mix functions registered by the Python side (e.g. "base64_encode" or "http.request").
    -- An exception they raise becomes a Lua error string pointing at the caller's line.
    local function fn(...)
      -- Not a tail call: python_result's error level 3 must still name the caller's line.
      return pass(python_result(pcall(py_fn, ...)))
    end
    local dot = str_find(name, ".", 1, true)
    if dot then
      local ns = str_sub(name, 1, dot - 1)
      mix[ns] = mix[ns] or {}
      mix[ns][str_sub(name, dot + 1)] = fn
    else
      mix[name] = fn
    end
  end
  return mix
end

-- Environments ------------------------------------------------------------------------------

local BASE = { "assert", "error", "ipairs", "next", "pairs", "pcall", "xpcall", "select",
               "tonumber", "tostring", "type", "unpack", "rawget", "rawset", "rawequal",
               "setmetatable", "getmetatable" }

local function print_(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  host.log("info", concat(parts, "\t"), current_cid)
end

local function collectgarbage_(opt)
  if opt == "count" then return collectgarbage("count") end
  error("collectgarbage: only \"count\" is allowed", 2)
end

-- A fresh sandbox environment; `require` loads modules from the entry folder through the host.
local function new_env()
  local env = {}
  for _, name in ipairs(BASE) do env[name] = _G[name] end
  env._VERSION = _VERSION
  new_libraries(env)
  env.print, env.collectgarbage = print_, collectgarbage_
  env.mix = new_mix()
  env._G = env
  function env.loadstring(source, chunkname)
    return load_text(source, chunkname or "=(loadstring)", env)
  end
  function env.load(chunk, chunkname, mode, fenv)
    if type(chunk) == "function" then
      local parts = {}
      while true do
        local piece = chunk()
        if piece == nil or piece == "" then break end
        parts[#parts + 1] = piece
      end
      chunk = concat(parts)
    end
    if mode ~= nil and mode ~= "t" then return nil, "only text chunks can be loaded" end
    return load_text(chunk, chunkname or "=(load)", fenv or env)
  end
  local loaded = { bit = env.bit }
  function env.require(name)
    if type(name) ~= "string" then error("bad argument #1 to 'require' (string expected)", 2) end
    local cached = loaded[name]
    if cached ~= nil then return cached end
    local source, chunkname = host.read_module(name)
    if source == nil then error(chunkname, 2) end
    local fn, err = load_text(source, "@" .. chunkname, env)
    if not fn then error(err, 2) end
    local result = fn(name)
    if result == nil then result = true end
    loaded[name] = result
    return result
  end
  return env
end

-- Driving ------------------------------------------------------------------------------------

-- Run user code `fn(...)` in a coroutine of its own, under the instruction limit and the soft
-- memory limit, with no current connection and no waiting; returns ok, results... or false, err.
local error_text

local function after_sealed(co, saved_active, saved_cid, saved_protocol, ok, ...)
  disarm_limit()
  set_hard()
  -- The caller re-arms the limit for its own slice, if it is in one.
  active, current_cid, in_protocol = saved_active, saved_cid, saved_protocol
  if not ok then return false, (...) end
  if co_status(co) ~= "dead" then return false, "cannot yield here" end
  return true, ...
end

local function run_sealed(fn, ...)
  local co = co_create(fn)
  engine_owned[co] = true
  local saved_active, saved_cid, saved_protocol = active, current_cid, in_protocol
  active, current_cid, in_protocol = nil, nil, false
  set_soft()
  arm_limit()
  return after_sealed(co, saved_active, saved_cid, saved_protocol, co_resume(co, ...))
end

local function collect_if_full(text)
  if str_find(text, "not enough memory", 1, true) then collectgarbage("collect") end
end

-- The text of an error object.  Strings and numbers as they are; anything else through
-- tostring, whose __tostring is user code: it runs sealed (limits armed), and when it fails,
-- loops or returns no string the text names the type instead.
error_text = function(err)
  local kind = type(err)
  if kind == "string" then return err end
  if kind == "number" then return tostring(err) end
  local ok, text = run_sealed(tostring, err)
  if ok and type(text) == "string" then return text end
  return "(error object is a " .. kind .. " value)"
end

-- Compile an entry chunk into a new environment and run its top level (sealed, so a top level
-- that loops or allocates without end fails); returns the environment or nil, err.
function engine.compile(source, chunkname)
  local env = new_env()
  local fn, err = load_text(source, "@" .. chunkname, env)
  if not fn then return nil, err end
  local ok, run_err = run_sealed(fn)
  if not ok then
    run_err = error_text(run_err)
    collect_if_full(run_err)
    return nil, run_err
  end
  return env, nil
end

-- Callbacks started from now on use `env`; so does the string metatable.
function engine.use(env)
  string_meta.__index = env.string
  string_meta.__metatable = { __index = env.string }
end

function engine.set_instruction_limit(n)
  instruction_limit = n
  for fn in pairs(user_chunks) do
    if n > 0 then jit.off(fn, true) else jit.on(fn, true) end
  end
  jit.flush()
end

-- Resume `co` (an engine coroutine) with the given values.  Returns one of
--   "done", results...          the callback returned
--   "wait", token               it waits for the Python side to settle `token`
--   "yield"                     the script yielded on its own; resume it again later
--   "error", message, traceback it raised
-- The driver state is saved and restored, so a resume nested in another callback is safe.
local function finish(co, saved_active, saved_cid, saved_protocol, ok, first, ...)
  disarm_limit()
  set_hard()
  if python_raised then
    python_raised = false
    raw_host.raised()
  end
  if not ok then
    coroutine_cid[co] = nil
    local text = error_text(first)
    active, current_cid, in_protocol = saved_active, saved_cid, saved_protocol
    if active ~= nil or in_protocol then arm_limit() end
    collect_if_full(text)
    return "error", text, traceback(co, text)
  end
  active, current_cid, in_protocol = saved_active, saved_cid, saved_protocol
  if active ~= nil or in_protocol then arm_limit() end
  collect_when_high()
  if co_status(co) == "dead" then
    coroutine_cid[co] = nil
    return "done", first, ...
  end
  if first == WAIT then return "wait", ... end
  return "yield", false
end

function engine.resume(co, ...)
  local saved_active, saved_cid, saved_protocol = active, current_cid, in_protocol
  active, current_cid, in_protocol = co, coroutine_cid[co], false
  if saved_active == nil and not saved_protocol then resume_depth = 0 end
  set_soft()
  arm_limit()
  return finish(co, saved_active, saved_cid, saved_protocol, co_resume(co, ...))
end

-- Start callback `name` of `env` for client `cid` in a new coroutine.  A missing callback is
-- reported as done with no results, so optional callbacks need no special case.
function engine.start(env, name, cid, ...)
  local fn = env[name]
  if fn == nil then return nil, "done" end
  collect_if_pending()
  local co = co_create(fn)
  coroutine_cid[co] = cid
  engine_owned[co] = true
  return co, engine.resume(co, ...)
end

-- on_message with the message table built here, so the Python side passes only strings.
function engine.start_message(env, cid, kind, data)
  return engine.start(env, "on_message", cid, { type = kind, data = data, finish = true })
end

-- Run a framing callback (protocol_*) synchronously; it may not wait.  Returns ok, results...
-- It runs in a coroutine of its own so that the instruction limit applies to it as to the
-- other callbacks; a yield there is an error.
local function after_protocol(co, saved_active, saved_cid, saved_protocol, ok, ...)
  disarm_limit()
  set_hard()
  if python_raised then
    python_raised = false
    raw_host.raised()
  end
  if not ok then
    local text = error_text((...))
    active, current_cid, in_protocol = saved_active, saved_cid, saved_protocol
    if active ~= nil or in_protocol then arm_limit() end
    collect_if_full(text)
    return false, text
  end
  active, current_cid, in_protocol = saved_active, saved_cid, saved_protocol
  if active ~= nil or in_protocol then arm_limit() end
  collect_when_high()
  if co_status(co) ~= "dead" then return false, "cannot wait in protocol_*" end
  return true, ...
end

function engine.call_protocol(env, name, cid, ...)
  local fn = env[name]
  if type(fn) ~= "function" then return false, name .. " is not defined" end
  collect_if_pending()
  local saved_active, saved_cid, saved_protocol = active, current_cid, in_protocol
  active, current_cid, in_protocol = nil, cid, true
  local co = co_create(fn)
  engine_owned[co] = true
  if saved_active == nil and not saved_protocol then resume_depth = 0 end
  set_soft()
  arm_limit()
  return after_protocol(co, saved_active, saved_cid, saved_protocol, co_resume(co, ...))
end

-- Raises the Python exception of raw_host.fail out of the runtime, so that lupa lets go of the
-- one it kept.
function engine.rethrow()
  raw_host.fail()
end

function engine.type_of(env, name)
  return type(env[name])
end

-- The buffer object passed to protocol_input (docs/lua-api.md): a snapshot of the unconsumed input
-- of a socket connection, with a read position.  `source` is a table whose [1] is the input string
-- the engine's loop started with and `offset` the bytes of it already consumed, so a run of
-- packets in one chunk reuses one Lua string instead of copying the rest for every packet.
-- Lua strings are immutable: the object is a copy as far as the script can tell.  The metatable
-- is hidden so scripts cannot change the methods every connection shares.
local Buffer = { __metatable = false }
Buffer.__index = Buffer
local floor = math.floor

function Buffer:tostring()
  local whole = self._whole
  if whole == nil then
    whole = self._off == 0 and self._s or str_sub(self._s, self._off + 1)
    self._whole = whole
  end
  return whole
end
function Buffer:position() return self._pos end
function Buffer:length() return #self._s - self._off end
function Buffer:read(n)
  if type(n) ~= "number" then error("bad argument #1 to 'read' (number expected)", 2) end
  n = floor(n)
  if n <= 0 then return "" end
  local pos = self._pos
  if pos + n > #self._s - self._off then return nil, "short" end
  self._pos = pos + n
  local start = self._off + pos
  return str_sub(self._s, start + 1, start + n)
end
Buffer.__tostring = Buffer.tostring

function engine.new_buffer(source, offset)
  return setmetatable({ _s = source[1], _off = offset, _pos = 0 }, Buffer)
end

return engine

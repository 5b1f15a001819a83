-- RFC 6455 WebSocket in Lua, for socket servers (docs/lua-api.md, "socket servers").
--
--   local websocket = require("protocols.websocket")
--   function protocol_input(buf) return websocket.input(buf, "/", on_handshake) end
--   function protocol_decode(packet) return websocket.decode(packet) end
--   function protocol_encode(data, type) return websocket.encode(data, type) end
--   function on_close(client_id, err) websocket.forget(client_id) end
--
-- input() first reads the HTTP upgrade request: it writes the 101 response with conn:send, keeps
-- the request headers (lower-case names) in the context under "headers", calls
-- on_handshake(headers) (returning false from it closes the connection) and clears the buffer.
-- Afterwards each packet is one frame.  decode() returns {type = "text"|"binary", data = ...,
-- finish = <FIN bit>} for data frames (fragments are not reassembled) and nil for control frames,
-- which input() has already answered: a ping gets its pong, a close gets the close reply and
-- the connection is closed.
--
-- Text messages are checked to be UTF-8 frame by frame (a sequence may continue in the next
-- fragment); invalid UTF-8 closes with 1007.  A close frame with a 1-byte payload or an invalid
-- code is answered with 1002, one whose reason is not UTF-8 with 1007.  A data frame longer than
-- the payload limit (M.MAX_PAYLOAD, or the server option "maxPayload") is answered with 1009.
-- The engine's maxMessageSize still bounds a frame that does not arrive in one read.
--
-- The module keeps a little state per connection (handshake done, message type of a fragmented
-- message); on_close must call websocket.forget(client_id).  After a hot reload the state is
-- rebuilt from the "headers" context value.

local bit = require("bit")

local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
local byte, char, sub, find, lower, match, gmatch =
      string.byte, string.char, string.sub, string.find, string.lower, string.match, string.gmatch
local concat, unpack, floor = table.concat, unpack, math.floor

local M = {}

-- Largest data frame payload accepted from a client (larger: close 1009).  The server option
-- "maxPayload" overrides it.  Unmasking and checking a frame are Lua loops run in one callback:
-- 1 MiB stays within the default engine.luavm.maxInstructions (10 000 000); 4 MiB does not.
M.MAX_PAYLOAD = 1024 * 1024
-- Largest opening handshake request accepted.
M.MAX_HANDSHAKE = 8192

local GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
local OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
local KIND = { [OP_TEXT] = "text", [OP_BINARY] = "binary" }
local REASONS = { [400] = "Bad Request", [404] = "Not Found", [426] = "Upgrade Required" }

-- client id -> { kind = type of the current data frame, frag = type of an unfinished message,
--   tail = incomplete UTF-8 sequence at the end of the last text fragment,
--   payload, packet_size = the unmasked payload of the frame input() checked, for decode() }
local states = {}

-- The Sec-WebSocket-Accept value for a Sec-WebSocket-Key.
function M.accept_key(key)
  return mix.base64_encode(mix.sha1_bin(key .. GUID))
end

-- Frames --------------------------------------------------------------------------------------

-- One unmasked frame; `first` is the first byte (FIN and opcode).
local function frame(first, payload)
  local n = #payload
  if n < 126 then
    return char(first, n) .. payload
  elseif n < 65536 then
    return char(first, 126, rshift(n, 8), band(n, 255)) .. payload
  end
  local hi, lo = floor(n / 4294967296), n % 4294967296
  return char(first, 127,
              band(rshift(hi, 24), 255), band(rshift(hi, 16), 255), band(rshift(hi, 8), 255), band(hi, 255),
              band(rshift(lo, 24), 255), band(rshift(lo, 16), 255), band(rshift(lo, 8), 255), band(lo, 255))
    .. payload
end

-- The payload bytes s[first .. first + n - 1] unmasked with the 4 bytes at s[key .. key + 3].
local UNMASK_STEP = 4096
local function unmask(s, key, first, n)
  if n == 0 then return "" end
  local m = { byte(s, key, key + 3) }
  if m[1] == 0 and m[2] == 0 and m[3] == 0 and m[4] == 0 then return sub(s, first, first + n - 1) end
  local parts, count = {}, 0
  local offset = 0  -- payload bytes done; keeps the mask phase across steps
  while offset < n do
    local size = n - offset
    if size > UNMASK_STEP then size = UNMASK_STEP end
    local t = { byte(s, first + offset, first + offset + size - 1) }
    -- UNMASK_STEP is a multiple of 4: every step starts at mask byte 1.
    local m1, m2, m3, m4 = m[1], m[2], m[3], m[4]
    local i = 1
    while i + 3 <= size do
      t[i], t[i + 1], t[i + 2], t[i + 3] = bxor(t[i], m1), bxor(t[i + 1], m2), bxor(t[i + 2], m3), bxor(t[i + 3], m4)
      i = i + 4
    end
    for j = i, size do
      t[j] = bxor(t[j], m[(j - 1) % 4 + 1])
    end
    count = count + 1
    parts[count] = char(unpack(t, 1, size))
    offset = offset + size
  end
  return concat(parts)
end

-- Parse the frame header at the start of `s`.  Returns true, fin, opcode, masked, header size
-- (with the mask key), payload length; nil while `s` is too short; false when it is invalid.
local function header(s)
  local b1, b2 = byte(s, 1, 2)
  if b2 == nil then return nil end
  if band(b1, 0x70) ~= 0 then return false end  -- reserved bits: no extension was negotiated
  local fin, opcode = band(b1, 0x80) ~= 0, band(b1, 0x0f)
  local masked = band(b2, 0x80) ~= 0
  local len, size = band(b2, 0x7f), 2
  if len == 126 then
    local x, y = byte(s, 3, 4)
    if y == nil then return nil end
    len, size = x * 256 + y, 4
  elseif len == 127 then
    local b = { byte(s, 3, 10) }
    if b[8] == nil then return nil end
    if b[1] >= 128 then return false end
    len = 0
    for i = 1, 8 do len = len * 256 + b[i] end
    size = 10
  end
  if masked then size = size + 4 end
  return true, fin, opcode, masked, size, len
end

-- UTF-8 ------------------------------------------------------------------------------------------

-- Check that s is UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
-- Returns nil at the first invalid byte (also when an unfinished sequence at the end can no longer
-- become valid), else the index where an unfinished sequence at the end starts (#s + 1 if none).
-- ASCII runs are skipped by string.find.
local function utf8_scan(s)
  local i, n = 1, #s
  while true do
    i = find(s, "[\128-\255]", i)
    if i == nil then return n + 1 end
    local c, c2, c3, c4 = byte(s, i, i + 3)
    if c < 0xC2 then
      return nil  -- a continuation byte, or an overlong 2-byte lead (C0, C1)
    elseif c < 0xE0 then
      if c2 == nil then return i end
      if c2 < 0x80 or c2 > 0xBF then return nil end
      i = i + 2
    elseif c < 0xF0 then
      if c2 == nil then return i end
      local lo, hi = 0x80, 0xBF
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end  -- overlong; surrogates
      if c2 < lo or c2 > hi then return nil end
      if c3 == nil then return i end
      if c3 < 0x80 or c3 > 0xBF then return nil end
      i = i + 3
    elseif c < 0xF5 then
      if c2 == nil then return i end
      local lo, hi = 0x80, 0xBF
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end  -- overlong; > U+10FFFF
      if c2 < lo or c2 > hi then return nil end
      if c3 == nil then return i end
      if c3 < 0x80 or c3 > 0xBF then return nil end
      if c4 == nil then return i end
      if c4 < 0x80 or c4 > 0xBF then return nil end
      i = i + 4
    else
      return nil
    end
  end
end

-- Whether s is complete, valid UTF-8.
local function utf8_valid(s)
  return utf8_scan(s) == #s + 1
end
M.utf8_valid = utf8_valid

-- Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry; 3000-4999 are for
-- libraries and applications).  1004-1006 and 1015 must not appear in a close frame.
local function valid_close_code(code)
  return (code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014)
         or (code >= 3000 and code <= 4999)
end

-- The handshake ---------------------------------------------------------------------------------

local function reject(conn, status, extra)
  conn:send("HTTP/1.1 " .. status .. " " .. REASONS[status] .. "\r\n" .. (extra or "")
            .. "Content-Length: 0\r\nConnection: close\r\nServer: connmix\r\n\r\n")
  return -1
end

local function has_token(value, token)
  if value == nil then return false end
  for item in gmatch(lower(value), "[^,]+") do
    if match(item, "^%s*(.-)%s*$") == token then return true end
  end
  return false
end

local function handshake(conn, buf, path, on_handshake)
  local s = buf:tostring()
  local stop = find(s, "\r\n\r\n", 1, true)
  if stop == nil then
    if #s > M.MAX_HANDSHAKE then return reject(conn, 400) end
    return 0
  end
  local head = sub(s, 1, stop + 1)
  local line_end = find(head, "\r\n", 1, true)
  local method, uri, version = match(sub(head, 1, line_end - 1), "^(%S+) (%S+) (%S+)$")
  if method ~= "GET" or version ~= "HTTP/1.1" then return reject(conn, 400) end
  local headers = {}
  for line in gmatch(sub(head, line_end + 2), "(.-)\r\n") do
    local name, value = match(line, "^([^:%s]+):%s*(.-)%s*$")
    if name == nil then return reject(conn, 400) end
    name = lower(name)
    local before = headers[name]
    headers[name] = before and (before .. ", " .. value) or value
  end
  path = path or "/"
  if path ~= "/" and sub(match(uri, "^[^?#]*"), 1, #path) ~= path then return reject(conn, 404) end
  if not has_token(headers.upgrade, "websocket") or not has_token(headers.connection, "upgrade") then
    return reject(conn, 400)
  end
  if headers["sec-websocket-version"] ~= "13" then
    return reject(conn, 426, "Sec-WebSocket-Version: 13\r\n")
  end
  local key = headers["sec-websocket-key"]
  local raw = key and mix.base64_decode(key)
  if raw == nil or #raw ~= 16 then return reject(conn, 400) end
  conn:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            .. "Sec-WebSocket-Accept: " .. M.accept_key(key) .. "\r\nServer: connmix\r\n\r\n")
  conn:set_context_value("headers", headers)
  states[conn:client_id()] = {}
  if on_handshake and on_handshake(headers) == false then return -1 end
  -- RFC 6455 4.1: the client sends nothing more before it has the response.
  conn:clear_buffer()
  return 0
end

-- The state of this connection, or nil before its handshake.
local function state_of(conn)
  local cid = conn:client_id()
  local st = states[cid]
  if st == nil and conn:context_value("headers") ~= nil then
    st = {}  -- a hot reload dropped the module state of an open connection
    states[cid] = st
  end
  return st
end

-- API ----------------------------------------------------------------------------------------

-- Send a close frame with `code` and close the connection; the result for protocol_input.
local function fail(conn, code)
  conn:send(frame(0x80 + OP_CLOSE, char(rshift(code, 8), band(code, 255))))
  conn:close()
  return -1
end

local function payload_limit()
  local option = mix.server and mix.server.option and mix.server.option("maxPayload")
  return option and tonumber(option) or M.MAX_PAYLOAD
end

-- protocol_input: 0 (need more bytes), -1 (close) or the size of the next frame.
function M.input(buf, path, on_handshake)
  local conn = mix.socket.tcp()
  local st = state_of(conn)
  if st == nil then return handshake(conn, buf, path, on_handshake) end
  -- Only the header is read: the rest of the buffer may hold many more frames.
  local avail = buf:length()
  local head = buf:read(avail < 14 and avail or 14)
  local ok, fin, opcode, masked, size, len = header(head)
  if ok == nil then return 0 end
  if not ok or not masked then return -1 end  -- clients must mask (RFC 6455 5.1)
  st.payload = nil
  if opcode >= 8 then
    if not fin or len > 125 then return -1 end
  else
    local limit = st.limit
    if limit == nil then
      limit = payload_limit()  -- server options change for new connections only
      st.limit = limit
    end
    if len > limit then return fail(conn, 1009) end  -- message too big
  end
  local total = size + len
  if avail < total then return 0 end
  local function payload()
    local s = total <= #head and sub(head, 1, total) or head .. buf:read(total - #head)
    return unmask(s, size - 3, size + 1, len)
  end
  if opcode == OP_PING then
    conn:send(frame(0x80 + OP_PONG, payload()))
  elseif opcode == OP_CLOSE then
    local data = payload()
    local reply = ""
    if #data == 1 then
      return fail(conn, 1002)
    elseif #data >= 2 then
      local hi, lo = byte(data, 1, 2)
      local code = hi * 256 + lo
      if not valid_close_code(code) then return fail(conn, 1002) end
      if not utf8_valid(sub(data, 3)) then return fail(conn, 1007) end
      reply = sub(data, 1, 2)
    end
    conn:send(frame(0x80 + OP_CLOSE, reply))
    conn:close()  -- a clean close: on_close gets nil
    return -1
  elseif opcode == OP_PONG then
    -- nothing to do; it still counted as activity
  elseif opcode == OP_CONTINUATION or opcode == OP_TEXT or opcode == OP_BINARY then
    if opcode == OP_CONTINUATION then
      if st.frag == nil then return -1 end
      st.kind = st.frag
      if fin then st.frag = nil end
    else
      if st.frag ~= nil then return -1 end
      st.kind = KIND[opcode]
      st.tail = nil
      if not fin then st.frag = st.kind end
    end
    if st.kind == "text" then
      local data = payload()
      local s = st.tail and (st.tail .. data) or data
      local rest = utf8_scan(s)
      if rest == nil or (fin and rest <= #s) then return fail(conn, 1007) end  -- invalid payload
      st.tail = (not fin and rest <= #s) and sub(s, rest) or nil
      st.payload, st.packet_size = data, total
    end
  else
    return -1  -- reserved opcode
  end
  return total
end

-- protocol_decode: {type, data, finish} for a data frame, nil for a control frame.
function M.decode(packet)
  local ok, fin, opcode, _, size, len = header(packet)
  if not ok or opcode >= 8 then return nil end
  local st = state_of(mix.socket.tcp())
  local kind = KIND[opcode] or (st and st.kind) or "binary"
  local data
  if st and st.payload and st.packet_size == #packet then
    data = st.payload  -- unmasked already by input() for the UTF-8 check
  else
    data = unmask(packet, size - 3, size + 1, len)
  end
  if st then st.payload = nil end
  return { type = kind, data = data, finish = fin }
end

-- protocol_encode: one unmasked final frame ("text" unless type is "binary").
function M.encode(data, kind)
  return frame(0x80 + (kind == "binary" and OP_BINARY or OP_TEXT), data)
end

function M.send_text(conn, s)
  return conn:send(M.encode(s, "text"))
end

function M.send_binary(conn, s)
  return conn:send(M.encode(s, "binary"))
end

-- Send a close frame (default 1000) and close the connection.
function M.close(conn, code, reason)
  code = code or 1000
  conn:send(frame(0x80 + OP_CLOSE, char(rshift(code, 8), band(code, 255)) .. (reason or "")))
  return conn:close()
end

-- Whether the handshake of the current connection (or of `conn`) has been done.
function M.is_open(conn)
  conn = conn or mix.socket.tcp()
  return conn ~= nil and state_of(conn) ~= nil
end

-- Drop the module's state of a closed connection (call it from on_close).
function M.forget(client_id)
  states[client_id] = nil
end

return M

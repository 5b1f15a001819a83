-- RFC 6455 WebSocket in Lua, for socket servers (SPEC 4.3, protocols.websocket).
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
-- The module keeps a little state per connection (handshake done, message type of a fragmented
-- message); on_close must call websocket.forget(client_id).  After a hot reload the state is
-- rebuilt from the "headers" context value.

local bit = require("bit")

local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
local byte, char, sub, find, lower, match, gmatch =
      string.byte, string.char, string.sub, string.find, string.lower, string.match, string.gmatch
local concat, unpack, floor = table.concat, unpack, math.floor

local M = {}

-- Largest data frame payload accepted from a client (larger: the connection is closed).
M.MAX_PAYLOAD = 65535
-- Largest opening handshake request accepted.
M.MAX_HANDSHAKE = 8192

local GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
local OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
local KIND = { [OP_TEXT] = "text", [OP_BINARY] = "binary" }
local REASONS = { [400] = "Bad Request", [404] = "Not Found", [426] = "Upgrade Required" }

-- client id -> { kind = type of the current data frame, frag = type of an unfinished message }
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
    for i = 1, size do
      t[i] = bxor(t[i], m[(offset + i - 1) % 4 + 1])
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
  if opcode >= 8 then
    if not fin or len > 125 then return -1 end
  elseif len > M.MAX_PAYLOAD then
    return -1
  end
  local total = size + len
  if avail < total then return 0 end
  if opcode == OP_PING or opcode == OP_CLOSE then
    local s = total <= #head and sub(head, 1, total) or head .. buf:read(total - #head)
    local payload = unmask(s, size - 3, size + 1, len)
    if opcode == OP_PING then
      conn:send(frame(0x80 + OP_PONG, payload))
    else
      if #payload == 1 then payload = char(0x03, 0xEA) else payload = sub(payload, 1, 2) end  -- 1002
      conn:send(frame(0x80 + OP_CLOSE, payload))
      conn:close()  -- a clean close: on_close gets nil
      return -1
    end
  elseif opcode == OP_PONG then
    -- nothing to do; it still counted as activity
  elseif opcode == OP_CONTINUATION then
    if st.frag == nil then return -1 end
    st.kind = st.frag
    if fin then st.frag = nil end
  elseif opcode == OP_TEXT or opcode == OP_BINARY then
    if st.frag ~= nil then return -1 end
    st.kind = KIND[opcode]
    if not fin then st.frag = st.kind end
  else
    return -1  -- reserved opcode
  end
  return total
end

-- protocol_decode: {type, data, finish} for a data frame, nil for a control frame.
function M.decode(packet)
  local ok, fin, opcode, _, size, len = header(packet)
  if not ok or opcode >= 8 then return nil end
  local kind = KIND[opcode]
  if kind == nil then
    local st = state_of(mix.socket.tcp())
    kind = st and st.kind or "binary"
  end
  return { type = kind, data = unmask(packet, size - 3, size + 1, len), finish = fin }
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

-- Newline framing for socket servers (docs/lua-api.md, "socket servers").
--
--   local text = require("protocols.text")
--   function protocol_input(buf) return text.input(buf) end
--   function protocol_decode(packet) return text.decode(packet) end
--   function protocol_encode(data, type) return text.encode(data) end
--
-- A packet is one line including its "\n"; on_message gets the line without "\n" (or "\r\n").

local find, sub, byte = string.find, string.sub, string.byte

local M = {}

-- The longest line accepted, without its "\n".
M.MAX_LINE = 65535

-- 1-based index of the first "\n" (the packet ends there), 0 while there is none, -1 when the
-- buffer already holds more than MAX_LINE bytes without one.
function M.input(buf)
  local s = buf:tostring()
  local i = find(s, "\n", 1, true)
  if i then return i end
  if #s > M.MAX_LINE then return -1 end
  return 0
end

-- The line without its trailing "\n" and a "\r" before it.
function M.decode(packet)
  local n = #packet
  if byte(packet, n) == 10 then n = n - 1 end
  if n > 0 and byte(packet, n) == 13 then n = n - 1 end
  return sub(packet, 1, n)
end

-- One line for the client.
function M.encode(s)
  return s .. "\n"
end

return M

-- Newline-delimited JSON requests for socket servers (docs/lua-api.md, "socket servers").
--
-- Framing as protocols.text.  decode() returns the decoded request table; a line that is not a
-- JSON object with "method" and "params" closes the connection (and produces no message).
--
--   local jsonrpc = require("protocols.jsonrpc")
--   function protocol_input(buf) return jsonrpc.input(buf) end
--   function protocol_decode(packet) return jsonrpc.decode(packet) end
--   function protocol_encode(data, type) return jsonrpc.encode(data) end
--   function on_message(req) mix.socket.tcp():send(jsonrpc.encode_table({id = req.id, result = 1})) end

local text = require("protocols.text")

local type = type

local M = {}

M.input = text.input

function M.decode(packet)
  local request = mix.json_decode(text.decode(packet))
  if type(request) ~= "table" or request.method == nil or request.params == nil then
    local conn = mix.socket.tcp()
    if conn then conn:close() end
    return nil
  end
  return request
end

-- A string that already is JSON text, as one line.
function M.encode(s)
  return s .. "\n"
end

-- A table, JSON-encoded, as one line; nil, err when it cannot be encoded.
function M.encode_table(t)
  local s, err = mix.json_encode(t)
  if s == nil then return nil, err end
  return s .. "\n"
end

return M

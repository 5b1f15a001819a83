-- WebSocket over a socket server, framed in Lua by protocols.websocket (docs/lua-api.md,
-- "Shipped scripts").
-- Behaves like the default entry.websocket.lua: the handshake headers are kept in the context
-- (the codec stores them under "headers") and every message goes to the queue "foo" with the
-- context.  The accepted path is the server option "path" (prefix match, default "/").
--
--   engine:
--     servers:
--       - protocol: socket
--         port: 6791
--         entry: lua/entry.socket.websocket.lua
--         options:
--           - name: path
--             value: /

local websocket = require("protocols.websocket")

function on_connect(client_id)
end

function protocol_input(buf)
  return websocket.input(buf, mix.server.option("path") or "/")
end

function protocol_decode(packet)
  return websocket.decode(packet)
end

function protocol_encode(data, type)
  if not websocket.is_open() then return nil end  -- no frames before the 101 response
  return websocket.encode(data, type)
end

function on_message(msg)
  local conn = mix.socket.tcp()
  if msg.type == "binary" then
    -- JSON cannot carry raw bytes: the consumer knows type "binary" means base64.
    msg.data = mix.base64_encode(msg.data)
  end
  local _, err = mix.queue.push("foo", { msg = msg, ctx = conn:context() })
  if err then
    mix.log(mix.WARN, "queue push failed: " .. err)
    websocket.send_text(conn, mix.json_encode({ error = err }))
  end
end

function on_close(client_id, err)
  websocket.forget(client_id)
  -- mix.log(mix.DEBUG, "client " .. client_id .. " closed: " .. tostring(err))
end

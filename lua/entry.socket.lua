-- The socket server example (docs/lua-api.md, "Shipped scripts"): one text line per message, framed
-- by protocols.text.  Like the default websocket entry, every line goes to the queue "foo" together
-- with the connection's context; a back-end consumes it through the API server (queue.consume)
-- and answers with mesh.send / mesh.publish, which reach the client as one line each.
--
--   engine:
--     servers:
--       - protocol: socket
--         port: 6791
--         entry: lua/entry.socket.lua

local text = require("protocols.text")

function on_connect(client_id)
end

function protocol_input(buf)
  return text.input(buf)
end

function protocol_decode(packet)
  return text.decode(packet)
end

function protocol_encode(data, type)
  return text.encode(data)
end

function on_message(line)
  local conn = mix.socket.tcp()
  local _, err = mix.queue.push("foo", { msg = line, ctx = conn:context() })
  if err then
    mix.log(mix.WARN, "queue push failed: " .. err)
    conn:send(text.encode(mix.json_encode({ error = err })))
  end
end

function on_close(client_id, err)
  -- mix.log(mix.DEBUG, "client " .. client_id .. " closed: " .. tostring(err))
end

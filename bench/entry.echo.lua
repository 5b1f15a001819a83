-- Benchmark entry (bench/run.py, the workers phase): every message goes back to its sender from
-- Lua, the smallest round trip through the engine's Lua callback.

function on_handshake(client_id, headers, server)
end

function on_message(msg)
  mix.websocket():send(msg.data)
end

function on_close(client_id, err)
end

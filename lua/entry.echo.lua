-- Echo (docs/lua-api.md, "Shipped scripts"): every message goes back to its sender with the same
-- type.  Used by the Autobahn Testsuite conformance run and the echo benchmarks.

function on_handshake(client_id, headers, server)
end

function on_message(msg)
  mix.websocket():send(msg.data, msg.type)
end

function on_close(client_id, err)
end

-- Benchmark entry (bench/run.py, the mesh.publish row): every client joins channel "bench" in
-- on_handshake, so a back-end's mesh.publish("bench", ...) reaches all of them.  Messages from
-- clients are ignored.

function on_handshake(client_id, headers, server)
  mix.websocket():subscribe("bench")
end

function on_message(msg)
end

function on_close(client_id, err)
end

-- Benchmark entry (bench/run.py, the Lua mix.mesh.send rows): a message "<client_id> <text>" is
-- relayed to that client with mix.mesh.send (across engines when the id belongs to another one);
-- an error goes back to the sender as "err:<error>".  Any other message goes to queue "foo", which
-- is how the load generator learns the receivers' client ids.

function on_handshake(client_id, headers, server)
end

function on_message(msg)
  local target = string.match(msg.data, "^(%d+) ")
  if target then
    local err = mix.mesh.send(target, msg.data)
    if err then
      mix.websocket():send("err:" .. err)
    end
    return
  end
  mix.queue.push("foo", { msg = msg })
end

function on_close(client_id, err)
end

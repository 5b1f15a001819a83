-- The default entry script (docs/lua-api.md, "Shipped scripts"): every client message goes to the
-- queue "foo" together with the connection's context, where a back-end consumes it through the API
-- server (queue.consume) and answers with mesh.send / mesh.publish / conn.call.

function on_handshake(client_id, headers, server)
  -- Keep the handshake headers in the context: they travel with every queued message.
  mix.websocket():set_context_value("headers", headers)
end

function on_message(msg)
  local conn = mix.websocket()
  if msg.type == "binary" then
    -- JSON cannot carry raw bytes: the consumer knows type "binary" means base64.
    msg.data = mix.base64_encode(msg.data)
  end
  local _, err = mix.queue.push("foo", { msg = msg, ctx = conn:context() })
  if err then
    mix.log(mix.WARN, "queue push failed: " .. err)
    conn:send(mix.json_encode({ error = err }))
  end
end

function on_close(client_id, err)
  -- mix.log(mix.DEBUG, "client " .. client_id .. " closed: " .. tostring(err))
end

-- prettyprint(v): print a value (tables nested, keys sorted) readably through print().
local function render(value, indent, seen)
  if type(value) ~= "table" then
    if type(value) == "string" then return string.format("%q", value) end
    return tostring(value)
  end
  if seen[value] then return "<cycle>" end
  seen[value] = true
  local keys = {}
  for k in pairs(value) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  if #keys == 0 then return "{}" end
  local pad = string.rep("  ", indent + 1)
  local lines = { "{" }
  for _, k in ipairs(keys) do
    local name = type(k) == "string" and k or "[" .. tostring(k) .. "]"
    lines[#lines + 1] = pad .. name .. " = " .. render(value[k], indent + 1, seen) .. ","
  end
  lines[#lines + 1] = string.rep("  ", indent) .. "}"
  seen[value] = nil
  return table.concat(lines, "\n")
end

function prettyprint(value)
  print(render(value, 0, {}))
end

return prettyprint

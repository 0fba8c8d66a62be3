-- wrk script: every request carries X-User-Id, one of USERS distinct ids, so a
-- proxy routes each request by its sticky key (the hash is really computed).
--
-- The request strings are built once in init(), so the per-request cost in wrk
-- is a table lookup: the load generator stays as cheap as it was without a
-- script, and every target pays for the same bytes.
--
-- Usage: wrk -s bench/users.lua URL [-- USERS]   (default 10000)

local reqs = {}
local n = 0
local i = 0

function init(args)
   local users = tonumber(args[1]) or 10000
   -- each wrk thread has its own Lua state; start threads at different ids
   local offset = math.random(0, users - 1)
   for k = 1, users do
      local id = "user-" .. ((k + offset) % users)
      local headers = {}
      for name, value in pairs(wrk.headers) do
         headers[name] = value
      end
      headers["X-User-Id"] = id
      reqs[k] = wrk.format(nil, nil, headers)
   end
   n = users
end

function request()
   i = i + 1
   if i > n then
      i = 1
   end
   return reqs[i]
end

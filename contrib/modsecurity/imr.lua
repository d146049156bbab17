-- imr.lua: report the client to the imr daemon from inside the web server.
--
-- Runs in the worker process itself (ModSecurity v2/Apache: Lua 5.1;
-- libmodsecurity v3/nginx: Lua 5.3), so there is no fork: one Unix-socket
-- round trip bounded by TIMEOUT. Fails open: if the daemon is down, slow or
-- hung, the request goes on and one line goes to the web server's error log.
--
-- Values come from TX variables set by the matching rule, never from headers:
--   setvar:tx.imr_rule=%{rule.id}   (the rule id, becomes the source tag)
-- and the address from REMOTE_ADDR (the real client behind mod_remoteip or
-- nginx's realip module). On v3 never ask m.getvar() for a collection it does
-- not know (RULE.id, ENV.x): that throws and kills the nginx worker.
--
-- Needs Debian's lua-socket (socket.unix). Edit SOCKET_PATH to match
-- [server] socket in imr's configuration.

local SOCKET_PATH = "/run/imr/imr.sock"
local TIMEOUT = 0.3 -- seconds, for connect, send and reply together

-- ip is nil or a validated address (see main).
local function warn(msg, ip)
  if _VERSION == "Lua 5.1" then
    -- ModSecurity v2: level 1 reaches Apache's error log, with the request's
    -- context: time, [client ...], hostname, uri and unique_id.
    m.log(1, "imr: not blocked: " .. msg)
  else
    -- libmodsecurity v3 sends m.log() only to its debug log; nginx points a
    -- worker's stderr at its error_log, but writes what comes there as it is:
    -- add the time and the client in nginx's own format ("client: " without
    -- ", server: " after it, so imr logscan never takes this line for the
    -- client's offence).
    local line = os.date("%Y/%m/%d %H:%M:%S") .. " [warn] imr: not blocked: " .. msg
    if ip then
      line = line .. ", client: " .. ip
    end
    io.stderr:write(line .. "\n")
    io.stderr:flush()
  end
end

local function request_line(ip, rule)
  -- ip and rule are validated below, so they need no JSON escaping.
  local source, reason = "modsecurity", "ModSecurity rule"
  if rule then
    source = "modsecurity:" .. rule
    reason = "ModSecurity rule " .. rule
  end
  return '{"v":1,"op":"block","ip":"' .. ip .. '","reason":"' .. reason
    .. '","source":"' .. source .. '"}\n'
end

local function block(path, line)
  local ok, socket = pcall(require, "socket")
  local ok2, unix = pcall(require, "socket.unix")
  if not (ok and ok2) then
    return nil, "lua-socket (socket.unix) is not installed"
  end
  -- luasocket 3.x returns a table with stream(); older versions a callable.
  local sock = (type(unix) == "table" and unix.stream) and unix.stream() or unix()
  -- luasocket's timeouts restart with every call: keep one deadline for all three.
  local deadline = socket.gettime() + TIMEOUT
  local function left()
    return math.max(deadline - socket.gettime(), 0.001)
  end
  sock:settimeout(left())
  local res, err = sock:connect(path)
  if not res then
    sock:close()
    return nil, "cannot connect to " .. path .. ": " .. tostring(err)
  end
  sock:settimeout(left())
  res, err = sock:send(line)
  if not res then
    sock:close()
    return nil, "cannot send to " .. path .. ": " .. tostring(err)
  end
  local reply
  sock:settimeout(left())
  reply, err = sock:receive("*l")
  sock:close()
  if not reply then
    return nil, "no reply from the imr daemon (" .. tostring(err) .. ")"
  end
  if string.find(reply, '"ok":true', 1, true) then
    return reply
  end
  -- Keep the log entry on one line and short.
  return nil, "the imr daemon refused: " .. string.sub(string.gsub(reply, "%c", " "), 1, 300)
end

function main()
  local ip = m.getvar("REMOTE_ADDR") or ""
  -- Addresses only: digits, hex, dots and colons (IPv4, IPv6, v4-mapped).
  if #ip == 0 or #ip > 45 or not string.match(ip, "^[0-9A-Fa-f:.]+$") then
    warn("no valid client address")
    return nil
  end
  local rule = m.getvar("TX.imr_rule")
  if rule and (#rule > 10 or not string.match(rule, "^[0-9]+$")) then
    rule = nil
  end
  local ok, res, err = pcall(block, SOCKET_PATH, request_line(ip, rule))
  if not ok then
    warn(tostring(res), ip)
  elseif not res then
    warn(err, ip)
  end
  return nil
end

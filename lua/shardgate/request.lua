-- shardgate.request: accessors for the `req` table a hook receives, so a
-- script reads headers, path segments, path parameters, query arguments
-- and bearer tokens the same careful way everywhere.
--
-- It does not build requests (the C core does; shardgate.testing does for
-- specs) and keeps no state. Every function takes req first and reads only
-- req.header, req.path and req.query (what DESIGN.md §4 promises: header
-- names are lower-case, path is the raw path without the query string,
-- query holds decoded arguments). Functions raise only on a wrong
-- argument type (a script bug), never on what a client sent.

local byte, char, find, format, gsub, lower, sub =
  string.byte, string.char, string.find, string.format, string.gsub, string.lower, string.sub
local error, ipairs, tonumber, type = error, ipairs, tonumber, type

local request = {}

local function check_req(req, fname)
  if type(req) ~= "table" then
    error(format("request.%s: req must be the request table, got %s", fname, type(req)), 3)
  end
end

local function check_name(name, fname, what)
  if type(name) ~= "string" then
    error(format("request.%s: %s must be a string, got %s", fname, what, type(name)), 3)
  end
end

-- header(req, name) -> value or nil. Name in any case ("X-Org-Id" reads
-- req.header["x-org-id"]); a repeated header is its values joined by ", ".
function request.header(req, name)
  check_req(req, "header")
  check_name(name, "header", "name")
  local h = req.header
  return h and h[lower(name)]
end

-- query(req, name) -> the decoded value of query argument name, or nil
-- ("" for ?flag with no value). Names are case-sensitive.
function request.query(req, name)
  check_req(req, "query")
  check_name(name, "query", "name")
  local q = req.query
  return q and q[name]
end

local function unescape(s)
  return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- The raw segments of path, without empty ones.
local function raw_segments(path)
  local out, n = {}, 0
  for seg in path:gmatch("[^/]+") do
    n = n + 1
    out[n] = seg
  end
  return out
end

-- path_segments(req) -> list of %-decoded segments: "/orgs/a%20b/query"
-- gives {"orgs", "a b", "query"}. Empty segments ("//") are skipped; "%2F"
-- decodes to "/" inside its segment (split first, decode after).
function request.path_segments(req)
  check_req(req, "path_segments")
  local segs = raw_segments(req.path or "")
  for i = 1, #segs do segs[i] = unescape(segs[i]) end
  return segs
end

-- path_param(req, pattern) -> table of captures, or nil when req.path does
-- not match. pattern is a path whose segments are literals, ":name"
-- (captures one non-empty segment, %-decoded) or "*" (any one segment).
-- It matches the start of the path: "/orgs/:id" matches "/orgs/42" and
-- "/orgs/42/query" (giving {id = "42"}) but not "/orgs" or "/teams/42".
function request.path_param(req, pattern)
  check_req(req, "path_param")
  check_name(pattern, "path_param", "pattern")
  if byte(pattern, 1) ~= 47 then  -- '/'
    error(format("request.path_param: pattern must start with '/', got '%s'", pattern), 2)
  end
  local want = raw_segments(pattern)
  local have = request.path_segments(req)
  if #have < #want then return nil end
  local captures = {}
  for i, w in ipairs(want) do
    if sub(w, 1, 1) == ":" then
      captures[sub(w, 2)] = have[i]
    elseif w ~= "*" and w ~= have[i] then
      return nil
    end
  end
  return captures
end

-- bearer(req) -> the token of an "Authorization: Bearer <token>" header
-- (scheme in any case, RFC 6750 §2.1), or nil when there is none or the
-- header uses another scheme.
function request.bearer(req)
  check_req(req, "bearer")
  local h = req.header
  local v = h and h.authorization
  if type(v) ~= "string" then return nil end
  local scheme, token = v:match("^%s*(%S+)%s+(%S+)%s*$")
  if not scheme or lower(scheme) ~= "bearer" then return nil end
  if find(token, ",", 1, true) then return nil end  -- several Authorization headers joined
  return token
end

return request

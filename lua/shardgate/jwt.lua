-- shardgate.jwt: verify (and, for tests, sign) JSON Web Tokens signed with
-- HMAC-SHA256 ("HS256", RFC 7519 + RFC 7515), so a routing script can take
-- the tenant from a claim the client cannot forge.
--
-- Only HS256: a token whose header names any other alg ("none", "HS512",
-- "RS256", ...) is refused, never "downgraded". It does not fetch keys,
-- does not check aud/iss (a script compares claims itself) and never
-- raises on a bad token: verify_hs256 returns nil and a short reason that
-- is safe to log (it never contains the token or the secret). Pure Lua on
-- shardgate.crypto and shardgate.json; nothing blocks.

local crypto = require "shardgate.crypto"
local json = require "shardgate.json"

local find, format, sub = string.find, string.format, string.sub
local huge = math.huge
local error, getmetatable, os_time, pairs, type = error, getmetatable, os.time, pairs, type

local jwt = {}

-- Longer tokens are refused before any work: request heads are at most
-- 16 KiB anyway, and this bounds the time one verification can take.
local MAX_TOKEN = 8192

local function check_secret(secret, fname)
  if type(secret) ~= "string" or secret == "" then
    error(format("jwt.%s: secret must be a non-empty string, got %s", fname,
      type(secret) == "string" and "an empty string" or type(secret)), 3)
  end
end

-- The JSON object encoded in one base64url segment, or nil.
local function decode_segment(seg)
  local text = crypto.base64url_decode(seg)
  if not text then return nil end
  local v = json.decode(text)
  if type(v) ~= "table" or getmetatable(v) == json.array_mt then return nil end
  return v
end

-- A NumericDate claim (RFC 7519 §2): absent, or a finite number.
local function bad_date(v)
  return v ~= nil and (type(v) ~= "number" or v ~= v or v == huge or v == -huge)
end

-- Check the header and signature of token; returns header, payload segment
-- or nil, reason.
local function check_signature(token, secret)
  if type(token) ~= "string" or token == "" then return nil, "no token" end
  if #token > MAX_TOKEN then return nil, "malformed token (too long)" end
  local d1 = find(token, ".", 1, true)
  local d2 = d1 and find(token, ".", d1 + 1, true)
  if not d2 or find(token, ".", d2 + 1, true) then return nil, "malformed token" end
  local header = decode_segment(sub(token, 1, d1 - 1))
  if not header then return nil, "malformed token" end
  if header.alg == nil then return nil, "missing alg" end
  if header.alg ~= "HS256" then
    local alg = header.alg
    return nil, format("unsupported alg '%s'", type(alg) == "string" and sub(alg, 1, 32) or type(alg))
  end
  -- RFC 7515 §4.1.11: extensions we do not understand must be refused.
  if header.crit ~= nil then return nil, "unsupported crit header" end
  local sig = crypto.base64url_decode(sub(token, d2 + 1))
  if not sig then return nil, "malformed token" end
  local expected = crypto.hmac_sha256(secret, sub(token, 1, d2 - 1))
  if not crypto.equal(sig, expected) then return nil, "bad signature" end
  return header, sub(token, d1 + 1, d2 - 1)
end

-- verify_hs256(token, secret [, opts]) -> claims, header | nil, reason
--
-- token: the compact JWS string ("xxx.yyy.zzz"), e.g. from
--   require("shardgate.request").bearer(req); nil gives nil, "no token".
-- secret: the shared key (a string of bytes); a missing secret is a
--   programming error and raises.
-- opts.now: the time to check exp/nbf against (default os.time());
-- opts.leeway: seconds of clock skew allowed on both (default 0).
--
-- Reasons: "no token", "malformed token", "malformed token (too long)",
-- "missing alg", "unsupported alg 'X'", "unsupported crit header",
-- "bad signature", "malformed claims", "token expired", "token not yet valid".
function jwt.verify_hs256(token, secret, opts)
  check_secret(secret, "verify_hs256")
  opts = opts or {}
  local header, payload = check_signature(token, secret)
  if not header then return nil, payload end
  local claims = decode_segment(payload)
  if not claims or bad_date(claims.exp) or bad_date(claims.nbf) then
    return nil, "malformed claims"
  end
  local now = opts.now or os_time()
  local leeway = opts.leeway or 0
  -- §4.1.4: the token must not be accepted on or after exp.
  if claims.exp and now >= claims.exp + leeway then return nil, "token expired" end
  if claims.nbf and now < claims.nbf - leeway then return nil, "token not yet valid" end
  return claims, header
end

-- sign_hs256(claims, secret [, header]) -> token
--
-- A compact HS256 token for claims (a table). Meant for specs that need a
-- token to send; header adds fields (alg is always "HS256").
function jwt.sign_hs256(claims, secret, header)
  check_secret(secret, "sign_hs256")
  if type(claims) ~= "table" then
    error("jwt.sign_hs256: claims must be a table, got " .. type(claims), 2)
  end
  local h = { typ = "JWT" }
  for k, v in pairs(header or {}) do h[k] = v end
  h.alg = "HS256"
  local input = crypto.base64url_encode(json.encode(h)) .. "."
    .. crypto.base64url_encode(json.encode(claims))
  return input .. "." .. crypto.base64url_encode(crypto.hmac_sha256(secret, input))
end

return jwt

-- scripts/jwt_claim.lua — the tenant is a claim of a verified JWT (HS256)
-- in the Authorization header, so a client cannot name another tenant by
-- changing a header: only a token signed with the shared secret counts.
-- Tenants are spread with jump consistent hashing.
--
-- Needs: header "Authorization: Bearer <token>". Settings, from the config:
--   settings = {
--     jwt_secret = env("JWT_SECRET"),  -- required: the HS256 key
--     jwt_claim  = "org_id",           -- optional: the claim holding the tenant (default org_id)
--     jwt_leeway = 30,                 -- optional: seconds of clock skew allowed on exp/nbf (default 0)
--   }
-- A missing or empty jwt_secret makes the script fail to load (the reload
-- fails and names this file), rather than refuse every request later.
--
-- What a client sees when its token does not verify (missing, malformed,
-- another alg such as "none", bad signature, expired, not yet valid, no
-- tenant claim): 400 no_tenant. tenant() returns nil and the script has no
-- fanout hook, so the gateway refuses the request as it refuses any
-- request it cannot attribute to a tenant. Not 500: a bad token is the
-- client's fault, not a broken script, and a 500 script_error would page
-- whoever watches gateway errors every time someone sends an old token.
-- The reason is logged (warn, with this file's line) but not sent to the
-- client, so a prober learns nothing about which check failed. (A hook
-- cannot answer 401: authentication that must say 401 belongs in front of
-- routing, not in the script.)
--
-- Example:
--   TOKEN=<HS256 token of {"org_id": "42", "exp": ...} signed with $JWT_SECRET>
--   curl -s localhost:8080/query -H "Authorization: Bearer $TOKEN" -d '{"sql": "select 1"}'
--     → tenant "42", shard_1

local sg = require "shardgate"

local secret = sg.settings.jwt_secret
if type(secret) ~= "string" or secret == "" then
  error("settings.jwt_secret is not set: add settings = { jwt_secret = env(\"JWT_SECRET\") } to the config")
end
local claim = sg.settings.jwt_claim or "org_id"
local leeway = sg.settings.jwt_leeway or 0

local route = {}

function route.tenant(req)
  local claims, reason = sg.jwt.verify_hs256(sg.request.bearer(req), secret, { leeway = leeway })
  if not claims then
    sg.log.warn("request refused: %s", reason)
    return nil
  end
  local tenant = claims[claim]
  if type(tenant) == "string" and tenant ~= "" then return tenant end
  -- A number as its decimal string: the same shard as the string form, and
  -- logs show every digit (a number tenant would be shown as 1.2345e+15).
  if type(tenant) == "number" and tenant >= 0 and tenant < 2 ^ 53 and tenant % 1 == 0 then
    return ("%d"):format(tenant)
  end
  sg.log.warn("request refused: token has no usable '%s' claim", claim)
  return nil
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

return route

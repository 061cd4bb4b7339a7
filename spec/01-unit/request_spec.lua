-- Unit spec for shardgate.request: the request accessors routing scripts
-- use (header, query, path_segments, path_param, bearer), on request tables
-- shaped as hooks see them, and from inside the script sandbox.

local request = require "shardgate.request"
local sandbox = require "shardgate.sandbox"

local function req(t)
  return {
    method = t.method or "POST",
    path = t.path or "/query",
    header = t.header or {},
    query = t.query or {},
    body = t.body or "",
  }
end

describe("shardgate.request", function()
  describe("header", function()
    it("reads a header by any case of its name", function()
      local r = req{ header = { ["x-organization-id"] = "42" } }
      assert.equal("42", request.header(r, "X-Organization-Id"))
      assert.equal("42", request.header(r, "x-organization-id"))
      assert.equal("42", request.header(r, "X-ORGANIZATION-ID"))
    end)

    it("gives nil for a header that is not there", function()
      assert.is_nil(request.header(req{}, "X-Organization-Id"))
      assert.is_nil(request.header({ path = "/query" }, "X-Organization-Id"))
    end)

    it("refuses a name that is not a string, naming the caller's line", function()
      assert.has_error(function() request.header(req{}, nil) end,
        "request.header: name must be a string, got nil")
      assert.has_error(function() request.header(nil, "x") end,
        "request.header: req must be the request table, got nil")
    end)
  end)

  describe("query", function()
    it("reads a decoded query argument by its exact name", function()
      local r = req{ query = { org = "a b", flag = "" } }
      assert.equal("a b", request.query(r, "org"))
      assert.equal("", request.query(r, "flag"))
      assert.is_nil(request.query(r, "ORG"))
      assert.is_nil(request.query(r, "missing"))
    end)
  end)

  describe("path_segments", function()
    it("splits the path and %-decodes each segment", function()
      assert.same({ "orgs", "42", "query" }, request.path_segments(req{ path = "/orgs/42/query" }))
      assert.same({ "orgs", "a b", "query" }, request.path_segments(req{ path = "/orgs/a%20b/query" }))
    end)

    it("skips empty segments", function()
      assert.same({ "orgs", "42" }, request.path_segments(req{ path = "//orgs//42/" }))
      assert.same({}, request.path_segments(req{ path = "/" }))
    end)

    it("decodes %2F inside a segment after splitting", function()
      assert.same({ "orgs", "a/b" }, request.path_segments(req{ path = "/orgs/a%2Fb" }))
    end)

    it("leaves a bad escape as it is and keeps '+' (it is not a space in a path)", function()
      assert.same({ "a%zz", "b+c" }, request.path_segments(req{ path = "/a%zz/b+c" }))
    end)
  end)

  describe("path_param", function()
    it("captures named segments", function()
      assert.same({ id = "42" }, request.path_param(req{ path = "/orgs/42" }, "/orgs/:id"))
      assert.same({ org = "7", team = "x y" },
        request.path_param(req{ path = "/orgs/7/teams/x%20y" }, "/orgs/:org/teams/:team"))
    end)

    it("matches the start of the path: later segments are ignored", function()
      assert.same({ id = "42" }, request.path_param(req{ path = "/orgs/42/query" }, "/orgs/:id"))
    end)

    it("gives nil when a literal differs or the path is too short", function()
      assert.is_nil(request.path_param(req{ path = "/teams/42/query" }, "/orgs/:id"))
      assert.is_nil(request.path_param(req{ path = "/orgs" }, "/orgs/:id"))
      assert.is_nil(request.path_param(req{ path = "/orgs/" }, "/orgs/:id"))
      assert.is_nil(request.path_param(req{ path = "/Orgs/1" }, "/orgs/:id"))
    end)

    it("lets * stand for any one segment", function()
      assert.same({ id = "9" }, request.path_param(req{ path = "/v2/orgs/9" }, "/*/orgs/:id"))
    end)

    it("gives an empty table for a pattern without captures that matches", function()
      assert.same({}, request.path_param(req{ path = "/query" }, "/query"))
    end)

    it("refuses a pattern that does not start with /", function()
      assert.has_error(function() request.path_param(req{}, "orgs/:id") end,
        "request.path_param: pattern must start with '/', got 'orgs/:id'")
    end)
  end)

  describe("bearer", function()
    local function bearer(v)
      return request.bearer(req{ header = { authorization = v } })
    end

    it("gives the token of a Bearer authorization, scheme in any case", function()
      assert.equal("abc.def.ghi", bearer("Bearer abc.def.ghi"))
      assert.equal("abc.def.ghi", bearer("bearer abc.def.ghi"))
      assert.equal("abc.def.ghi", bearer("BEARER   abc.def.ghi  "))
    end)

    it("gives nil for other schemes, a missing token, or several values", function()
      assert.is_nil(bearer("Basic dXNlcjpwYXNz"))
      assert.is_nil(bearer("Bearer"))
      assert.is_nil(bearer("Bearer "))
      assert.is_nil(bearer("Bearer a b"))
      assert.is_nil(bearer("Bearer a, Bearer b"))
      assert.is_nil(bearer(nil))
      assert.is_nil(request.bearer({ path = "/" }))
    end)
  end)

  describe("in the script sandbox", function()
    it("is reachable as require 'shardgate.request' and as require('shardgate').request", function()
      local chunk = assert(loadstring([[
        local sg = require "shardgate"
        assert(sg.request == require "shardgate.request")
        return function(req)
          return sg.request.path_param(req, "/orgs/:id").id, sg.request.header(req, "X-A")
        end
      ]], "@test_script.lua"))
      setfenv(chunk, sandbox.new_env())
      local fn = chunk()
      local id, a = fn(req{ path = "/orgs/5/query", header = { ["x-a"] = "1" } })
      assert.equal("5", id)
      assert.equal("1", a)
    end)
  end)
end)

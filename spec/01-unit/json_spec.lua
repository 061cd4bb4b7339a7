-- Unit spec for shardgate.json: encoding rules (arrays vs objects, numbers,
-- escapes, sentinels), decoding of the full grammar, error messages with
-- positions, the nesting limit, and round trips.

local json = require "shardgate.json"

local function decode_error(s)
  local v, err = json.decode(s)
  assert.is_nil(v, "expected decode of " .. s .. " to fail")
  return err
end

describe("shardgate.json", function()

  describe("sentinels", function()
    it("json.null is unique, prints as json.null and is read-only", function()
      assert.equal("table", type(json.null))
      assert.are_not.equal(json.null, {})
      assert.equal("json.null", tostring(json.null))
      assert.has_error(function() json.null.x = 1 end)
      assert.has_error(function() setmetatable(json.null, {}) end)
    end)

    it("json.array_mt cannot be modified", function()
      assert.has_error(function() json.array_mt.__index = {} end)
      assert.is_nil(rawget(json.array_mt, "__index"))
    end)
  end)

  describe("encode", function()
    it("encodes scalars", function()
      assert.equal("true", json.encode(true))
      assert.equal("false", json.encode(false))
      assert.equal("null", json.encode(json.null))
      assert.equal('"hi"', json.encode("hi"))
      assert.equal("42", json.encode(42))
    end)

    it("writes integers without a decimal point", function()
      assert.equal("0", json.encode(0))
      assert.equal("-7", json.encode(-7))
      assert.equal("1000000", json.encode(1e6))
      assert.equal("9007199254740991", json.encode(2 ^ 53 - 1))
      assert.equal("-9007199254740991", json.encode(-(2 ^ 53 - 1)))
    end)

    it("writes fractions with the fewest digits that read back exactly", function()
      assert.equal("0.5", json.encode(0.5))
      assert.equal("0.1", json.encode(0.1))
      assert.equal("-2.25", json.encode(-2.25))
      assert.equal("1e+300", json.encode(1e300))
      local third = json.encode(1 / 3)
      assert.equal(1 / 3, tonumber(third))
      assert.equal("0.3333333333333333", third)
    end)

    it("writes 64-bit integer cdata as integers", function()
      assert.equal("14695981039346656037", json.encode(0xcbf29ce484222325ULL))
      assert.equal("-5", json.encode(-5LL))
    end)

    it("refuses NaN and infinities, naming where they are", function()
      assert.has_error(function() json.encode(0 / 0) end)
      assert.has_error(function() json.encode({ a = { math.huge } }) end,
        "json.encode: cannot encode inf at $.a[1]")
      assert.has_error(function() json.encode({ -math.huge }) end,
        "json.encode: cannot encode -inf at $[1]")
    end)

    it("escapes quotes, backslashes and every control character", function()
      assert.equal([["a\"b\\c"]], json.encode('a"b\\c'))
      assert.equal([["\b\f\n\r\t"]], json.encode("\b\f\n\r\t"))
      assert.equal([["\u0000\u0001\u001f"]], json.encode("\0\1\31"))
      for i = 0, 31 do
        local out = json.encode(string.char(i))
        assert.matches('^"\\[bfnrtu]', out)
        assert.equal(string.char(i), json.decode(out))
      end
      assert.equal('"/ \127"', json.encode("/ \127"))  -- not required to escape
    end)

    it("passes UTF-8 through unchanged", function()
      assert.equal('"h\195\169llo \240\159\152\128"', json.encode("h\195\169llo \240\159\152\128"))
    end)

    it("encodes 1..n tables as arrays and string-keyed tables as objects", function()
      assert.equal("[1,2,3]", json.encode({ 1, 2, 3 }))
      assert.equal('[["a"],{"b":true}]', json.encode({ { "a" }, { b = true } }))
      assert.equal('{"a":1,"b":[false]}', json.encode({ b = { false }, a = 1 }))
    end)

    it("sorts object keys so output is deterministic", function()
      assert.equal('{"a":1,"b":2,"c":3,"d":4}', json.encode({ d = 4, c = 3, b = 2, a = 1 }))
    end)

    it("encodes empty tables as {} unless marked with array_mt", function()
      assert.equal("{}", json.encode({}))
      assert.equal("[]", json.encode(setmetatable({}, json.array_mt)))
      assert.equal("[1]", json.encode(setmetatable({ 1 }, json.array_mt)))
    end)

    it("keeps json.null inside arrays and objects", function()
      assert.equal("[1,null,3]", json.encode({ 1, json.null, 3 }))
      assert.equal('{"a":null}', json.encode({ a = json.null }))
    end)

    it("refuses non-string object keys, naming the key", function()
      assert.has_error(function() json.encode({ [true] = 1 }) end,
        "json.encode: object key must be a string, got boolean true at $")
      assert.has_error(function() json.encode({ a = { 1, 2, x = 3 } }) end)
      local ok, err = pcall(json.encode, { [1] = "a", [3] = "c" })  -- sparse
      assert.is_false(ok)
      assert.matches("object key must be a string, got number [13] at %$", err)
    end)

    it("refuses an array_mt table with keys other than 1..n", function()
      assert.has_error(function() json.encode(setmetatable({ x = 1 }, json.array_mt)) end,
        "json.encode: table marked as array has keys other than 1..n at $")
    end)

    it("refuses values JSON cannot hold, naming the path", function()
      assert.has_error(function() json.encode({ a = { b = print } }) end,
        "json.encode: cannot encode a function at $.a.b")
      assert.has_error(function() json.encode({ ["a b"] = { coroutine.create(print) } }) end,
        'json.encode: cannot encode a thread at $["a b"][1]')
    end)

    it("detects cycles", function()
      local t = { name = "loop" }
      t.self = t
      assert.has_error(function() json.encode(t) end, "json.encode: cycle detected at $.self")
      local a = {}
      a[1] = { a }
      assert.has_error(function() json.encode(a) end, "json.encode: cycle detected at $[1][1]")
    end)

    it("allows the same table twice when it is not a cycle", function()
      local shared = { 1 }
      assert.equal('{"a":[1],"b":[1]}', json.encode({ a = shared, b = shared }))
    end)

    it("refuses nesting deeper than 200", function()
      local ok_t, deep_t = {}, nil
      local t = ok_t
      for _ = 2, 200 do t[1] = {}; t = t[1] end
      assert.equal(string.rep("[", 199) .. "{}" .. string.rep("]", 199), json.encode(ok_t))
      deep_t = { ok_t }
      assert.has_error(function() json.encode(deep_t) end)
    end)

    it("reports errors at the caller's line", function()
      local line = debug.getinfo(1, "l").currentline + 1
      local ok, err = pcall(function() local s = json.encode({ f = print }); return s end)
      assert.is_false(ok)
      assert.matches("json_spec.lua:" .. line .. ": json.encode: cannot encode", err, 1, true)
    end)
  end)

  describe("decode", function()
    it("decodes scalars", function()
      assert.equal(true, json.decode("true"))
      assert.equal(false, json.decode("false"))
      assert.equal(json.null, json.decode("null"))
      assert.equal("x", json.decode('"x"'))
      assert.equal(0, json.decode("0"))
      assert.equal(-12.5, json.decode("-12.5"))
      assert.equal(1.5e10, json.decode("1.5e10"))
      assert.equal(2e-3, json.decode("2E-3"))
      assert.equal(100, json.decode("1e+2"))
    end)

    it("decodes objects into plain tables and arrays with array_mt", function()
      local v = json.decode(' { "a" : [ 1 , 2 ] , "b" : { } , "c" : [ ] } ')
      assert.same({ 1, 2 }, v.a)
      assert.equal(json.array_mt, getmetatable(v.a))
      assert.equal(json.array_mt, getmetatable(v.c))
      assert.is_nil(next(v.c))
      assert.is_nil(getmetatable(v))
      assert.is_nil(getmetatable(v.b))
      assert.is_nil(next(v.b))
    end)

    it("keeps nulls as json.null so arrays have no holes", function()
      local v = json.decode("[1,null,3]")
      assert.equal(3, #v)
      assert.equal(json.null, v[2])
      assert.equal(json.null, json.decode('{"a":null}').a)
    end)

    it("lets the last of duplicate keys win", function()
      assert.equal(2, json.decode('{"a":1,"a":2}').a)
    end)

    it("decodes every simple escape", function()
      assert.equal('"\\/\b\f\n\r\t', json.decode([["\"\\\/\b\f\n\r\t"]]))
    end)

    it("decodes \\u escapes to UTF-8, including surrogate pairs", function()
      assert.equal("A", json.decode([["\u0041"]]))
      assert.equal("\0", json.decode([["\u0000"]]))
      assert.equal("\195\169", json.decode([["\u00e9"]]))            -- é, 2 bytes
      assert.equal("\226\130\172", json.decode([["\u20AC"]]))        -- €, 3 bytes
      assert.equal("\239\191\191", json.decode([["\uffff"]]))
      assert.equal("\240\159\152\128", json.decode([["\ud83d\ude00"]]))  -- 😀, 4 bytes
      assert.equal("\244\143\191\191", json.decode([["\uDBFF\uDFFF"]]))  -- U+10FFFF
      assert.equal("a\195\169b", json.decode([["a\u00e9b"]]))
    end)

    it("passes raw UTF-8 through", function()
      assert.equal("h\195\169llo", json.decode('"h\195\169llo"'))
    end)

    it("returns nil and a message with the position for bad input", function()
      local cases = {
        { "", "json: unexpected end of input at position 1" },
        { "   ", "json: unexpected end of input at position 4" },
        { "[1,2", "json: unexpected end of input (expected ',' or ']') at position 5" },
        { "[1 2]", "json: expected ',' or ']' at position 4" },
        { "[1,]", "json: unexpected character ']' at position 4" },
        { '{"a" 1}', "json: expected ':' at position 6" },
        { '{"a":1,}', "json: expected string key at position 8" },
        { "{a:1}", "json: expected string key at position 2" },
        { '{"a"', "json: unexpected end of input (expected ':') at position 5" },
        { '{"a":1 "b":2}', "json: expected ',' or '}' at position 8" },
        { "01", "json: leading zero in number at position 1" },
        { "-", "json: invalid number at position 1" },
        { "1.", "json: digit expected after '.' at position 3" },
        { "1e", "json: digit expected in exponent at position 3" },
        { ".5", "json: unexpected character '.' at position 1" },
        { "+1", "json: unexpected character '+' at position 1" },
        { "1e400", "json: number out of range at position 1" },
        { "nul", "json: invalid literal (expected 'null') at position 1" },
        { "tru", "json: invalid literal (expected 'true') at position 1" },
        { "True", "json: unexpected character 'T' at position 1" },
        { '"abc', "json: unterminated string at position 1" },
        { '"a\tb"', "json: control character in string at position 3" },
        { '"a\\x"', "json: invalid escape at position 3" },
        { '"\\u12"', "json: invalid \\u escape at position 2" },
        { '"\\ud800"', "json: high surrogate without low surrogate at position 2" },
        { '"\\ud800\\u0041"', "json: high surrogate without low surrogate at position 2" },
        { '"\\udc00"', "json: lone low surrogate at position 2" },
        { "\1", "json: unexpected byte 0x01 at position 1" },
      }
      for _, c in ipairs(cases) do
        assert.equal(c[2], decode_error(c[1]), "input: " .. c[1])
      end
    end)

    it("rejects trailing garbage", function()
      assert.equal("json: trailing garbage at position 5", decode_error("[1] x"))
      assert.equal("json: trailing garbage at position 3", decode_error("1 2"))
      assert.equal("json: trailing garbage at position 4", decode_error("{} {}"))
      assert.same({ 1 }, json.decode(" [1] \n\t\r "))
    end)

    it("never raises, even for non-string input", function()
      local v, err = json.decode(nil)
      assert.is_nil(v)
      assert.equal("json: expected a string to decode, got nil", err)
      v, err = json.decode({})
      assert.is_nil(v)
      assert.equal("json: expected a string to decode, got table", err)
    end)

    it("accepts nesting up to 200 levels and refuses deeper", function()
      local ok = json.decode(string.rep("[", 200) .. string.rep("]", 200))
      assert.equal(json.array_mt, getmetatable(ok))
      assert.equal("json: nesting deeper than 200 at position 201",
        decode_error(string.rep("[", 201) .. string.rep("]", 201)))
      assert.equal("json: nesting deeper than 200 at position 1001",
        decode_error(string.rep('{"a":', 200) .. "[1]" .. string.rep("}", 200)))
    end)
  end)

  describe("round trips", function()
    local values = {
      { 1, "two", 3.5, true, false, json.null },
      { name = "Apollo", id = 7, tags = { "a", "b" }, meta = { nested = { deep = { 1 } } } },
      { s = "quotes \" backslash \\ nl \n tab \t ctrl \1 \31 del \127 utf8 \226\130\172" },
      { empty_obj = {}, empty_arr = setmetatable({}, json.array_mt) },
      { n = { 0, -1, 2 ^ 53 - 1, 0.1, 1e-10, 123.456, -1e300 } },
    }

    it("decode(encode(v)) equals v", function()
      for _, v in ipairs(values) do
        assert.same(v, json.decode(json.encode(v)))
      end
    end)

    it("encode(decode(s)) equals s for canonical text", function()
      local texts = {
        '{"a":[],"b":{},"c":[null,true,false],"d":"\\u0001\\n","e":-0.5}',
        '[[[[1]]],{"x":{"y":"z"}}]',
      }
      for _, s in ipairs(texts) do
        assert.equal(s, json.encode(json.decode(s)))
      end
    end)
  end)
end)

-- shardgate.json: a small, strict JSON encoder and decoder for routing
-- scripts and the gateway's own Lua code (admin answers, test kit).
--
-- It does not stream and does not touch the request/response path: the C
-- core parses request bodies with its C JSON library and writes query rows
-- straight into the output buffer. No neighbours; pure Lua.
--
-- Lua has no null and no array type, so two sentinels stand in for them:
-- `json.null` (decoded from null, encoded as null) and `json.array_mt` (the
-- metatable of every decoded array; set it on a table to encode it as an
-- array, even when empty). encode() raises on values JSON cannot hold;
-- decode() never raises on bad input and returns nil, "json: ... at
-- position N" instead (positions are 1-based byte offsets).

local byte, char, find, format, sub, gsub =
  string.byte, string.char, string.find, string.format, string.sub, string.gsub
local concat, sort = table.concat, table.sort
local floor, huge = math.floor, math.huge
local getmetatable, setmetatable, pairs, ipairs, type, tostring, tonumber, error, pcall =
  getmetatable, setmetatable, pairs, ipairs, type, tostring, tonumber, error, pcall

local json = {}

local MAX_DEPTH = 200

-- A sealed table: its metatable cannot be read back or replaced, and it
-- refuses new fields, so a script cannot repurpose a sentinel shared by the
-- whole Lua state.
local function sealed(name, fields)
  local t = fields or {}
  return setmetatable(t, {
    __metatable = false,
    __tostring = function() return name end,
    __newindex = function(_, k)
      error(format("%s is read-only (cannot set '%s')", name, tostring(k)), 2)
    end,
  })
end

json.null = sealed("json.null")
json.array_mt = sealed("json.array_mt", { __name = "json.array" })

---------------------------------------------------------------------------
-- Encoder
---------------------------------------------------------------------------

local ESCAPES = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}
for i = 0, 31 do
  local c = char(i)
  if not ESCAPES[c] then ESCAPES[c] = format("\\u%04x", i) end
end

local function encode_string(s)
  return '"' .. gsub(s, '[%z\1-\31"\\]', ESCAPES) .. '"'
end

-- Integers print without a decimal point; other numbers with the fewest
-- significant digits that read back as the same double.
local function encode_number(n, path)
  if n ~= n or n == huge or n == -huge then
    error(format("json.encode: cannot encode %s at %s", tostring(n), path), 0)
  end
  if n % 1 == 0 and n > -2 ^ 53 and n < 2 ^ 53 then
    return format("%d", n)
  end
  for digits = 15, 16 do
    local s = format("%." .. digits .. "g", n)
    if tonumber(s) == n then return s end
  end
  return format("%.17g", n)
end

-- 64-bit integer cdata (e.g. from hash.fnv1a64) print as plain integers.
local function encode_cdata(v, path)
  local s = tostring(v)
  local digits = s:match("^(%-?%d+)U?LL$")
  if not digits then
    error(format("json.encode: cannot encode cdata %s at %s", s, path), 0)
  end
  return digits
end

local function key_path(path, k)
  if type(k) == "string" and find(k, "^[%a_][%w_]*$") then return path .. "." .. k end
  return format("%s[%s]", path, type(k) == "string" and format("%q", k) or tostring(k))
end

-- Number of elements if t's keys are exactly 1..n (n >= 0), else nil.
local function sequence_length(t)
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return nil end
    n = n + 1
  end
  for i = 1, n do
    if t[i] == nil then return nil end
  end
  return n
end

local encode_value

local function encode_array(t, n, path, stack, depth, out)
  out[#out + 1] = "["
  for i = 1, n do
    if i > 1 then out[#out + 1] = "," end
    encode_value(t[i], path .. "[" .. i .. "]", stack, depth, out)
  end
  out[#out + 1] = "]"
end

local function encode_object(t, path, stack, depth, out)
  local keys = {}
  for k in pairs(t) do
    if type(k) ~= "string" then
      error(format("json.encode: object key must be a string, got %s %s at %s",
        type(k), tostring(k), path), 0)
    end
    keys[#keys + 1] = k
  end
  sort(keys)  -- deterministic output: same table, same text
  out[#out + 1] = "{"
  for i, k in ipairs(keys) do
    if i > 1 then out[#out + 1] = "," end
    out[#out + 1] = encode_string(k)
    out[#out + 1] = ":"
    encode_value(t[k], key_path(path, k), stack, depth, out)
  end
  out[#out + 1] = "}"
end

local function encode_table(t, path, stack, depth, out)
  if stack[t] then
    error("json.encode: cycle detected at " .. path, 0)
  end
  if depth > MAX_DEPTH then
    error(format("json.encode: nesting deeper than %d at %s", MAX_DEPTH, path), 0)
  end
  stack[t] = true
  local n = sequence_length(t)
  if getmetatable(t) == json.array_mt then
    if not n then
      error("json.encode: table marked as array has keys other than 1..n at " .. path, 0)
    end
    encode_array(t, n, path, stack, depth, out)
  elseif n and n > 0 then
    encode_array(t, n, path, stack, depth, out)
  else
    encode_object(t, path, stack, depth, out)
  end
  stack[t] = nil
end

function encode_value(v, path, stack, depth, out)
  local t = type(v)
  if v == json.null then
    out[#out + 1] = "null"
  elseif t == "string" then
    out[#out + 1] = encode_string(v)
  elseif t == "number" then
    out[#out + 1] = encode_number(v, path)
  elseif t == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif t == "table" then
    encode_table(v, path, stack, depth + 1, out)
  elseif t == "cdata" then
    out[#out + 1] = encode_cdata(v, path)
  else
    error(format("json.encode: cannot encode a %s at %s", t, path), 0)
  end
end

-- JSON text for value. Raises "json.encode: <what> at <path>" where path is
-- like $.shards[2].name, for NaN/inf, cycles, non-string object keys,
-- functions and other values JSON cannot hold.
function json.encode(value)
  local out = {}
  local ok, err = pcall(encode_value, value, "$", {}, 0, out)
  if not ok then error(err, 2) end
  return concat(out)
end

---------------------------------------------------------------------------
-- Decoder
---------------------------------------------------------------------------

-- Decode errors travel as this table so decode() can tell them from bugs.
local DecodeError = {}

local function fail(what, pos)
  error(setmetatable({ msg = format("json: %s at position %d", what, pos) }, DecodeError), 0)
end

local function skip_ws(s, pos)
  local _, e = find(s, "^[ \t\r\n]*", pos)
  return e + 1
end

local decode_value

-- What an unexpected byte was, readable even when it is not printable.
local function describe_byte(c)
  if not c then return "unexpected end of input" end
  if c < 32 or c > 126 then return format("unexpected byte 0x%02x", c) end
  return "unexpected character '" .. char(c) .. "'"
end

-- Fail after a value inside a container: end of input or a wrong byte.
local function fail_separator(c, expected, pos)
  if not c then fail("unexpected end of input (expected " .. expected .. ")", pos) end
  fail("expected " .. expected, pos)
end

local function decode_literal(s, pos, word, value)
  if sub(s, pos, pos + #word - 1) ~= word then
    fail("invalid literal (expected '" .. word .. "')", pos)
  end
  return value, pos + #word
end

-- Strict JSON number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
local function decode_number(s, pos)
  local i = pos
  if byte(s, i) == 45 then i = i + 1 end  -- '-'
  local c = byte(s, i)
  if c == 48 then                         -- '0'
    i = i + 1
    local d = byte(s, i)
    if d and d >= 48 and d <= 57 then fail("leading zero in number", pos) end
  elseif c and c >= 49 and c <= 57 then
    local _, e = find(s, "^%d*", i + 1)
    i = e + 1
  else
    fail("invalid number", pos)
  end
  if byte(s, i) == 46 then                -- '.'
    local _, e = find(s, "^%d+", i + 1)
    if not e then fail("digit expected after '.'", i + 1) end
    i = e + 1
  end
  c = byte(s, i)
  if c == 101 or c == 69 then             -- 'e' / 'E'
    i = i + 1
    c = byte(s, i)
    if c == 43 or c == 45 then i = i + 1 end
    local _, e = find(s, "^%d+", i)
    if not e then fail("digit expected in exponent", i) end
    i = e + 1
  end
  local n = tonumber(sub(s, pos, i - 1))
  if n == huge or n == -huge then fail("number out of range", pos) end
  return n, i
end

-- UTF-8 bytes for code point cp (0..0x10FFFF).
local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then
    return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40)
  end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
    0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

-- The 4 hex digits after "\u" at pos (pos points at the 'u').
local function hex4(s, pos)
  local h = sub(s, pos + 1, pos + 4)
  if not find(h, "^%x%x%x%x$") then fail("invalid \\u escape", pos - 1) end
  return tonumber(h, 16)
end

-- A \uXXXX escape (or a surrogate pair of them) at pos (the 'u').
-- Returns the UTF-8 text and the position after the escape.
local function decode_unicode(s, pos)
  local cp = hex4(s, pos)
  if cp >= 0xDC00 and cp <= 0xDFFF then
    fail("lone low surrogate", pos - 1)
  end
  if cp >= 0xD800 and cp <= 0xDBFF then
    if sub(s, pos + 5, pos + 6) ~= "\\u" then fail("high surrogate without low surrogate", pos - 1) end
    local lo = hex4(s, pos + 6)
    if lo < 0xDC00 or lo > 0xDFFF then fail("high surrogate without low surrogate", pos - 1) end
    return utf8_char(0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)), pos + 11
  end
  return utf8_char(cp), pos + 5
end

local SIMPLE_ESCAPES = {
  [34] = '"', [92] = "\\", [47] = "/", [98] = "\b",
  [102] = "\f", [110] = "\n", [114] = "\r", [116] = "\t",
}

-- A string whose opening quote is at pos. Plain runs are copied with one
-- sub(); escapes are decoded one by one.
local function decode_string(s, pos)
  local parts, n = nil, 0
  local i = pos + 1
  while true do
    local j = find(s, '[%z\1-\31"\\]', i)
    if not j then fail("unterminated string", pos) end
    local c = byte(s, j)
    if c == 34 then                       -- closing quote
      if not parts then return sub(s, i, j - 1), j + 1 end
      parts[n + 1] = sub(s, i, j - 1)
      return concat(parts), j + 1
    end
    if c ~= 92 then fail("control character in string", j) end
    parts = parts or {}
    n = n + 1; parts[n] = sub(s, i, j - 1)
    local e = byte(s, j + 1)
    local simple = SIMPLE_ESCAPES[e]
    n = n + 1
    if simple then
      parts[n] = simple
      i = j + 2
    elseif e == 117 then                  -- 'u'
      parts[n], i = decode_unicode(s, j + 1)
    else
      fail("invalid escape", j)
    end
  end
end

local function decode_array(s, pos, depth)
  local arr, n = setmetatable({}, json.array_mt), 0
  pos = skip_ws(s, pos + 1)
  if byte(s, pos) == 93 then return arr, pos + 1 end   -- ']'
  while true do
    n = n + 1
    arr[n], pos = decode_value(s, pos, depth)
    pos = skip_ws(s, pos)
    local c = byte(s, pos)
    if c == 93 then return arr, pos + 1 end
    if c ~= 44 then fail_separator(c, "',' or ']'", pos) end
    pos = skip_ws(s, pos + 1)
  end
end

local function decode_object(s, pos, depth)
  local obj = {}
  pos = skip_ws(s, pos + 1)
  if byte(s, pos) == 125 then return obj, pos + 1 end  -- '}'
  while true do
    if byte(s, pos) ~= 34 then fail_separator(byte(s, pos), "string key", pos) end
    local key
    key, pos = decode_string(s, pos)
    pos = skip_ws(s, pos)
    if byte(s, pos) ~= 58 then fail_separator(byte(s, pos), "':'", pos) end
    obj[key], pos = decode_value(s, skip_ws(s, pos + 1), depth)
    pos = skip_ws(s, pos)
    local c = byte(s, pos)
    if c == 125 then return obj, pos + 1 end
    if c ~= 44 then fail_separator(c, "',' or '}'", pos) end
    pos = skip_ws(s, pos + 1)
  end
end

-- The value starting at pos (no leading whitespace); returns it and the
-- position after it.
function decode_value(s, pos, depth)
  local c = byte(s, pos)
  if c == 123 or c == 91 then             -- '{' '['
    if depth >= MAX_DEPTH then fail(format("nesting deeper than %d", MAX_DEPTH), pos) end
    if c == 123 then return decode_object(s, pos, depth + 1) end
    return decode_array(s, pos, depth + 1)
  end
  if c == 34 then return decode_string(s, pos) end
  if c == 116 then return decode_literal(s, pos, "true", true) end
  if c == 102 then return decode_literal(s, pos, "false", false) end
  if c == 110 then return decode_literal(s, pos, "null", json.null) end
  if c == 45 or (c and c >= 48 and c <= 57) then return decode_number(s, pos) end
  fail(describe_byte(c), pos)
end

local function decode_document(s)
  local value, pos = decode_value(s, skip_ws(s, 1), 0)
  pos = skip_ws(s, pos)
  if pos <= #s then fail("trailing garbage", pos) end
  return value
end

-- The value for JSON text s, or nil, "json: <what> at position N".
-- Never raises on bad input.
function json.decode(s)
  if type(s) ~= "string" then
    return nil, "json: expected a string to decode, got " .. type(s)
  end
  local ok, res = pcall(decode_document, s)
  if ok then return res end
  if getmetatable(res) == DecodeError then return nil, res.msg end
  return nil, "json: internal error: " .. tostring(res)
end

return json

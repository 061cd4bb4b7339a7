-- shardgate.hash: the hash functions routing scripts use to map a tenant to
-- a shard (FNV-1a 64, CRC-32, jump consistent hash, modulo).
--
-- It does not know about shards or configuration; a script passes a key and a
-- bucket count and gets a bucket index back. Pure Lua on LuaJIT's 64-bit
-- integer cdata (0ULL literals and the `bit` library), so it runs the same in
-- the gateway's Lua state and under plain luajit/busted; it does not require
-- "ffi". Used by routing scripts (through the sandbox's require) and by the
-- test kit. The values it returns are part of the routing contract and must
-- never change: spec/01-unit/hash_spec.lua pins them.

local bit = require "bit"

local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
local byte, format = string.byte, string.format
local floor, tonumber, type = math.floor, tonumber, type

local hash = {}

local FNV_OFFSET = 0xcbf29ce484222325ULL
local FNV_PRIME = 0x100000001b3ULL
local JUMP_MUL = 2862933555777941757ULL  -- the paper's 64-bit LCG multiplier
local TWO_31 = 2147483648.0
local MAX_BUCKETS = 2147483647           -- the paper's int32_t num_buckets
local MAX_INT_KEY = 2 ^ 53               -- larger doubles are not exact integers

-- CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) lookup table, built
-- once. Index 0 lives in LuaJIT's array part, so [0..255] is a plain array.
local CRC_TABLE = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do
    if band(c, 1) == 1 then
      c = bxor(rshift(c, 1), 0xEDB88320)
    else
      c = rshift(c, 1)
    end
  end
  CRC_TABLE[i] = c
end

-- Describe a bad argument for an error message: the value, and its type
-- when the value alone would be ambiguous ("3" vs 3).
local function describe(v)
  if type(v) == "number" then return tostring(v) end
  if type(v) == "string" then return format("string %q", v) end
  return type(v)
end

-- The string a key is hashed as. Strings hash as themselves. A number key
-- must be a non-negative integer and hashes as its decimal string, so that
-- tenant 42 and tenant "42" (e.g. from a header) land on the same shard.
-- We format with "%d", not tostring(): LuaJIT's tostring() switches to
-- exponent form ("1.2345678901235e+14") from 15 digits on.
local function key_string(key, fname)
  local t = type(key)
  if t == "string" then return key end
  if t == "number" and key >= 0 and key < MAX_INT_KEY and key % 1 == 0 then
    return format("%d", key)
  end
  error(format("%s: key must be a string or a non-negative integer below 2^53, got %s",
    fname, describe(key)), 3)
end

-- Bucket counts are positive integers that fit the paper's int32_t.
local function check_buckets(buckets, fname)
  if type(buckets) ~= "number" or buckets < 1 or buckets % 1 ~= 0 then
    error(format("%s: buckets must be a positive integer, got %s",
      fname, describe(buckets)), 3)
  end
  if buckets > MAX_BUCKETS then
    error(format("%s: buckets must be at most %d, got %s",
      fname, MAX_BUCKETS, describe(buckets)), 3)
  end
end

-- FNV-1a 64-bit of s. The multiply wraps modulo 2^64 as C does; under the
-- JIT the loop compiles to xor + imul per byte, with no allocation.
local function fnv1a64(s)
  local h = FNV_OFFSET
  for i = 1, #s do
    h = bxor(h, byte(s, i)) * FNV_PRIME
  end
  return h
end

-- CRC-32 of s as a number 0..2^32-1. The bit ops work on signed 32-bit
-- values, so the result is moved into the unsigned range at the end.
local function crc32(s)
  local c = -1  -- 0xFFFFFFFF
  for i = 1, #s do
    c = bxor(rshift(c, 8), CRC_TABLE[band(bxor(c, byte(s, i)), 255)])
  end
  c = bxor(c, -1)
  if c < 0 then c = c + 4294967296 end
  return c
end

-- FNV-1a 64-bit of string s, as a uint64_t cdata.
function hash.fnv1a64(s)
  if type(s) ~= "string" then
    error("hash.fnv1a64: expected a string, got " .. describe(s), 2)
  end
  return fnv1a64(s)
end

-- Standard CRC-32 (as zlib's crc32()) of string s, as a number 0..2^32-1.
function hash.crc32(s)
  if type(s) ~= "string" then
    error("hash.crc32: expected a string, got " .. describe(s), 2)
  end
  return crc32(s)
end

-- Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm"
-- (2014), on a uint64_t key. Same double arithmetic as the paper's C code,
-- so the result is bit-for-bit the reference one.
local function jump_u64(key, buckets)
  local b, j = -1, 0
  while j < buckets do
    b = j
    key = key * JUMP_MUL + 1
    j = floor((b + 1) * (TWO_31 / (tonumber(rshift(key, 33)) + 1)))
  end
  return b
end

-- Bucket 0..buckets-1 for key (a string, or a non-negative integer hashed as
-- its decimal string). Adding a bucket moves only ~1/(buckets+1) of keys.
-- Inside the gateway the C core computes the same function (FNV-1a 64 of
-- the key text, then the paper's jump loop) about ten times faster than the
-- interpreted loop above, which hooks force; the specs compare the two.
local core_jump
do
  local ok, core = pcall(require, "shardgate.core")
  if ok and type(core) == "table" then core_jump = core.jump end
end

function hash.jump(key, buckets)
  local s = key_string(key, "hash.jump")
  check_buckets(buckets, "hash.jump")
  if core_jump then return core_jump(s, buckets) end
  return jump_u64(fnv1a64(s), buckets)
end

-- The pure Lua version, also in the gateway (for the specs that compare).
function hash.jump_lua(key, buckets)
  local s = key_string(key, "hash.jump")
  check_buckets(buckets, "hash.jump")
  return jump_u64(fnv1a64(s), buckets)
end

-- Bucket 0..buckets-1 as crc32(key) % buckets: simple and widely reproduced,
-- but moves most keys when the bucket count changes. Keys as for jump().
function hash.mod(key, buckets)
  local s = key_string(key, "hash.mod")
  check_buckets(buckets, "hash.mod")
  return crc32(s) % buckets
end

return hash

-- shardgate.crypto: SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104), base64url
-- without padding (RFC 4648 §5) and a constant-time string comparison: the
-- pieces shardgate.jwt needs to check an HS256 signature.
--
-- It does not parse tokens (shardgate.jwt does) and offers no encryption,
-- no other digests and no key management. Pure Lua on LuaJIT's `bit`
-- library (32-bit signed results; sums are folded back with bit.tobit), no
-- ffi and no C, so it runs the same in the gateway's Lua state and under
-- busted. Inputs are Lua strings of bytes; digests are 32-byte strings.
-- Not in the script sandbox's allow-list: scripts reach it through jwt.

local bit = require "bit"

local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local byte, char, rep, format = string.byte, string.char, string.rep, string.format
local concat = table.concat
local floor, type, error = math.floor, type, error

local crypto = {}

---------------------------------------------------------------------------
-- SHA-256
---------------------------------------------------------------------------

-- FIPS 180-4 §4.2.2: the first 32 bits of the fractional parts of the cube
-- roots of the first 64 primes.
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end

-- §5.3.3: the initial hash value.
local H0 = {
  0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
}
for i = 1, 8 do H0[i] = tobit(H0[i]) end

-- §5.1.1: the message, a 1 bit, zeros, and its length in bits as a 64-bit
-- big-endian number, so that the total is a multiple of 64 bytes.
local function pad(msg)
  local len = #msg
  local zeros = (55 - len) % 64
  local bits = len * 8
  local hi = floor(bits / 4294967296)
  local lo = bits % 4294967296
  return msg .. "\128" .. rep("\0", zeros)
    .. char(band(rshift(hi, 24), 255), band(rshift(hi, 16), 255), band(rshift(hi, 8), 255), band(hi, 255))
    .. char(band(rshift(lo, 24), 255), band(rshift(lo, 16), 255), band(rshift(lo, 8), 255), band(lo, 255))
end

-- §6.2.2: one 64-byte block of s starting at byte `at`, folded into H.
local function compress(H, s, at, W)
  for t = 1, 16 do
    local i = at + (t - 1) * 4
    local b1, b2, b3, b4 = byte(s, i, i + 3)
    W[t] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
  end
  for t = 17, 64 do
    local w15, w2 = W[t - 15], W[t - 2]
    local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
    local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
    W[t] = tobit(W[t - 16] + s0 + W[t - 7] + s1)
  end
  local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
  for t = 1, 64 do
    local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
    local ch = bxor(band(e, f), band(bnot(e), g))
    local t1 = h + S1 + ch + K[t] + W[t]
    local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
    local maj = bxor(band(a, b), band(a, c), band(b, c))
    h, g, f, e = g, f, e, tobit(d + t1)
    d, c, b, a = c, b, a, tobit(t1 + S0 + maj)
  end
  H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
  H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
end

local function word_bytes(w)
  return char(band(rshift(w, 24), 255), band(rshift(w, 16), 255), band(rshift(w, 8), 255), band(w, 255))
end

local function check_string(v, fname, what)
  if type(v) ~= "string" then
    error(format("crypto.%s: %s must be a string, got %s", fname, what, type(v)), 3)
  end
end

-- The SHA-256 digest of msg, as 32 raw bytes.
function crypto.sha256(msg)
  check_string(msg, "sha256", "message")
  local s = pad(msg)
  local H = { H0[1], H0[2], H0[3], H0[4], H0[5], H0[6], H0[7], H0[8] }
  local W = {}
  for at = 1, #s, 64 do compress(H, s, at, W) end
  local out = {}
  for i = 1, 8 do out[i] = word_bytes(H[i]) end
  return concat(out)
end

---------------------------------------------------------------------------
-- HMAC-SHA256
---------------------------------------------------------------------------

local BLOCK = 64

-- key XOR-ed byte by byte with the pad byte p (key is exactly BLOCK bytes).
local function xor_pad(key, p)
  local out = {}
  for i = 1, BLOCK do out[i] = char(bxor(byte(key, i), p)) end
  return concat(out)
end

-- RFC 2104: H((K' xor opad) || H((K' xor ipad) || msg)), where K' is the key
-- (hashed first when longer than a block) padded with zeros to a block.
function crypto.hmac_sha256(key, msg)
  check_string(key, "hmac_sha256", "key")
  check_string(msg, "hmac_sha256", "message")
  if #key > BLOCK then key = crypto.sha256(key) end
  key = key .. rep("\0", BLOCK - #key)
  local inner = crypto.sha256(xor_pad(key, 0x36) .. msg)
  return crypto.sha256(xor_pad(key, 0x5c) .. inner)
end

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

-- Lower-case hex of a byte string.
function crypto.hex(s)
  check_string(s, "hex", "argument")
  return (s:gsub(".", function(c) return tohex(byte(c), 2) end))
end

-- True when a and b are equal strings. For equal lengths the time taken
-- does not depend on where they differ, so a signature check leaks nothing
-- about how much of a forged signature was right. (Lengths are public.)
function crypto.equal(a, b)
  if type(a) ~= "string" or type(b) ~= "string" or #a ~= #b then return false end
  local diff = 0
  for i = 1, #a do diff = bor(diff, bxor(byte(a, i), byte(b, i))) end
  return diff == 0
end

---------------------------------------------------------------------------
-- base64url (RFC 4648 §5), without padding, as JWS uses it (RFC 7515 §2)
---------------------------------------------------------------------------

local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local ENC, DEC = {}, {}
for i = 1, 64 do
  local c = byte(ALPHABET, i)
  ENC[i - 1] = char(c)
  DEC[c] = i - 1
end

-- base64url text of bytes s, without "=" padding.
function crypto.base64url_encode(s)
  check_string(s, "base64url_encode", "argument")
  local out, n = {}, 0
  for i = 1, #s, 3 do
    local b1, b2, b3 = byte(s, i, i + 2)
    local v = lshift(b1, 16) + lshift(b2 or 0, 8) + (b3 or 0)
    n = n + 1
    out[n] = ENC[rshift(v, 18)] .. ENC[band(rshift(v, 12), 63)]
      .. (b2 and ENC[band(rshift(v, 6), 63)] or "") .. (b3 and ENC[band(v, 63)] or "")
  end
  return concat(out)
end

-- The bytes of base64url text s (no padding, no whitespace), or nil when s
-- is not canonical base64url: a character outside the alphabet, "=", a
-- length that leaves one character over (length % 4 == 1), or non-zero
-- bits in the last character's unused part. Never raises.
function crypto.base64url_decode(s)
  if type(s) ~= "string" or #s % 4 == 1 then return nil end
  local out, n = {}, 0
  for i = 1, #s, 4 do
    local c1, c2, c3, c4 = byte(s, i, i + 3)
    local d1, d2 = DEC[c1], DEC[c2]
    local d3, d4 = c3 and DEC[c3], c4 and DEC[c4]
    if not d1 or not d2 or (c3 and not d3) or (c4 and not d4) then return nil end
    local v = lshift(d1, 18) + lshift(d2, 12) + lshift(d3 or 0, 6) + (d4 or 0)
    n = n + 1
    if not c3 then
      if band(d2, 15) ~= 0 then return nil end
      out[n] = char(rshift(v, 16))
    elseif not c4 then
      if band(d3, 3) ~= 0 then return nil end
      out[n] = char(rshift(v, 16), band(rshift(v, 8), 255))
    else
      out[n] = char(rshift(v, 16), band(rshift(v, 8), 255), band(v, 255))
    end
  end
  return concat(out)
end

return crypto

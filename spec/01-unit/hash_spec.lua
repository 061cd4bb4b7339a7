-- Unit spec for shardgate.hash: pins the values routing depends on (they must
-- never change), checks the jump hash's balance and minimal movement, and
-- the argument errors. The pinned jump values were cross-checked against an
-- independent C program: FNV-1a 64 plus the jump function copied from
-- Lamping & Veach (2014), Figure 1; CRC-32 against zlib's crc32().

local hash = require "shardgate.hash"

describe("shardgate.hash", function()

  describe("fnv1a64", function()
    it("returns a uint64_t cdata", function()
      assert.equal("cdata", type(hash.fnv1a64("a")))
      assert.equal("12638187200555641996ULL", tostring(hash.fnv1a64("a")))
    end)

    it("matches the published FNV-1a 64 test vectors", function()
      assert.equal(0xcbf29ce484222325ULL, hash.fnv1a64(""))
      assert.equal(0xaf63dc4c8601ec8cULL, hash.fnv1a64("a"))
      assert.equal(0x85944171f73967e8ULL, hash.fnv1a64("foobar"))
    end)

    it("pins gateway-specific keys", function()
      assert.equal(14046639452460936920ULL, hash.fnv1a64("tenant-0"))
      assert.equal(14046640551972565131ULL, hash.fnv1a64("tenant-1"))
    end)

    it("hashes every byte, including NUL and high bytes", function()
      assert.are_not.equal(hash.fnv1a64("a"), hash.fnv1a64("a\0"))
      assert.are_not.equal(hash.fnv1a64("\255"), hash.fnv1a64("\254"))
    end)

    it("rejects non-strings", function()
      assert.has_error(function() hash.fnv1a64(42) end,
        "hash.fnv1a64: expected a string, got 42")
    end)
  end)

  describe("crc32", function()
    it("matches zlib's crc32", function()
      assert.equal(0xCBF43926, hash.crc32("123456789"))
      assert.equal(0, hash.crc32(""))
      assert.equal(0x414FA339, hash.crc32("The quick brown fox jumps over the lazy dog"))
      assert.equal(2364029289, hash.crc32("tenant-0"))
      assert.equal(4226746879, hash.crc32("tenant-1"))
    end)

    it("returns a non-negative Lua number below 2^32", function()
      for _, s in ipairs({ "a", "b", "tenant-1", "\255\255\255\255" }) do
        local c = hash.crc32(s)
        assert.equal("number", type(c))
        assert.is_true(c >= 0 and c < 2 ^ 32 and c % 1 == 0)
      end
    end)

    it("rejects non-strings", function()
      assert.has_error(function() hash.crc32(nil) end,
        "hash.crc32: expected a string, got nil")
    end)
  end)

  describe("jump", function()
    -- Cross-checked with the C reference (see the top of this file).
    local BUCKETS = { 1, 2, 3, 5, 10, 16, 100, 1000, 65536, 2147483647 }
    local PINNED = {
      [""]          = { 0, 1, 1, 1, 1, 13, 90, 266, 14284, 1857788335 },
      ["a"]         = { 0, 1, 2, 2, 2, 12, 31, 163, 29077, 298569431 },
      ["tenant-1"]  = { 0, 1, 1, 1, 1, 15, 51, 580, 8286, 513817747 },
      ["42"]        = { 0, 1, 1, 4, 4, 15, 42, 42, 23498, 44407460 },
      ["acme"]      = { 0, 0, 0, 3, 7, 15, 42, 621, 35179, 188213145 },
      ["org_12345"] = { 0, 1, 1, 4, 5, 5, 27, 256, 58616, 1588677731 },
      ["shardgate"] = { 0, 1, 2, 2, 7, 7, 7, 261, 49371, 1301319837 },
    }
    -- More cross-checked rows ("tenant-<i>", buckets, expected).
    local SAMPLES = {
      { "tenant-1", 762, 580 },
      { "tenant-2", 4227, 1316 },
    }

    it("returns the pinned buckets for known keys", function()
      for key, row in pairs(PINNED) do
        for i, n in ipairs(BUCKETS) do
          assert.equal(row[i], hash.jump(key, n),
            string.format("jump(%q, %d)", key, n))
        end
      end
      for _, s in ipairs(SAMPLES) do
        assert.equal(s[3], hash.jump(s[1], s[2]))
      end
    end)

    it("gives a number key the bucket of its decimal string", function()
      for i, n in ipairs(BUCKETS) do
        assert.equal(PINNED["42"][i], hash.jump(42, n))
      end
      for k = 0, 2000 do
        assert.equal(hash.jump(tostring(k), 37), hash.jump(k, 37))
      end
      -- 15+ digit numbers hash as their digits, not as tostring's "1.2e+14"
      assert.equal(hash.jump("123456789012345", 1000), hash.jump(123456789012345, 1000))
      assert.equal(hash.jump("9007199254740991", 1000), hash.jump(2 ^ 53 - 1, 1000))
    end)

    it("always returns an integer in 0..buckets-1", function()
      for k = 1, 2000 do
        local n = k % 50 + 1
        local b = hash.jump("k" .. k, n)
        assert.is_true(b >= 0 and b < n and b % 1 == 0)
      end
    end)

    it("spreads 10000 keys evenly over 3 buckets", function()
      local counts = { [0] = 0, 0, 0 }
      for k = 1, 10000 do
        local b = hash.jump("tenant-" .. k, 3)
        counts[b] = counts[b] + 1
      end
      for b = 0, 2 do
        -- expected 3333; 5% either side is more than 3 standard deviations
        assert.is_true(counts[b] > 3166 and counts[b] < 3500,
          "bucket " .. b .. " got " .. counts[b])
      end
    end)

    it("moves only ~1/(n+1) of the keys, all to the new bucket, when growing", function()
      for _, n in ipairs({ 1, 2, 3, 7, 15 }) do
        local moved = 0
        for k = 1, 10000 do
          local key = "tenant-" .. k
          local before, after = hash.jump(key, n), hash.jump(key, n + 1)
          if before ~= after then
            moved = moved + 1
            assert.equal(n, after)  -- a moved key goes to the new bucket only
          end
        end
        local expected = 10000 / (n + 1)
        assert.is_true(math.abs(moved - expected) < expected * 0.1,
          string.format("%d -> %d buckets moved %d keys, expected ~%d", n, n + 1, moved, expected))
      end
    end)

    it("rejects bad bucket counts", function()
      for _, bad in ipairs({ 0, -1, 2.5, 0 / 0 }) do
        assert.has_error(function() hash.jump("a", bad) end,
          "hash.jump: buckets must be a positive integer, got " .. tostring(bad))
      end
      assert.has_error(function() hash.jump("a", "3") end,
        'hash.jump: buckets must be a positive integer, got string "3"')
      assert.has_error(function() hash.jump("a") end,
        "hash.jump: buckets must be a positive integer, got nil")
      assert.has_error(function() hash.jump("a", 2 ^ 31) end,
        "hash.jump: buckets must be at most 2147483647, got 2147483648")
    end)

    it("rejects keys that are not strings or non-negative integers", function()
      local msg = "hash.jump: key must be a string or a non-negative integer below 2^53, got "
      assert.has_error(function() hash.jump(-1, 3) end, msg .. "-1")
      assert.has_error(function() hash.jump(1.5, 3) end, msg .. "1.5")
      assert.has_error(function() hash.jump(2 ^ 53, 3) end, msg .. tostring(2 ^ 53))
      assert.has_error(function() hash.jump(nil, 3) end, msg .. "nil")
      assert.has_error(function() hash.jump({}, 3) end, msg .. "table")
    end)

    it("reports argument errors at the caller's line", function()
      local line = debug.getinfo(1, "l").currentline + 1
      local ok, err = pcall(function() local b = hash.jump("a", 0); return b end)
      assert.is_false(ok)
      assert.matches("hash_spec.lua:" .. line .. ": hash.jump: buckets", err, 1, true)
    end)
  end)

  describe("mod", function()
    it("is crc32 of the key modulo the bucket count", function()
      assert.equal(0xCBF43926 % 10, hash.mod("123456789", 10))
      assert.equal(2364029289 % 7, hash.mod("tenant-0", 7))
      assert.equal(0, hash.mod("anything", 1))
    end)

    it("gives a number key the bucket of its decimal string", function()
      assert.equal(0xCBF43926 % 1000, hash.mod(123456789, 1000))
      for k = 0, 500 do
        assert.equal(hash.mod(tostring(k), 13), hash.mod(k, 13))
      end
    end)

    it("rejects bad arguments", function()
      assert.has_error(function() hash.mod("a", 0) end,
        "hash.mod: buckets must be a positive integer, got 0")
      assert.has_error(function() hash.mod(true, 3) end,
        "hash.mod: key must be a string or a non-negative integer below 2^53, got boolean")
    end)
  end)
end)

"""The Redis backend's Lua scripts: each decision runs as one script, atomic on the server.

Times are the caller's ``now`` (Unix seconds) and are compared inside the scripts; the keys'
own expiry (``PEXPIRE``) only lets Redis drop what no decision could need any more."""

from __future__ import annotations

from typing import Final

_HELPERS: Final = """
local function fmt(x) return string.format('%.17g', x) end
local function ms(seconds) return math.ceil(seconds * 1000) end
local function extend(key, seconds)
  if redis.call('PTTL', key) < ms(seconds) then redis.call('PEXPIRE', key, ms(seconds)) end
end
local function live(run, owner, now)
  local r = redis.call('HMGET', run, 'owner', 'lease_until', 'answer')
  return r[1] == owner and not r[3] and r[2] and tonumber(r[2]) > now
end
"""

# KEYS: bucket. ARGV: rate, burst, now, count (as many whole tokens as there are, at most
# count, are taken). Returns the tokens granted and the tokens left. A bucket left alone
# refills: dropping it when full (plus a second of slack) is the same as keeping it.
TAKE_TOKEN: Final = (
    _HELPERS
    + """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(saved[1]), tonumber(saved[2])
if tokens == nil then tokens, updated = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local granted = math.max(0, math.min(count, math.floor(tokens)))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', fmt(tokens), 'updated', fmt(math.max(now, updated)))
redis.call('PEXPIRE', KEYS[1], ms((burst - tokens) / rate) + 1000)
return {granted, fmt(tokens)}
"""
)

# KEYS: slots (a sorted set, holder → lease end). ARGV: holder, cap, ttl, now.
ACQUIRE_SLOT: Final = (
    _HELPERS
    + """
local cap, ttl, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[1])
extend(KEYS[1], ttl)
return 1
"""
)

# KEYS: slots. ARGV: ttl, now, holders...
RENEW_SLOTS: Final = (
    _HELPERS
    + """
local ttl, now = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do
  local held = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if held and held > now then
    redis.call('ZADD', KEYS[1], 'XX', fmt(now + ttl), ARGV[i])
    extend(KEYS[1], ttl)
  end
end
"""
)

# KEYS: run (a hash), journal (a hash: i:<batch> intent, o:<batch> outcome).
# ARGV: fingerprint, owner, lease, ttl, now.
CLAIM: Final = (
    _HELPERS
    + """
local fingerprint, owner = ARGV[1], ARGV[2]
local lease, ttl, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local run = redis.call('HMGET', KEYS[1], 'fingerprint', 'lease_until', 'expires', 'answer',
  'owner')
if run[1] and tonumber(run[3]) <= now then run[1] = false end
if not run[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'fingerprint', fingerprint, 'owner', owner,
    'lease_until', fmt(now + lease), 'expires', fmt(now + ttl))
  redis.call('PEXPIRE', KEYS[1], ms(ttl))
  return {'new'}
end
if run[1] ~= fingerprint then return {'mismatch'} end
if run[4] then return {'done', run[4]} end
-- Our own claim (a reply lost and the call sent again): ours still, with what it recorded, so
-- that a retried takeover keeps its journal and never sends a recorded batch again.
if run[5] == owner then
  redis.call('HSET', KEYS[1], 'lease_until', fmt(now + lease))
  return {'taken_over', redis.call('HGETALL', KEYS[2])}
end
if tonumber(run[2]) > now then return {'running'} end
redis.call('HSET', KEYS[1], 'owner', owner, 'lease_until', fmt(now + lease))
return {'taken_over', redis.call('HGETALL', KEYS[2])}
"""
)

# KEYS: run. ARGV: owner, lease, now.
RENEW: Final = (
    _HELPERS
    + """
local now = tonumber(ARGV[3])
if not live(KEYS[1], ARGV[1], now) then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', fmt(now + tonumber(ARGV[2])))
return 1
"""
)

# KEYS: run, journal. ARGV: owner, now, batch, intent.
RECORD_INTENT: Final = (
    _HELPERS
    + """
if not live(KEYS[1], ARGV[1], tonumber(ARGV[2])) then return 0 end
redis.call('HSET', KEYS[2], 'i:' .. ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[2], 'o:' .. ARGV[3])
local left = redis.call('PTTL', KEYS[1])
if left > 0 then redis.call('PEXPIRE', KEYS[2], left) end
return 1
"""
)

# KEYS: journal. ARGV: batch, outcome.
RECORD_OUTCOME: Final = """
if redis.call('HEXISTS', KEYS[1], 'i:' .. ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'o:' .. ARGV[1], ARGV[2])
end
"""

# KEYS: run, journal. ARGV: owner, answer, ttl, now.
COMPLETE: Final = (
    _HELPERS
    + """
local ttl, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local run = redis.call('HMGET', KEYS[1], 'owner', 'answer')
if run[1] ~= ARGV[1] or run[2] then return 0 end
redis.call('HSET', KEYS[1], 'answer', ARGV[2], 'lease_until', fmt(now), 'expires', fmt(now + ttl))
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ms(ttl))
return 1
"""
)

# KEYS: run. ARGV: owner.
ABANDON: Final = """
local run = redis.call('HMGET', KEYS[1], 'owner', 'answer')
if run[1] == ARGV[1] and not run[2] then redis.call('HSET', KEYS[1], 'lease_until', '0') end
"""

# KEYS: counters. ARGV: limit, amount, expires_at for each counter. All or nothing.
RESERVE: Final = """
local used = {}
for i, key in ipairs(KEYS) do used[i] = tonumber(redis.call('GET', key) or '0') end
for i = 1, #KEYS do
  if used[i] + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then
    return {0, i - 1, used}
  end
end
local clock = tonumber(redis.call('TIME')[1])
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[3 * i - 1])
  local at, ttl = math.ceil(tonumber(ARGV[3 * i])), redis.call('TTL', key)
  if ttl < 0 or clock + ttl < at then redis.call('EXPIREAT', key, at) end
end
for i, key in ipairs(KEYS) do used[i] = tonumber(redis.call('GET', key)) end
return {1, -1, used}
"""

# KEYS: the source's last batch number, then one hash per tenant and day. ARGV: seconds to
# keep them, the batch's number, then for each hash its number of fields and (field, amount)
# pairs. A batch numbered no higher than the last one added (its flush sent again after a late
# answer) adds nothing.
ADD_USAGE: Final = """
local seq = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[1]) or '0') >= seq then return 0 end
redis.call('SET', KEYS[1], seq, 'EX', ARGV[1])
local i = 3
for k = 2, #KEYS do
  local fields = tonumber(ARGV[i])
  for f = 1, fields do
    redis.call('HINCRBY', KEYS[k], ARGV[i + 2 * f - 1], ARGV[i + 2 * f])
  end
  redis.call('EXPIRE', KEYS[k], ARGV[1])
  i = i + 1 + 2 * fields
end
return 1
"""

# KEYS: counters. ARGV: amounts. DECRBY keeps the counter's expiry; a counter never goes below 0.
GIVE_BACK: Final = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local left = redis.call('DECRBY', key, ARGV[i])
    if left < 0 then redis.call('INCRBY', key, -left) end
  end
end
"""

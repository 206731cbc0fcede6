//! The Redis side of lazy coupons: the list of active coupons and who holds them.
//!
//! - `<p>:cp:active` — a sorted set of lazy coupon ids scored by their end time (ms); the
//!   issue script drops the expired ones with one `ZREMRANGEBYSCORE`. No JSON list, no lock.
//!   Its member `loaded` (score +inf, never expires) says the list was built from the
//!   database: a flag in the set itself cannot outlive the set.
//! - `<p>:cp:<id>` — a hash per coupon: `start`, `end`, `total` (-1 = unlimited) and `issued`.
//! - `<p>:cp:<id>:got:<range>` — a bitmap per 2^20 user ids: users known to hold the coupon,
//!   so a repeated login costs one `GETBIT` per coupon and no database work.
//! - `<p>:cp:<id>:claims` — a hash of the users of a limited coupon being issued right now
//!   (`token|deadline`); `issued` plus live claims never passes `total`, which is how stock
//!   is taken atomically. A user turned away while claims hold the last of the stock is
//!   told to wait rather than that it is gone: a claim can still come to nothing.
//!
//! When the list is not loaded (Redis lost its data), or lost part of it (a coupon of the set
//! without its hash: Redis evicted or restored some keys and not others), the issue script
//! says so and the caller rebuilds the list from the database first. Read as loaded, such a
//! list would let logins through without their coupons, and nothing would issue them later.
//! The database stays the record: its unique index and guarded count keep the item set
//! exact even while Redis is wrong.

use std::time::Duration;

use fred::{clients::Client, types::scripts::Script};

use super::store::Coupon;
use crate::markers::MarkerError;

/// How long a coupon's keys outlive its window.
const GRACE_MS: i64 = 24 * 3600 * 1000;

// ARGV: prefix, token, claim ttl ms, then user ids. Returns {-1} when the list is not
// loaded, else a flat list of (coupon id, user id) pairs: claimed ones, and with the coupon
// id negated, users of a limited coupon whose stock left claims in flight hold right now. A
// coupon whose hash is gone leaves the set, and the list is marked not loaded: the reload puts it back if the
// database still lists it.
const ISSUE: &str = r#"
local p, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local active = p .. ':cp:active'
if not redis.call('ZSCORE', active, 'loaded') then return {-1} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', active, '-inf', now)
local cs = {}
for _, id in ipairs(redis.call('ZRANGE', active, 0, -1)) do
  if id ~= 'loaded' then
    local base = p .. ':cp:' .. id
    local m = redis.call('HMGET', base, 'start', 'total', 'issued')
    if not m[1] then
      redis.call('ZREM', active, id, 'loaded')
      return {-1}
    end
    local start, total, issued = tonumber(m[1]), tonumber(m[2]) or -1, tonumber(m[3]) or 0
    if start <= now and (total < 0 or issued < total) then
      cs[#cs + 1] = {tonumber(id), total, issued, base, false}
    end
  end
end
local out = {}
if #cs == 0 then return out end
local mine = token .. '|' .. (now + ttl)
local function expired(v)
  return tonumber(string.sub(v, string.find(v, '|', 1, true) + 1)) <= now
end
-- Another batch's claim, not expired (a token is one batch's, so a claim under ours was
-- made by this very call).
local function live(v)
  return string.sub(v, 1, string.find(v, '|', 1, true) - 1) ~= token and not expired(v)
end
for i = 4, #ARGV do
  local u = tonumber(ARGV[i])
  local range, off = math.floor(u / 1048576), u % 1048576
  for _, c in ipairs(cs) do
    if redis.call('GETBIT', c[4] .. ':got:' .. range, off) == 0 then
      local take = true
      if c[2] >= 0 then
        local ck = c[4] .. ':claims'
        local cur = redis.call('HGET', ck, ARGV[i])
        if cur then
          take = not live(cur)
        else
          local held = c[3] + redis.call('HLEN', ck)
          if held >= c[2] and not c[5] then
            -- Claims of crashed workers hold stock until their deadline: drop them once.
            -- Only expired ones: this call's own claims are live.
            c[5] = true
            local all = redis.call('HGETALL', ck)
            for j = 1, #all, 2 do
              if expired(all[j + 1]) then redis.call('HDEL', ck, all[j]) end
            end
            held = c[3] + redis.call('HLEN', ck)
          end
          take = held < c[2]
        end
        if take then
          redis.call('HSET', ck, ARGV[i], mine)
        elseif not cur then
          -- Refused only for stock that claims in flight hold (a coupon whose `issued`
          -- reached `total` is not in `cs` at all). Such a claim can still come
          -- to nothing (a holder whose bit Redis lost, a failed insert), so this user waits
          -- for them instead of being turned away for good.
          out[#out + 1] = -c[1]
          out[#out + 1] = u
        end
      end
      if take then
        out[#out + 1] = c[1]
        out[#out + 1] = u
      end
    end
  end
end
return out
"#;

// ARGV: prefix, then (coupon id, user id, 1 if newly issued else 0) triples. Marks the users
// as holders, drops their claims, counts new items of limited coupons.
const CONFIRM: &str = r#"
local p = ARGV[1]
local touched = {}
for i = 2, #ARGV, 3 do
  local base, u = p .. ':cp:' .. ARGV[i], tonumber(ARGV[i + 1])
  local bm = base .. ':got:' .. math.floor(u / 1048576)
  redis.call('SETBIT', bm, u % 1048576, 1)
  touched[bm] = base
  if redis.call('HDEL', base .. ':claims', ARGV[i + 1]) == 1 and ARGV[i + 2] == '1' then
    redis.call('HINCRBY', base, 'issued', 1)
  end
end
for bm, base in pairs(touched) do
  local e = tonumber(redis.call('HGET', base, 'end'))
  if e then
    redis.call('PEXPIREAT', bm, e + 86400000)
  else
    redis.call('EXPIRE', bm, 604800)
  end
end
return 1
"#;

// ARGV: prefix, token, then (coupon id, user id) pairs: drops our claims.
const RELEASE: &str = r#"
local p, token = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local ck = p .. ':cp:' .. ARGV[i] .. ':claims'
  local cur = redis.call('HGET', ck, ARGV[i + 1])
  if cur and string.sub(cur, 1, string.find(cur, '|', 1, true) - 1) == token then
    redis.call('HDEL', ck, ARGV[i + 1])
  end
end
return 1
"#;

// ARGV: prefix, mode ('sync' or 'add'), grace ms, then (id, start, end, total, issued) per
// coupon. Only a sync marks the list loaded. An 'add' to a list not loaded yet still writes
// its coupon: a load may have read the database before the coupon was committed and write
// its list after this add, and without it the coupon would miss every login until the next
// sync. Into a list not loaded `issued` is the database's; otherwise the live counter,
// which includes claims confirmed since the database was read, is kept.
const SYNC: &str = r#"
local p, mode, grace = ARGV[1], ARGV[2], tonumber(ARGV[3])
local loaded = redis.call('ZSCORE', p .. ':cp:active', 'loaded') ~= false
for i = 4, #ARGV, 5 do
  local base = p .. ':cp:' .. ARGV[i]
  redis.call('ZADD', p .. ':cp:active', ARGV[i + 2], ARGV[i])
  redis.call('HSET', base, 'start', ARGV[i + 1], 'end', ARGV[i + 2], 'total', ARGV[i + 3])
  if loaded then
    redis.call('HSETNX', base, 'issued', ARGV[i + 4])
  else
    redis.call('HSET', base, 'issued', ARGV[i + 4])
  end
  redis.call('PEXPIREAT', base, tonumber(ARGV[i + 2]) + grace)
end
if mode == 'sync' then
  redis.call('ZADD', p .. ':cp:active', '+inf', 'loaded')
  -- The flag's own key before it became a member of the set (herald before 145d97d).
  redis.call('DEL', p .. ':cp:loaded')
end
return 1
"#;

/// What the issue script said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The active list is not in Redis: rebuild it from the database and try again.
    NotLoaded,
    /// What the users get now, and who waits.
    Pairs {
        /// (coupon, user) pairs to issue now; the limited ones are claimed under the token.
        claimed: Vec<(i64, i64)>,
        /// (coupon, user) pairs of a limited coupon whose stock left is all held by claims
        /// in flight. Those may still come to nothing (a holder whose bit Redis lost, a
        /// failed insert), so these users are not out of luck yet: ask again later.
        waiting: Vec<(i64, i64)>,
    },
}

impl Claimed {
    /// Nothing to issue and nobody waiting.
    pub fn none() -> Self {
        Self::Pairs {
            claimed: Vec::new(),
            waiting: Vec::new(),
        }
    }
}

/// The active lazy coupons in Redis.
#[derive(Clone)]
pub struct ActiveCoupons {
    client: Client,
    prefix: String,
    claim_ttl: Duration,
    issue: Script,
    confirm: Script,
    release: Script,
    sync: Script,
}

impl ActiveCoupons {
    /// The list under `prefix`; claims live `claim_ttl`.
    pub fn new(client: Client, prefix: &str, claim_ttl: Duration) -> Self {
        Self {
            client,
            prefix: prefix.to_string(),
            claim_ttl,
            issue: Script::from_lua(ISSUE),
            confirm: Script::from_lua(CONFIRM),
            release: Script::from_lua(RELEASE),
            sync: Script::from_lua(SYNC),
        }
    }

    /// The key pattern of everything this list keeps (for cleanup).
    pub fn key_pattern(&self) -> String {
        format!("{}:cp:*", self.prefix)
    }

    /// For each user, the active coupons they do not hold yet, claiming limited ones.
    pub async fn claim(&self, users: &[i64], token: &str) -> Result<Claimed, MarkerError> {
        if users.is_empty() {
            return Ok(Claimed::none());
        }
        let mut args = vec![
            self.prefix.clone(),
            token.to_string(),
            self.claim_ttl.as_millis().max(1).to_string(),
        ];
        args.extend(users.iter().map(|u| u.to_string()));
        let out: Vec<i64> = self
            .issue
            .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
            .await?;
        if out.first() == Some(&-1) {
            return Ok(Claimed::NotLoaded);
        }
        let (mut claimed, mut waiting) = (Vec::new(), Vec::new());
        for p in out.chunks_exact(2) {
            if p[0] < 0 {
                waiting.push((-p[0], p[1]));
            } else {
                claimed.push((p[0], p[1]));
            }
        }
        Ok(Claimed::Pairs { claimed, waiting })
    }

    /// Marks pairs as held: `issued` says which of them got a new item now.
    pub async fn confirm(&self, pairs: &[((i64, i64), bool)]) -> Result<(), MarkerError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(pairs.len() * 3 + 1);
        args.push(self.prefix.clone());
        for ((c, u), issued) in pairs {
            args.push(c.to_string());
            args.push(u.to_string());
            args.push(if *issued { "1" } else { "0" }.to_string());
        }
        let _: i64 = self
            .confirm
            .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
            .await?;
        Ok(())
    }

    /// Drops the claims `token` holds on these pairs.
    pub async fn release(&self, pairs: &[(i64, i64)], token: &str) -> Result<(), MarkerError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut args = vec![self.prefix.clone(), token.to_string()];
        for (c, u) in pairs {
            args.push(c.to_string());
            args.push(u.to_string());
        }
        let _: i64 = self
            .release
            .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
            .await?;
        Ok(())
    }

    /// Writes the database's active lazy coupons into Redis and marks the list loaded.
    pub async fn sync(&self, coupons: &[Coupon]) -> Result<(), MarkerError> {
        self.write("sync", coupons).await
    }

    /// Adds a new coupon. The list stays not loaded if it was: the next login loads it.
    pub async fn add(&self, coupon: &Coupon) -> Result<(), MarkerError> {
        self.write("add", std::slice::from_ref(coupon)).await
    }

    /// Sets a coupon's issued count (the database's, after its stock guard disagreed).
    pub async fn set_issued(&self, coupon: &Coupon) -> Result<(), MarkerError> {
        let key = format!("{}:cp:{}", self.prefix, coupon.id);
        let _: i64 = fred::interfaces::HashesInterface::hset(
            &self.client,
            key,
            [("issued", coupon.issued.to_string())],
        )
        .await?;
        Ok(())
    }

    async fn write(&self, mode: &str, coupons: &[Coupon]) -> Result<(), MarkerError> {
        let mut args = vec![self.prefix.clone(), mode.to_string(), GRACE_MS.to_string()];
        for c in coupons {
            args.push(c.id.to_string());
            args.push(c.starts_at.timestamp_millis().to_string());
            args.push(c.ends_at.timestamp_millis().to_string());
            args.push(c.total.unwrap_or(-1).to_string());
            args.push(c.issued.to_string());
        }
        let _: i64 = self
            .sync
            .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
            .await?;
        Ok(())
    }
}

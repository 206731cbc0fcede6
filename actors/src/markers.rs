//! Idempotency markers in Redis: per (campaign, user), claim before a send and confirm after.
//!
//! A confirmed user is one bit in a bitmap per campaign and id range (2^20 ids per key), so a
//! 10M-user campaign costs about 1.25 MB, not 10M keys. A claim is a field of a hash per id
//! range holding the claimer's token and a deadline; only users in flight have one, and a
//! claim past its deadline is free again. (A hash field rather than a key with a TTL per user:
//! it spares Redis's single thread the key-space and expiry churn, its bottleneck here.)
//! Claim and confirm run as Lua scripts over a whole batch: one round trip per hundred users,
//! atomic for the batch, and a few Redis commands per id range rather than two per user. A
//! token match counts as our own claim, so a command fred re-sends after a reconnect is
//! harmless.
//!
//! Per batch, a hash field accumulates how many users this batch confirmed as sent or failed
//! across its deliveries, so the counters stay exact when a batch is retried.
//!
//! Redis is not the record: if it loses its data, users whose batch was still in flight may
//! be sent again (the provider's Idempotency-Key is the last guard); completed batches are
//! acked and never come back.

use std::time::Duration;

use fred::{
    clients::Client,
    interfaces::{ClientLike, HashesInterface, KeysInterface, LuaInterface},
    prelude::{Builder, Config, ReconnectPolicy},
    types::{scripts::Script, Value},
};

/// Bits per bitmap key.
const CHUNK_BITS: u32 = 20;

/// Names a campaign in Redis keys: its id and its epoch (creation time in ms), so markers of
/// an older campaign with the same id (a recreated database) never apply to a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CampaignRef {
    /// Campaign id.
    pub id: i64,
    /// Creation time in ms.
    pub epoch: i64,
}

impl From<i64> for CampaignRef {
    fn from(id: i64) -> Self {
        Self { id, epoch: 0 }
    }
}

impl std::fmt::Display for CampaignRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.epoch)
    }
}

/// The state of a user after a claim attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    /// Already sent (or settled as failed): skip.
    Done,
    /// Claimed by us: send.
    Claimed,
    /// Claimed by another worker that is sending now: come back later.
    Busy,
}

/// A Redis operation failed.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct MarkerError(#[from] fred::error::Error);

// Shared by the scripts below: `group` sorts a batch's packed users into their id ranges, and
// `chunked` runs one command over many arguments in slices (Lua's unpack is bounded), so a
// batch costs a few Redis commands per id range instead of two per user.
//
// The users come packed in one binary argument: per user its range index (1-based, u16 little
// endian), then its offset in the range as decimal digits after a length byte. One argument
// instead of two strings per user, because formatting and framing those strings was the
// engine's largest cost in a profile; decimal digits rather than a binary number, because
// turning a Lua number into a string (tostring, or a number passed to redis.call) costs
// about 0.2 µs in Redis's Lua, which was most of a script's cost, while the digits serve as
// they are as a BITFIELD offset and a hash field.
const HELPERS: &str = r#"
local function group(packed, n, ranges)
  local idx, offs, len = {}, {}, {}
  for k = 1, ranges do idx[k] = {}; offs[k] = {}; len[k] = 0 end
  local pos = 1
  for i = 1, n do
    local lo, hi, digits = string.byte(packed, pos, pos + 2)
    local k = lo + 256 * hi
    local j = len[k] + 1
    len[k] = j
    idx[k][j] = i
    offs[k][j] = string.sub(packed, pos + 3, pos + 2 + digits)
    pos = pos + 3 + digits
  end
  return idx, offs
end
local function chunked(cmd, key, args, step)
  local res = {}
  for s = 1, #args, step do
    local r = redis.call(cmd, key, unpack(args, s, math.min(s + step - 1, #args)))
    if type(r) == 'table' then
      for j = 1, #r do res[#res + 1] = r[j] end
    end
  end
  return res
end
local function bit_ops(op, offs, value)
  local ops = {}
  for j = 1, #offs do
    local b = #ops
    ops[b + 1] = op; ops[b + 2] = 'u1'; ops[b + 3] = offs[j]
    if value then ops[b + 4] = value end
  end
  return ops
end
"#;

// KEYS: per id range, its claims hash then its bitmap. ARGV: token, ttl ms, n, marker ttl s,
// then the users packed (see HELPERS). Per range, one BITFIELD_RO reads the
// users' bits, one HMGET their claims and one HSET takes the free ones: the script is atomic,
// so this is the same as a GETBIT and an HSETNX per user, at a fraction of Redis's CPU.
// Returns one character per user, in order: '0' done, '1' claimed, '2' busy (one string
// rather than a reply element per user).
const CLAIM: &str = r#"
local token, ttl, n, packed = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = token .. '|' .. (now + ttl)
local idx, offs = group(packed, n, #KEYS / 2)
local out = {}
for k = 1, #KEYS / 2 do
  local claims, bitmap, ki, ko = KEYS[2 * k - 1], KEYS[2 * k], idx[k], offs[k]
  local bits = chunked('BITFIELD_RO', bitmap, bit_ops('GET', ko), 1500)
  local fi, fo = {}, {}
  for j = 1, #ko do
    if bits[j] == 1 then
      out[ki[j]] = '0'
    else
      fi[#fi + 1] = ki[j]
      fo[#fo + 1] = ko[j]
    end
  end
  local cur = chunked('HMGET', claims, fo, 1000)
  local take = {}
  for j = 1, #fo do
    local c, free = cur[j], true
    if c then
      local sep = string.find(c, '|', 1, true)
      free = string.sub(c, 1, sep - 1) == token or tonumber(string.sub(c, sep + 1)) <= now
    end
    if free then
      out[fi[j]] = '1'
      take[#take + 1] = fo[j]
      take[#take + 1] = mine
    else
      out[fi[j]] = '2'
    end
  end
  chunked('HSET', claims, take, 2000)
  redis.call('EXPIRE', claims, ARGV[4])
end
return table.concat(out)
"#;

// KEYS: per id range, its claims hash then its bitmap; last, the progress hash.
// ARGV: n, progress field, marker ttl s, the users packed as for CLAIM, and the progress
// field of the other kind. Returns both running totals, this kind's first, so a batch with
// no failures needs no second call to learn its failed total.
// The claim is dropped whoever holds it: once the bit is set nobody may send again, and a
// holder that is sending right now claimed before this confirm, so it would send anyway.
// Per range, one BITFIELD sets the bits (its old values count the new ones) and one HDEL
// drops the claims.
const CONFIRM: &str = r#"
local n, packed = tonumber(ARGV[1]), ARGV[4]
local ranges = (#KEYS - 1) / 2
local idx, offs = group(packed, n, ranges)
local added = 0
for k = 1, ranges do
  local ko = offs[k]
  local old = chunked('BITFIELD', KEYS[2 * k], bit_ops('SET', ko, 1), 2000)
  for j = 1, #old do
    if old[j] == 0 then
      added = added + 1
    end
  end
  chunked('HDEL', KEYS[2 * k - 1], ko, 1000)
  redis.call('EXPIRE', KEYS[2 * k], ARGV[3])
end
local total = redis.call('HINCRBY', KEYS[#KEYS], ARGV[2], added)
local other = tonumber(redis.call('HGET', KEYS[#KEYS], ARGV[5])) or 0
redis.call('EXPIRE', KEYS[#KEYS], ARGV[3])
return {total, other}
"#;

// KEYS: per id range, its claims hash. ARGV: token, n, then the users packed as for CLAIM.
const RELEASE: &str = r#"
local token, n, packed = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local idx, offs = group(packed, n, #KEYS)
for k = 1, #KEYS do
  local ko = offs[k]
  local cur = chunked('HMGET', KEYS[k], ko, 1000)
  local mine = {}
  for j = 1, #ko do
    local c = cur[j]
    if c and string.sub(c, 1, string.find(c, '|', 1, true) - 1) == token then
      mine[#mine + 1] = ko[j]
    end
  end
  chunked('HDEL', KEYS[k], mine, 1000)
end
return n
"#;

/// Connects to Redis with explicit timeouts and a bounded reconnect policy.
pub async fn connect(url: &str, command_timeout: Duration) -> Result<Client, MarkerError> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
            c.max_command_attempts = 3;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    let client = builder.build()?;
    client.init().await?;
    Ok(client)
}

/// Deletes every key matching `pattern` (SCAN, not KEYS, so Redis keeps serving).
pub async fn delete_matching(client: &Client, pattern: &str) -> Result<(), MarkerError> {
    let mut cursor = "0".to_string();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .custom(
                fred::cmd!("SCAN"),
                vec![
                    cursor,
                    "MATCH".into(),
                    pattern.to_string(),
                    "COUNT".into(),
                    "10000".into(),
                ],
            )
            .await?;
        if !keys.is_empty() {
            let _: i64 = client.del(keys).await?;
        }
        if next == "0" {
            return Ok(());
        }
        cursor = next;
    }
}

/// Idempotency markers of one deployment (key prefix).
#[derive(Clone)]
pub struct Markers {
    client: Client,
    prefix: String,
    claim_ttl: Duration,
    marker_ttl: Duration,
    claim: Script,
    confirm: Script,
    release: Script,
}

/// A batch's running totals across its deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Users confirmed as sent.
    pub sent: i64,
    /// Users confirmed as failed for good.
    pub failed: i64,
}

/// Which counter a confirmation adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The provider accepted the push.
    Sent,
    /// The push failed for good.
    Failed,
}

impl Markers {
    /// Markers under `prefix`; claims live `claim_ttl`, confirmations `marker_ttl`.
    pub fn new(client: Client, prefix: &str, claim_ttl: Duration, marker_ttl: Duration) -> Self {
        Self {
            client,
            prefix: prefix.to_string(),
            claim_ttl,
            marker_ttl,
            claim: Script::from_lua(format!("{HELPERS}{CLAIM}")),
            confirm: Script::from_lua(format!("{HELPERS}{CONFIRM}")),
            release: Script::from_lua(format!("{HELPERS}{RELEASE}")),
        }
    }

    /// The Redis client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn claims_key(&self, campaign: CampaignRef, chunk: i64) -> String {
        format!("{}:c:{campaign}:claims:{chunk}", self.prefix)
    }

    fn bitmap_key(&self, campaign: CampaignRef, user: i64) -> String {
        format!("{}:c:{campaign}:done:{}", self.prefix, user >> CHUNK_BITS)
    }

    fn offset(user: i64) -> i64 {
        user & ((1 << CHUNK_BITS) - 1)
    }

    fn progress_key(&self, campaign: CampaignRef) -> String {
        format!("{}:c:{campaign}:progress", self.prefix)
    }

    /// The id ranges `users` fall in, and the users packed for the scripts (see `HELPERS`):
    /// per user its range index from 1 (u16 little endian), a length byte and its offset in
    /// the range in decimal digits.
    fn ranges(users: &[i64]) -> (Vec<i64>, Value) {
        let mut chunks: Vec<i64> = Vec::new();
        let mut packed = Vec::with_capacity(users.len() * 10);
        let mut digits = itoa::Buffer::new();
        for u in users {
            let chunk = u >> CHUNK_BITS;
            let k = match chunks.iter().position(|c| *c == chunk) {
                Some(i) => i + 1,
                None => {
                    chunks.push(chunk);
                    chunks.len()
                }
            };
            let offset = digits.format(Self::offset(*u));
            packed.extend_from_slice(&(k as u16).to_le_bytes());
            packed.push(offset.len() as u8);
            packed.extend_from_slice(offset.as_bytes());
        }
        (chunks, Value::Bytes(packed.into()))
    }

    fn range_keys(&self, campaign: CampaignRef, chunks: &[i64], with_bitmaps: bool) -> Vec<String> {
        let mut keys = Vec::with_capacity(chunks.len() * 2 + 1);
        for c in chunks {
            keys.push(self.claims_key(campaign, *c));
            if with_bitmaps {
                keys.push(format!("{}:c:{campaign}:done:{c}", self.prefix));
            }
        }
        keys
    }

    /// Claims `users` for the holder of `token`; one state per user, in order.
    pub async fn claim(
        &self,
        campaign: impl Into<CampaignRef>,
        users: &[i64],
        token: &str,
    ) -> Result<Vec<ClaimState>, MarkerError> {
        let campaign: CampaignRef = campaign.into();
        if users.is_empty() {
            return Ok(vec![]);
        }
        let (chunks, pairs) = Self::ranges(users);
        let keys = self.range_keys(campaign, &chunks, true);
        let args: Vec<Value> = vec![
            token.into(),
            self.claim_ttl.as_millis().max(1).to_string().into(),
            users.len().to_string().into(),
            self.marker_ttl.as_secs().max(1).to_string().into(),
            pairs,
        ];
        let reply: Value = self
            .claim
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        let states = reply.as_bytes().unwrap_or_default();
        if states.len() != users.len() {
            return Err(MarkerError(fred::error::Error::new(
                fred::error::ErrorKind::Unknown,
                format!(
                    "claim answered {} states for {} users",
                    states.len(),
                    users.len()
                ),
            )));
        }
        Ok(states
            .iter()
            .map(|s| match s {
                b'0' => ClaimState::Done,
                b'1' => ClaimState::Claimed,
                _ => ClaimState::Busy,
            })
            .collect())
    }

    /// Confirms `users` as settled by this batch, dropping their claims whoever holds them;
    /// returns the batch's running total for `kind` across all its deliveries.
    pub async fn confirm(
        &self,
        campaign: impl Into<CampaignRef>,
        batch_field: &str,
        kind: Settled,
        users: &[i64],
    ) -> Result<i64, MarkerError> {
        let totals = self
            .confirm_totals(campaign, batch_field, kind, users)
            .await?;
        Ok(match kind {
            Settled::Sent => totals.sent,
            Settled::Failed => totals.failed,
        })
    }

    /// As [`Markers::confirm`], returning the batch's running totals of both kinds.
    pub async fn confirm_totals(
        &self,
        campaign: impl Into<CampaignRef>,
        batch_field: &str,
        kind: Settled,
        users: &[i64],
    ) -> Result<Totals, MarkerError> {
        let campaign: CampaignRef = campaign.into();
        let (chunks, pairs) = Self::ranges(users);
        let mut keys = self.range_keys(campaign, &chunks, true);
        keys.push(self.progress_key(campaign));
        let (field, other) = match kind {
            Settled::Sent => (format!("{batch_field}:s"), format!("{batch_field}:f")),
            Settled::Failed => (format!("{batch_field}:f"), format!("{batch_field}:s")),
        };
        let args: Vec<Value> = vec![
            users.len().to_string().into(),
            field.into(),
            self.marker_ttl.as_secs().max(1).to_string().into(),
            pairs,
            other.into(),
        ];
        let (mine, other): (i64, i64) = self
            .confirm
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(match kind {
            Settled::Sent => Totals {
                sent: mine,
                failed: other,
            },
            Settled::Failed => Totals {
                sent: other,
                failed: mine,
            },
        })
    }

    /// Drops our claims on `users` (after a failed attempt), so a retry can claim them.
    pub async fn release(
        &self,
        campaign: impl Into<CampaignRef>,
        users: &[i64],
        token: &str,
    ) -> Result<(), MarkerError> {
        let campaign: CampaignRef = campaign.into();
        if users.is_empty() {
            return Ok(());
        }
        let (chunks, pairs) = Self::ranges(users);
        let keys = self.range_keys(campaign, &chunks, false);
        let args: Vec<Value> = vec![token.into(), users.len().to_string().into(), pairs];
        let _: i64 = self
            .release
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(())
    }

    /// Drops a finished batch's running totals: once the batch is recorded in the database
    /// they are never read again, and keeping them would grow Redis with the campaign.
    pub async fn forget_batch(
        &self,
        campaign: impl Into<CampaignRef>,
        batch_field: &str,
    ) -> Result<(), MarkerError> {
        let campaign: CampaignRef = campaign.into();
        let _: i64 = self
            .client
            .hdel(
                self.progress_key(campaign),
                vec![format!("{batch_field}:s"), format!("{batch_field}:f")],
            )
            .await?;
        Ok(())
    }

    /// True when the user's push is confirmed.
    pub async fn is_done(
        &self,
        campaign: impl Into<CampaignRef>,
        user: i64,
    ) -> Result<bool, MarkerError> {
        let campaign: CampaignRef = campaign.into();
        let bit: i64 = self
            .client
            .eval(
                "return redis.call('GETBIT', KEYS[1], ARGV[1])",
                vec![self.bitmap_key(campaign, user)],
                vec![Self::offset(user).to_string()],
            )
            .await?;
        Ok(bit == 1)
    }

    /// Deletes every marker of a campaign: bitmaps, claims and progress.
    pub async fn forget_campaign(
        &self,
        campaign: impl Into<CampaignRef>,
        max_user_id: i64,
    ) -> Result<(), MarkerError> {
        let campaign: CampaignRef = campaign.into();
        let mut keys = vec![self.progress_key(campaign)];
        for chunk in 0..=(max_user_id.max(0) >> CHUNK_BITS) {
            keys.push(format!("{}:c:{campaign}:done:{chunk}", self.prefix));
            keys.push(self.claims_key(campaign, chunk));
        }
        let _: i64 = self.client.del(keys).await?;
        Ok(())
    }
}

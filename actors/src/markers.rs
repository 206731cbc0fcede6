//! Idempotency markers in Redis: per (campaign, user), claim before a send and confirm after.
//!
//! A confirmed user is one bit in a bitmap per campaign and id range (2^20 ids per key), so a
//! 10M-user campaign costs about 1.25 MB, not 10M keys. A claim is a field of a hash per id
//! range holding the claimer's token and a deadline; only users in flight have one, and a
//! claim past its deadline is free again. (A hash field rather than a key with a TTL per user:
//! it spares Redis's single thread the key-space and expiry churn, its bottleneck here.)
//! Claim and confirm run as Lua scripts over a whole batch: one round trip per hundred users,
//! atomic per user. A token match counts as our own claim, so a command fred re-sends after a
//! reconnect is harmless.
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

// KEYS: per id range, its claims hash then its bitmap. ARGV: token, ttl ms, n, marker ttl s,
// then the users packed: per user its range index (1-based, u16) and offset (u32), little
// endian. One binary argument instead of two strings per user: formatting and framing those
// strings was the engine's largest cost in a profile.
const CLAIM: &str = r#"
local token, ttl, n, packed = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = token .. '|' .. (now + ttl)
local out = {}
for i = 1, n do
  local k, off = struct.unpack('<I2I4', packed, 6 * i - 5)
  local claims, bitmap = KEYS[2 * k - 1], KEYS[2 * k]
  if redis.call('GETBIT', bitmap, off) == 1 then
    out[i] = 0
  elseif redis.call('HSETNX', claims, off, mine) == 1 then
    out[i] = 1
  else
    local cur = redis.call('HGET', claims, off)
    local sep = string.find(cur, '|', 1, true)
    if string.sub(cur, 1, sep - 1) == token or tonumber(string.sub(cur, sep + 1)) <= now then
      redis.call('HSET', claims, off, mine)
      out[i] = 1
    else
      out[i] = 2
    end
  end
end
for j = 1, #KEYS, 2 do
  redis.call('EXPIRE', KEYS[j], ARGV[4])
end
return out
"#;

// KEYS: per id range, its claims hash then its bitmap; last, the progress hash.
// ARGV: n, progress field, marker ttl s, then the users packed as for CLAIM.
// The claim is dropped whoever holds it: once the bit is set nobody may send again, and a
// holder that is sending right now claimed before this confirm, so it would send anyway.
const CONFIRM: &str = r#"
local n, packed = tonumber(ARGV[1]), ARGV[4]
local added = 0
for i = 1, n do
  local k, off = struct.unpack('<I2I4', packed, 6 * i - 5)
  if redis.call('SETBIT', KEYS[2 * k], off, 1) == 0 then
    added = added + 1
  end
  redis.call('HDEL', KEYS[2 * k - 1], off)
end
for j = 2, #KEYS - 1, 2 do
  redis.call('EXPIRE', KEYS[j], ARGV[3])
end
local total = redis.call('HINCRBY', KEYS[#KEYS], ARGV[2], added)
redis.call('EXPIRE', KEYS[#KEYS], ARGV[3])
return total
"#;

// KEYS: per id range, its claims hash. ARGV: token, n, then the users packed as for CLAIM.
const RELEASE: &str = r#"
local token, n, packed = ARGV[1], tonumber(ARGV[2]), ARGV[3]
for i = 1, n do
  local k, off = struct.unpack('<I2I4', packed, 6 * i - 5)
  local claims = KEYS[k]
  local cur = redis.call('HGET', claims, off)
  if cur and string.sub(cur, 1, string.find(cur, '|', 1, true) - 1) == token then
    redis.call('HDEL', claims, off)
  end
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
            claim: Script::from_lua(CLAIM),
            confirm: Script::from_lua(CONFIRM),
            release: Script::from_lua(RELEASE),
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

    /// The id ranges `users` fall in, and the users packed for the scripts: per user its
    /// range index from 1 (u16) and its offset in the range (u32), little endian.
    fn ranges(users: &[i64]) -> (Vec<i64>, Value) {
        let mut chunks: Vec<i64> = Vec::new();
        let mut packed = Vec::with_capacity(users.len() * 6);
        for u in users {
            let chunk = u >> CHUNK_BITS;
            let k = match chunks.iter().position(|c| *c == chunk) {
                Some(i) => i + 1,
                None => {
                    chunks.push(chunk);
                    chunks.len()
                }
            };
            packed.extend_from_slice(&(k as u16).to_le_bytes());
            packed.extend_from_slice(&(Self::offset(*u) as u32).to_le_bytes());
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
        let states: Vec<i64> = self
            .claim
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(states
            .into_iter()
            .map(|s| match s {
                0 => ClaimState::Done,
                1 => ClaimState::Claimed,
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
        let campaign: CampaignRef = campaign.into();
        let (chunks, pairs) = Self::ranges(users);
        let mut keys = self.range_keys(campaign, &chunks, true);
        keys.push(self.progress_key(campaign));
        let field = match kind {
            Settled::Sent => format!("{batch_field}:s"),
            Settled::Failed => format!("{batch_field}:f"),
        };
        let args: Vec<Value> = vec![
            users.len().to_string().into(),
            field.into(),
            self.marker_ttl.as_secs().max(1).to_string().into(),
            pairs,
        ];
        Ok(self
            .confirm
            .evalsha_with_reload(&self.client, keys, args)
            .await?)
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

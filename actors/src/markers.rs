//! Idempotency markers in Redis: per (campaign, user), claim before a send and confirm after.
//!
//! A confirmed user is one bit in a bitmap per campaign and id range (2^20 ids per key), so a
//! 10M-user campaign costs about 1.25 MB, not 10M keys. A claim is a short-lived key holding
//! the claimer's token with a TTL; only users in flight have one. Claim and confirm run as
//! Lua scripts over a whole batch: one round trip per hundred users, atomic per user. A token
//! match counts as our own claim, so a command fred re-sends after a reconnect is harmless.
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
    types::scripts::Script,
};

/// Bits per bitmap key.
const CHUNK_BITS: u32 = 20;

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

const CLAIM: &str = r#"
local n = tonumber(ARGV[3])
local out = {}
for i = 1, n do
  if redis.call('GETBIT', KEYS[n + i], tonumber(ARGV[3 + i])) == 1 then
    out[i] = 0
  elseif redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[i] = 1
  else
    out[i] = 2
  end
end
return out
"#;

// KEYS: n claim keys, n bitmap keys, the progress hash. ARGV: token, n, field, ttl, offsets.
const CONFIRM: &str = r#"
local n = tonumber(ARGV[2])
local added = 0
local bitmaps = {}
for i = 1, n do
  if redis.call('SETBIT', KEYS[n + i], tonumber(ARGV[4 + i]), 1) == 0 then
    added = added + 1
  end
  bitmaps[KEYS[n + i]] = true
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
for key in pairs(bitmaps) do
  redis.call('EXPIRE', key, ARGV[4])
end
local total = redis.call('HINCRBY', KEYS[2 * n + 1], ARGV[3], added)
redis.call('EXPIRE', KEYS[2 * n + 1], ARGV[4])
return total
"#;

const RELEASE: &str = r#"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return #KEYS
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

    fn claim_key(&self, campaign: i64, user: i64) -> String {
        format!("{}:c:{campaign}:claim:{user}", self.prefix)
    }

    fn bitmap_key(&self, campaign: i64, user: i64) -> String {
        format!("{}:c:{campaign}:done:{}", self.prefix, user >> CHUNK_BITS)
    }

    fn offset(user: i64) -> i64 {
        user & ((1 << CHUNK_BITS) - 1)
    }

    fn progress_key(&self, campaign: i64) -> String {
        format!("{}:c:{campaign}:progress", self.prefix)
    }

    /// Claims `users` for the holder of `token`; one state per user, in order.
    pub async fn claim(
        &self,
        campaign: i64,
        users: &[i64],
        token: &str,
    ) -> Result<Vec<ClaimState>, MarkerError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let mut keys: Vec<String> = users.iter().map(|u| self.claim_key(campaign, *u)).collect();
        keys.extend(users.iter().map(|u| self.bitmap_key(campaign, *u)));
        let mut args: Vec<String> = vec![
            token.to_string(),
            self.claim_ttl.as_millis().max(1).to_string(),
            users.len().to_string(),
        ];
        args.extend(users.iter().map(|u| Self::offset(*u).to_string()));
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

    /// Confirms `users` as settled by this batch; returns the batch's running total for
    /// `kind` across all its deliveries.
    pub async fn confirm(
        &self,
        campaign: i64,
        batch_field: &str,
        kind: Settled,
        users: &[i64],
        token: &str,
    ) -> Result<i64, MarkerError> {
        let mut keys: Vec<String> = users.iter().map(|u| self.claim_key(campaign, *u)).collect();
        keys.extend(users.iter().map(|u| self.bitmap_key(campaign, *u)));
        keys.push(self.progress_key(campaign));
        let field = match kind {
            Settled::Sent => format!("{batch_field}:s"),
            Settled::Failed => format!("{batch_field}:f"),
        };
        let mut args: Vec<String> = vec![
            token.to_string(),
            users.len().to_string(),
            field,
            self.marker_ttl.as_secs().max(1).to_string(),
        ];
        args.extend(users.iter().map(|u| Self::offset(*u).to_string()));
        Ok(self
            .confirm
            .evalsha_with_reload(&self.client, keys, args)
            .await?)
    }

    /// Drops our claims on `users` (after a failed attempt), so a retry can claim them.
    pub async fn release(
        &self,
        campaign: i64,
        users: &[i64],
        token: &str,
    ) -> Result<(), MarkerError> {
        if users.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = users.iter().map(|u| self.claim_key(campaign, *u)).collect();
        let _: i64 = self
            .release
            .evalsha_with_reload(&self.client, keys, vec![token.to_string()])
            .await?;
        Ok(())
    }

    /// Drops a finished batch's running totals: once the batch is recorded in the database
    /// they are never read again, and keeping them would grow Redis with the campaign.
    pub async fn forget_batch(&self, campaign: i64, batch_field: &str) -> Result<(), MarkerError> {
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
    pub async fn is_done(&self, campaign: i64, user: i64) -> Result<bool, MarkerError> {
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

    /// Deletes every marker of a campaign (bitmaps, progress; claims expire by themselves).
    pub async fn forget_campaign(
        &self,
        campaign: i64,
        max_user_id: i64,
    ) -> Result<(), MarkerError> {
        let mut keys = vec![self.progress_key(campaign)];
        for chunk in 0..=(max_user_id.max(0) >> CHUNK_BITS) {
            keys.push(format!("{}:c:{campaign}:done:{chunk}", self.prefix));
        }
        let _: i64 = self.client.del(keys).await?;
        Ok(())
    }
}

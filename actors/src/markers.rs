//! Idempotency markers in Redis: per (campaign, user), claim before a send and confirm after.
//!
//! A confirmed user is one bit in a bitmap per campaign and id range (2^20 ids per key), so a
//! 10M-user campaign costs about 1.25 MB, not 10M keys.
//!
//! A claim is a lease on a block of 32 consecutive ids: a field of a hash per id range holding
//! the claimer's token and a deadline. Only blocks in flight have one, and a lease past its
//! deadline is free again. Two batches that share a user share that user's block, so they
//! cannot both hold it: a user is claimed by one batch at a time, whatever the batches hold.
//! The expander cuts batches at block boundaries, so batches of one campaign do not contend.
//!
//! Claim and confirm run as Lua scripts over a whole batch, one round trip per batch and
//! atomic for it. They read and write the bitmap a span of bytes at a time (GETRANGE,
//! SETRANGE), and lease a field per block rather than per user: per batch of a dense
//! audience, a handful of Redis commands, and no Lua work per user (that was most of Redis's
//! time per user). A token match counts as our own lease, so a command fred re-sends after a
//! reconnect is harmless.
//!
//! Per batch, a hash field accumulates how many users this batch confirmed as sent or failed
//! across its deliveries, so the counters stay exact when a batch is retried.
//!
//! Redis is not the record: if it loses its data, users whose batch was still in flight may
//! be sent again (the provider's Idempotency-Key is the last guard); completed batches are
//! acked and never come back.

mod layout;

use std::time::Duration;

use fred::{
    clients::Client,
    interfaces::{ClientLike, HashesInterface, KeysInterface, LuaInterface},
    prelude::{Builder, Config, ReconnectPolicy},
    types::{scripts::Script, Value},
};
use layout::{bit_is_set, chunk, offset, Layout, BLOCK_BITS, CHUNK_BITS};

/// The field under which a push batch's running totals are kept: its `bucket:part`. The
/// push sender confirms under it and the batch recorder forgets it, so both name it here.
pub fn batch_field(bucket: i64, part: i32) -> String {
    format!("{bucket}:{part}")
}

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
    /// Its block is leased by another worker that is sending now: come back later.
    Busy,
}

/// A Redis operation failed.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct MarkerError(#[from] fred::error::Error);

impl MarkerError {
    fn other(message: String) -> Self {
        Self(fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            message,
        ))
    }
}

/// Ids per lease block (see the module doc).
pub const BLOCK_IDS: i64 = 1 << BLOCK_BITS;

/// The lease block of a user: batches that keep blocks whole never contend for a lease.
pub fn block_of(user: i64) -> i64 {
    user >> BLOCK_BITS
}

// Shared by the scripts below. `spans` unpacks the spans a call touches (format in
// layout.rs); `read` returns a span's bitmap bytes, zero-padded where the bitmap is shorter;
// `fields` lists the hash fields (block numbers) of a span's leased blocks; `chunked` runs
// one command over many arguments in slices (Lua's unpack is bounded); `drop_own` deletes
// the leases among `fields` that `token` holds.
const HELPERS: &str = r#"
local function spans(packed, count)
  local out, pos = {}, 1
  for i = 1, count do
    local r1, r2, n1, n2, has, len = string.byte(packed, pos, pos + 5)
    local n = n1 + 256 * n2
    local s = {range = r1 + 256 * r2, n = n, has = has == 1}
    s.first = tonumber(string.sub(packed, pos + 6, pos + 5 + len))
    pos = pos + 6 + len
    s.flags = string.sub(packed, pos, pos + n - 1)
    s.bits = string.sub(packed, pos + n, pos + 5 * n - 1)
    pos = pos + 5 * n
    out[i] = s
  end
  return out
end
local function read(bitmap, s)
  local size = 4 * s.n
  local b = redis.call('GETRANGE', bitmap, s.first * 4, s.first * 4 + size - 1)
  if #b < size then b = b .. string.rep('\0', size - #b) end
  return b
end
local function fields(s, out)
  for j = 1, s.n do
    if string.byte(s.flags, j) == 49 then out[#out + 1] = tostring(s.first + j - 1) end
  end
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
local function drop_own(claims, token, list)
  if #list == 0 then return end
  local cur = chunked('HMGET', claims, list, 1000)
  local mine = {}
  for j = 1, #list do
    local c = cur[j]
    if c and string.sub(c, 1, string.find(c, '|', 1, true) - 1) == token then
      mine[#mine + 1] = list[j]
    end
  end
  chunked('HDEL', claims, mine, 1000)
end
local function each_range(list, f)
  local i = 1
  while i <= #list do
    local j = i
    while j + 1 <= #list and list[j + 1].range == list[i].range do j = j + 1 end
    f(list[i].range, i, j)
    i = j + 1
  end
end
"#;

// KEYS: per id range, its claims hash then its bitmap. ARGV: token, ttl ms, span count,
// marker ttl s, the spans packed (the users' own bits set in them). Per span, one GETRANGE
// reads the bits; a block whose users are all done is not leased; per range, one HMGET reads
// the other blocks' leases and one HSET takes the free ones (free: none, ours, or past its
// deadline). Returns one character per flagged block in packed order ('0' all done, '1' ours
// now, '2' held by another), then the spans' bytes end to end; the caller reads each user's
// bit from those.
const CLAIM: &str = r#"
local token, ttl, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = token .. '|' .. (now + ttl)
local list = spans(ARGV[5], count)
local status, bytes = {}, {}
each_range(list, function(k, i, j)
  local claims, bitmap, want, slot = KEYS[2 * k - 1], KEYS[2 * k], {}, {}
  for x = i, j do
    local s = list[x]
    local b = read(bitmap, s)
    bytes[#bytes + 1] = b
    for q = 1, s.n do
      if string.byte(s.flags, q) == 49 then
        local open = false
        for y = 4 * q - 3, 4 * q do
          local m = string.byte(s.bits, y)
          if m ~= 0 and bit.band(string.byte(b, y), m) ~= m then open = true end
        end
        status[#status + 1] = '0'
        if open then
          want[#want + 1] = tostring(s.first + q - 1)
          slot[#slot + 1] = #status
        end
      end
    end
  end
  local cur = chunked('HMGET', claims, want, 1000)
  local take = {}
  for f = 1, #want do
    local c, free = cur[f], true
    if c then
      local sep = string.find(c, '|', 1, true)
      free = string.sub(c, 1, sep - 1) == token or tonumber(string.sub(c, sep + 1)) <= now
    end
    if free then
      status[slot[f]] = '1'
      take[#take + 1] = want[f]
      take[#take + 1] = mine
    else
      status[slot[f]] = '2'
    end
  end
  if #take > 0 then
    chunked('HSET', claims, take, 2000)
    redis.call('EXPIRE', claims, ARGV[4])
  end
end)
return table.concat(status) .. table.concat(bytes)
"#;

// KEYS: per id range, its claims hash then its bitmap; last, the progress hash.
// ARGV: span count, progress field, marker ttl s, the spans packed, the progress field of
// the other kind, and a token ('' for none). Per span with bits, one GETRANGE, the bits
// ORed in, one SETRANGE and two BITCOUNTs to count the users newly settled; then the
// token's leases on the flagged blocks are dropped (a lease held by anyone else stays: that
// holder may be sending now). Returns both running totals, this kind's first, so a batch
// with no failures needs no second call to learn its failed total.
const CONFIRM: &str = r#"
local count, token = tonumber(ARGV[1]), ARGV[6]
local list = spans(ARGV[4], count)
local added = 0
each_range(list, function(k, i, j)
  local claims, bitmap, release = KEYS[2 * k - 1], KEYS[2 * k], {}
  for x = i, j do
    local s = list[x]
    if s.has then
      local old = read(bitmap, s)
      local v, mask, changed = {string.byte(old, 1, -1)}, {string.byte(s.bits, 1, -1)}, false
      for b = 1, #v do
        local m = mask[b]
        if m ~= 0 then
          local n = bit.bor(v[b], m)
          if n ~= v[b] then v[b] = n; changed = true end
        end
      end
      if changed then
        local from, to = s.first * 4, s.first * 4 + 4 * s.n - 1
        local before = redis.call('BITCOUNT', bitmap, from, to)
        redis.call('SETRANGE', bitmap, from, string.char(unpack(v)))
        added = added + redis.call('BITCOUNT', bitmap, from, to) - before
      end
    end
    if token ~= '' then fields(s, release) end
  end
  redis.call('EXPIRE', bitmap, ARGV[3])
  drop_own(claims, token, release)
end)
local total = redis.call('HINCRBY', KEYS[#KEYS], ARGV[2], added)
local other = tonumber(redis.call('HGET', KEYS[#KEYS], ARGV[5])) or 0
redis.call('EXPIRE', KEYS[#KEYS], ARGV[3])
return {total, other}
"#;

// KEYS: per id range, its claims hash. ARGV: token, span count, then the spans packed.
const RELEASE: &str = r#"
local token = ARGV[1]
local list = spans(ARGV[3], tonumber(ARGV[2]))
each_range(list, function(k, i, j)
  local release = {}
  for x = i, j do fields(list[x], release) end
  drop_own(KEYS[k], token, release)
end)
return 0
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

/// The leases a confirmation drops once it has set its bits: `token`'s, on the blocks of
/// `users`.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    /// The delivery's token.
    pub token: &'a str,
    /// The users whose blocks to release (all of the batch's: blocks of done users are
    /// leased too).
    pub users: &'a [i64],
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

    fn bitmap_key(&self, campaign: CampaignRef, chunk: i64) -> String {
        format!("{}:c:{campaign}:done:{chunk}", self.prefix)
    }

    fn progress_key(&self, campaign: CampaignRef) -> String {
        format!("{}:c:{campaign}:progress", self.prefix)
    }

    fn range_keys(&self, campaign: CampaignRef, chunks: &[i64], with_bitmaps: bool) -> Vec<String> {
        let mut keys = Vec::with_capacity(chunks.len() * 2 + 1);
        for c in chunks {
            keys.push(self.claims_key(campaign, *c));
            if with_bitmaps {
                keys.push(self.bitmap_key(campaign, *c));
            }
        }
        keys
    }

    /// Claims `users` for the holder of `token`, leasing their blocks; one state per user, in
    /// order. A user whose block another token holds is `Busy`, even when that holder's batch
    /// does not list it. A block whose listed users are all done is not leased.
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
        let layout = Layout::new(users, users).map_err(MarkerError::other)?;
        let keys = self.range_keys(campaign, &layout.chunks, true);
        let args: Vec<Value> = vec![
            token.into(),
            self.claim_ttl.as_millis().max(1).to_string().into(),
            layout.spans().to_string().into(),
            self.marker_ttl.as_secs().max(1).to_string().into(),
            Value::Bytes(layout.packed().into()),
        ];
        let reply: Value = self
            .claim
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        let reply = reply.as_bytes().unwrap_or_default();
        if reply.len() != layout.leases + layout.span_bytes() {
            return Err(MarkerError::other(format!(
                "claim answered {} bytes for {} leases and {} bitmap bytes",
                reply.len(),
                layout.leases,
                layout.span_bytes()
            )));
        }
        let (status, bits) = reply.split_at(layout.leases);
        Ok(layout
            .lookups
            .iter()
            .map(|(lease, bit)| {
                if bit_is_set(bits, *bit) {
                    ClaimState::Done
                } else if status[*lease] == b'1' {
                    ClaimState::Claimed
                } else {
                    ClaimState::Busy
                }
            })
            .collect())
    }

    /// Confirms `users` as settled by this batch; returns the batch's running total for
    /// `kind` across all its deliveries. Leases stay as they are.
    pub async fn confirm(
        &self,
        campaign: impl Into<CampaignRef>,
        batch_field: &str,
        kind: Settled,
        users: &[i64],
    ) -> Result<i64, MarkerError> {
        let totals = self
            .confirm_totals(campaign, batch_field, kind, users, None)
            .await?;
        Ok(match kind {
            Settled::Sent => totals.sent,
            Settled::Failed => totals.failed,
        })
    }

    /// As [`Markers::confirm`], returning the batch's running totals of both kinds; with
    /// `release`, then drops its token's leases on the blocks of its users, in the same call
    /// (the last step of a batch needs no separate release).
    pub async fn confirm_totals(
        &self,
        campaign: impl Into<CampaignRef>,
        batch_field: &str,
        kind: Settled,
        users: &[i64],
        release: Option<Release<'_>>,
    ) -> Result<Totals, MarkerError> {
        let campaign: CampaignRef = campaign.into();
        let (token, leased) = release.map_or(("", &[][..]), |r| (r.token, r.users));
        let layout = Layout::new(users, leased).map_err(MarkerError::other)?;
        let mut keys = self.range_keys(campaign, &layout.chunks, true);
        keys.push(self.progress_key(campaign));
        let (field, other) = match kind {
            Settled::Sent => (format!("{batch_field}:s"), format!("{batch_field}:f")),
            Settled::Failed => (format!("{batch_field}:f"), format!("{batch_field}:s")),
        };
        let args: Vec<Value> = vec![
            layout.spans().to_string().into(),
            field.into(),
            self.marker_ttl.as_secs().max(1).to_string().into(),
            Value::Bytes(layout.packed().into()),
            other.into(),
            token.into(),
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

    /// Drops `token`'s leases on the blocks of `users` (after a failed attempt, or when a
    /// batch is done), so another delivery can claim them.
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
        let layout = Layout::new(&[], users).map_err(MarkerError::other)?;
        let keys = self.range_keys(campaign, &layout.chunks, false);
        let args: Vec<Value> = vec![
            token.into(),
            layout.spans().to_string().into(),
            Value::Bytes(layout.packed().into()),
        ];
        let _: i64 = self
            .release
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(())
    }

    /// Drops finished batches' running totals (`field` is a batch's `bucket:part`): once the
    /// batches are recorded in the database the totals are never read again, and keeping
    /// them would grow Redis with the campaign. One `HDEL` per campaign in the list.
    pub async fn forget_batches(
        &self,
        batches: &[(CampaignRef, String)],
    ) -> Result<(), MarkerError> {
        let mut by_campaign: Vec<(CampaignRef, Vec<String>)> = Vec::new();
        for (campaign, field) in batches {
            let fields = match by_campaign.iter_mut().find(|(c, _)| c == campaign) {
                Some((_, fields)) => fields,
                None => {
                    by_campaign.push((*campaign, Vec::new()));
                    &mut by_campaign.last_mut().expect("just pushed").1
                }
            };
            fields.push(format!("{field}:s"));
            fields.push(format!("{field}:f"));
        }
        let dels = by_campaign.into_iter().map(|(campaign, fields)| {
            let key = self.progress_key(campaign);
            async move { self.client.hdel::<i64, _, _>(key, fields).await }
        });
        for done in futures::future::join_all(dels).await {
            done?;
        }
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
                vec![self.bitmap_key(campaign, chunk(user))],
                vec![offset(user).to_string()],
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
        for c in 0..=(max_user_id.max(0) >> CHUNK_BITS) {
            keys.push(self.bitmap_key(campaign, c));
            keys.push(self.claims_key(campaign, c));
        }
        let _: i64 = self.client.del(keys).await?;
        Ok(())
    }
}

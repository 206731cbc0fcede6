//! Messages on herald's JetStream streams, one type per stage.

use serde::{Deserialize, Serialize};

use crate::SCHEMA_VERSION;

/// The channel a push goes out on; it picks the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InformType {
    /// Text message to the user's mobile number.
    Sms,
    /// Email to the user's address.
    Email,
    /// Mobile app push notification.
    App,
    /// In-app inbox message.
    Inbox,
}

impl InformType {
    /// All inform types, in a fixed order.
    pub const ALL: [InformType; 4] = [Self::Sms, Self::Email, Self::App, Self::Inbox];

    /// The lowercase name used in JSON, config and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sms => "sms",
            Self::Email => "email",
            Self::App => "app",
            Self::Inbox => "inbox",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for InformType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Published on the campaigns stream once a campaign row exists: starts the fan-out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignCreated {
    /// Schema version.
    pub v: u16,
    /// The campaign's creation time in ms: tells this campaign apart from an older one
    /// with the same id (a restored or recreated database).
    #[serde(default)]
    pub epoch: i64,
    /// The campaign's database id.
    pub campaign_id: i64,
    /// Campaigns announced by the same message after the first: one stream message for the
    /// creates that finish together instead of one each. A reader that predates the field
    /// takes only the first; the others then stay pending until their supervisors announce
    /// them again, one by one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<CampaignRef>,
}

/// A campaign named in a [`CampaignCreated`] beside its first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRef {
    /// The campaign's database id.
    pub campaign_id: i64,
    /// Its creation time in ms (see [`CampaignCreated::epoch`]).
    pub epoch: i64,
}

impl CampaignCreated {
    /// A message of the current schema version.
    pub fn new(campaign_id: i64) -> Self {
        Self {
            v: SCHEMA_VERSION,
            epoch: 0,
            campaign_id,
            more: Vec::new(),
        }
    }

    /// Sets the campaign epoch.
    pub fn with_epoch(mut self, epoch: i64) -> Self {
        self.epoch = epoch;
        self
    }

    /// One message announcing `campaigns` (at least one), the first in the plain fields.
    pub fn all(campaigns: &[CampaignRef]) -> Option<Self> {
        let (first, more) = campaigns.split_first()?;
        Some(Self {
            more: more.to_vec(),
            ..Self::new(first.campaign_id).with_epoch(first.epoch)
        })
    }

    /// Every campaign the message announces, the first first.
    pub fn campaigns(&self) -> impl Iterator<Item = CampaignRef> + '_ {
        let first = CampaignRef {
            campaign_id: self.campaign_id,
            epoch: self.epoch,
        };
        std::iter::once(first).chain(self.more.iter().copied())
    }
}

/// One shard of a campaign's audience: user ids in `[start_id, end_id)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketTask {
    /// Schema version.
    pub v: u16,
    /// The campaign's creation time in ms: tells this campaign apart from an older one
    /// with the same id (a restored or recreated database).
    #[serde(default)]
    pub epoch: i64,
    /// The campaign.
    pub campaign_id: i64,
    /// Bucket number, 0-based; with the campaign id it names the bucket.
    pub bucket: i64,
    /// First user id of the bucket (inclusive).
    pub start_id: i64,
    /// End of the bucket (exclusive).
    pub end_id: i64,
}

impl BucketTask {
    /// A bucket task of the current schema version.
    pub fn new(campaign_id: i64, bucket: i64, start_id: i64, end_id: i64) -> Self {
        Self {
            v: SCHEMA_VERSION,
            epoch: 0,
            campaign_id,
            bucket,
            start_id,
            end_id,
        }
    }

    /// Sets the campaign epoch.
    pub fn with_epoch(mut self, epoch: i64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The deterministic `Nats-Msg-Id` (campaign.epoch:bucket), so a re-publish after a
    /// crash is deduplicated.
    pub fn msg_id(&self) -> String {
        format!("{}.{}:{}", self.campaign_id, self.epoch, self.bucket)
    }
}

/// Up to a hundred recipients of one campaign, the push stage's unit of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushBatch {
    /// Schema version.
    pub v: u16,
    /// The campaign's creation time in ms: tells this campaign apart from an older one
    /// with the same id (a restored or recreated database).
    #[serde(default)]
    pub epoch: i64,
    /// The campaign.
    pub campaign_id: i64,
    /// The bucket this batch was expanded from.
    pub bucket: i64,
    /// Part number within the bucket, 0-based.
    pub part: i32,
    /// User ids, ascending.
    pub user_ids: Vec<i64>,
}

impl PushBatch {
    /// A push batch of the current schema version.
    pub fn new(campaign_id: i64, bucket: i64, part: i32, user_ids: Vec<i64>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            epoch: 0,
            campaign_id,
            bucket,
            part,
            user_ids,
        }
    }

    /// Sets the campaign epoch.
    pub fn with_epoch(mut self, epoch: i64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The deterministic `Nats-Msg-Id` (campaign.epoch:bucket:part).
    pub fn msg_id(&self) -> String {
        format!(
            "{}.{}:{}:{}",
            self.campaign_id, self.epoch, self.bucket, self.part
        )
    }
}

/// A message that could not be processed, kept on the dead-letter stream with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Schema version.
    pub v: u16,
    /// Stream the message came from.
    pub stream: String,
    /// Consumer that gave up on it.
    pub consumer: String,
    /// Its original subject.
    pub subject: String,
    /// Its sequence number in the original stream.
    pub stream_sequence: u64,
    /// How many times it was delivered.
    pub delivered: i64,
    /// Why it was given up.
    pub reason: String,
    /// The original payload, unchanged.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
}

/// Serialises `Vec<u8>` as MessagePack bin rather than an array of integers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn push_batch_round_trips_with_named_fields() {
        let b = PushBatch::new(42, 3, 1, vec![3001, 3002]);
        let bytes = encode(&b).unwrap();
        let back: PushBatch = decode(&bytes).unwrap();
        assert_eq!(back, b.clone());
        assert_eq!(b.msg_id(), "42.0:3:1");
        assert_eq!(b.with_epoch(7).msg_id(), "42.7:3:1");
    }

    #[test]
    fn newer_fields_are_ignored_by_older_readers() {
        #[derive(Serialize)]
        struct Newer {
            v: u16,
            campaign_id: i64,
            extra: String,
        }
        let bytes = encode(&Newer {
            v: 2,
            campaign_id: 7,
            extra: "x".into(),
        })
        .unwrap();
        let back: CampaignCreated = decode(&bytes).unwrap();
        assert_eq!(back.campaign_id, 7);
    }

    #[test]
    fn one_message_announces_several_campaigns_and_older_readers_take_the_first() {
        let refs = [(7, 70), (8, 80), (9, 90)]
            .map(|(campaign_id, epoch)| CampaignRef { campaign_id, epoch });
        let created = CampaignCreated::all(&refs).unwrap();
        let back: CampaignCreated = decode(&encode(&created).unwrap()).unwrap();
        assert_eq!(back.campaigns().collect::<Vec<_>>(), refs);
        assert!(CampaignCreated::all(&[]).is_none());

        // What a node built before `more` reads of it: the first campaign alone.
        let older: Before = decode(&encode(&created).unwrap()).unwrap();
        assert_eq!((older.campaign_id, older.epoch), (7, 70));

        // A message of one campaign is written as before, without the field.
        let one = CampaignCreated::new(7).with_epoch(70);
        let before = Before {
            v: SCHEMA_VERSION,
            epoch: 70,
            campaign_id: 7,
        };
        assert_eq!(encode(&one).unwrap(), encode(&before).unwrap());
    }

    /// `CampaignCreated` as it was before `more`.
    #[derive(Serialize, Deserialize)]
    struct Before {
        v: u16,
        epoch: i64,
        campaign_id: i64,
    }

    #[test]
    fn dead_letter_payload_is_binary() {
        let d = DeadLetter {
            v: 1,
            stream: "S".into(),
            consumer: "c".into(),
            subject: "s".into(),
            stream_sequence: 1,
            delivered: 5,
            reason: "bad".into(),
            payload: vec![0xc1, 0xff],
        };
        let back: DeadLetter = decode(&encode(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}

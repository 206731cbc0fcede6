//! How a call's users are laid out for the marker scripts: grouped by id range, then into
//! spans of consecutive lease blocks, each with the bits to set and the blocks to lease.
//!
//! Packed format, per span: its range index from 1 (u16 little endian), its length in
//! blocks `n` (u16 little endian), a byte telling whether it carries bits to set, its first
//! block (a length byte, then decimal digits), then `n` flag bytes ('1': lease this block)
//! and `n * BLOCK_BYTES` bytes of bits to OR into the bitmap. Spans come sorted by range and
//! block, so a script meets each range's spans together and in order.

/// Bits per bitmap key (ids per id range).
pub(super) const CHUNK_BITS: u32 = 20;
/// Ids per lease block: 2^5 = 32 ids, 4 bytes of bitmap.
pub(super) const BLOCK_BITS: u32 = 5;
/// Bitmap bytes per lease block.
pub(super) const BLOCK_BYTES: usize = 1 << (BLOCK_BITS - 3);
/// A gap of this many blocks without users starts a new span rather than being read.
const MAX_GAP_BLOCKS: i64 = 8;
/// Longest span, in blocks (1 KB of bitmap).
const MAX_SPAN_BLOCKS: usize = 256;

/// A run of consecutive lease blocks in one id range.
struct Span {
    /// Index of its id range in `Layout::chunks`, from 1.
    range: u16,
    /// First block, counted within the id range.
    first: i64,
    /// Per block: b'1' to lease it, b'0' otherwise.
    flags: Vec<u8>,
    /// Per block: the ordinal of its lease among all leased blocks of the call.
    ordinals: Vec<u32>,
    /// The bits to set, `BLOCK_BYTES` per block, most significant bit first as Redis counts.
    bits: Vec<u8>,
    has_bits: bool,
}

/// A call's users laid out for a script.
pub(super) struct Layout {
    /// The id ranges (user id >> CHUNK_BITS) the call touches, in order.
    pub chunks: Vec<i64>,
    spans: Vec<Span>,
    /// Leased blocks in all.
    pub leases: usize,
    /// Per leased user, in the caller's order: its block's lease ordinal and its bit's index
    /// in the spans' bytes laid end to end.
    pub lookups: Vec<(usize, usize)>,
}

/// The id range of a user.
pub(super) fn chunk(user: i64) -> i64 {
    user >> CHUNK_BITS
}

/// A user's bit offset within its id range.
pub(super) fn offset(user: i64) -> i64 {
    user & ((1 << CHUNK_BITS) - 1)
}

impl Layout {
    /// Lays out `set` (users whose bits to set) and `lease` (users whose blocks to lease).
    /// Fails only when the users touch more id ranges than the format can name.
    pub fn new(set: &[i64], lease: &[i64]) -> Result<Self, String> {
        // (user, index into `lease`, or usize::MAX for a bit to set), in user order: merged
        // when both lists come sorted (the push sender's do), sorted otherwise.
        let mut items: Vec<(i64, usize)> = Vec::with_capacity(set.len() + lease.len());
        let (mut a, mut b) = (set.iter().peekable(), lease.iter().enumerate().peekable());
        loop {
            let take_set = match (a.peek(), b.peek()) {
                (Some(x), Some((_, y))) => *x <= *y,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_set {
                items.push((*a.next().expect("peeked"), usize::MAX));
            } else {
                let (i, u) = b.next().expect("peeked");
                items.push((*u, i));
            }
        }
        if !items.is_sorted_by_key(|(u, _)| *u) {
            items.sort_unstable_by_key(|(u, _)| *u);
        }
        let mut layout = Layout {
            chunks: Vec::new(),
            spans: Vec::new(),
            leases: 0,
            lookups: vec![(0, 0); lease.len()],
        };
        let mut bytes_before = 0usize;
        for (user, idx) in items {
            let (chunk, off) = (chunk(user), offset(user));
            let block = off >> BLOCK_BITS;
            let fits = layout.spans.last().is_some_and(|s| {
                layout.chunks.last() == Some(&chunk)
                    && block < s.first + s.flags.len() as i64 + MAX_GAP_BLOCKS
                    && ((block - s.first) as usize) < MAX_SPAN_BLOCKS
            });
            if !fits {
                if let Some(s) = layout.spans.last() {
                    bytes_before += s.bits.len();
                }
                if layout.chunks.last() != Some(&chunk) {
                    layout.chunks.push(chunk);
                }
                let range = u16::try_from(layout.chunks.len())
                    .map_err(|_| format!("users span more than {} id ranges", u16::MAX))?;
                layout.spans.push(Span {
                    range,
                    first: block,
                    flags: Vec::new(),
                    ordinals: Vec::new(),
                    bits: Vec::new(),
                    has_bits: false,
                });
            }
            let s = layout.spans.last_mut().expect("a span was just ensured");
            let j = (block - s.first) as usize;
            while s.flags.len() <= j {
                s.flags.push(b'0');
                s.ordinals.push(0);
                s.bits.extend_from_slice(&[0; BLOCK_BYTES]);
            }
            let bit = j * BLOCK_BYTES * 8 + (off as usize & (BLOCK_BYTES * 8 - 1));
            if idx == usize::MAX {
                s.bits[bit / 8] |= 0x80 >> (bit % 8);
                s.has_bits = true;
            } else {
                if s.flags[j] == b'0' {
                    s.flags[j] = b'1';
                    s.ordinals[j] = layout.leases as u32;
                    layout.leases += 1;
                }
                layout.lookups[idx] = (s.ordinals[j] as usize, bytes_before * 8 + bit);
            }
        }
        Ok(layout)
    }

    /// Number of spans.
    pub fn spans(&self) -> usize {
        self.spans.len()
    }

    /// Bitmap bytes the spans cover, laid end to end.
    pub fn span_bytes(&self) -> usize {
        self.spans.iter().map(|s| s.bits.len()).sum()
    }

    /// The spans in the scripts' packed format (see the module doc).
    pub fn packed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.spans.len() * 12 + self.span_bytes() * 2);
        let mut digits = itoa::Buffer::new();
        for s in &self.spans {
            let first = digits.format(s.first);
            out.extend_from_slice(&s.range.to_le_bytes());
            out.extend_from_slice(&(s.flags.len() as u16).to_le_bytes());
            out.push(u8::from(s.has_bits));
            out.push(first.len() as u8);
            out.extend_from_slice(first.as_bytes());
            out.extend_from_slice(&s.flags);
            out.extend_from_slice(&s.bits);
        }
        out
    }
}

/// True when bit `index` (most significant first) of `bytes` is set.
pub(super) fn bit_is_set(bytes: &[u8], index: usize) -> bool {
    bytes
        .get(index / 8)
        .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_one_block_share_a_lease_and_gaps_split_spans() {
        // 0 and 31 share block 0; 32 is block 1; 1000 is far enough to start a new span.
        let users = [31, 0, 32, 1000];
        let l = Layout::new(&[], &users).unwrap();
        assert_eq!(l.chunks, vec![0]);
        assert_eq!(l.spans(), 2);
        assert_eq!(l.leases, 3);
        assert_eq!(l.lookups[0].0, l.lookups[1].0, "same block, same lease");
        assert_ne!(l.lookups[1].0, l.lookups[2].0);
        // Bit indexes in the spans' bytes laid end to end: span 1 covers blocks 0..=1.
        assert_eq!(l.lookups[0].1, 31);
        assert_eq!(l.lookups[1].1, 0);
        assert_eq!(l.lookups[2].1, 32);
        assert_eq!(l.lookups[3].1, 64 + (1000 % 32));
    }

    #[test]
    fn bits_to_set_follow_redis_bit_order_across_ranges() {
        let last = (1 << CHUNK_BITS) - 1;
        let l = Layout::new(&[1, 9, last, last + 1], &[]).unwrap();
        assert_eq!(l.chunks, vec![0, 1]);
        assert_eq!(l.leases, 0);
        let packed = l.packed();
        // First span: range 1, one block, carries bits, first block "0", flag '0', bits.
        assert_eq!(&packed[..8], &[1, 0, 1, 0, 1, 1, b'0', b'0']);
        assert_eq!(&packed[8..12], &[0b0100_0000, 0b0100_0000, 0, 0]);
        assert!(bit_is_set(&packed[8..12], 1));
        assert!(bit_is_set(&packed[8..12], 9));
        assert!(!bit_is_set(&packed[8..12], 2));
    }

    #[test]
    fn unsorted_and_repeated_users_lay_out_as_sorted_ones() {
        let sorted = Layout::new(&[3, 40, 70], &[3, 5, 40, 99]).unwrap();
        let shuffled = Layout::new(&[70, 3, 40], &[99, 3, 40, 5]).unwrap();
        assert_eq!(sorted.packed(), shuffled.packed());
        assert_eq!(shuffled.lookups[0], sorted.lookups[3]);
        let twice = Layout::new(&[3, 3], &[3, 3]).unwrap();
        assert_eq!(twice.leases, 1);
        assert_eq!(twice.lookups[0], twice.lookups[1]);
    }

    #[test]
    fn a_long_run_of_blocks_is_cut_into_bounded_spans() {
        let users: Vec<i64> = (0..(MAX_SPAN_BLOCKS as i64 * 32 * 3)).step_by(7).collect();
        let l = Layout::new(&users, &users).unwrap();
        assert_eq!(l.spans(), 3);
        assert_eq!(l.span_bytes(), MAX_SPAN_BLOCKS * BLOCK_BYTES * 3);
        for (i, u) in users.iter().enumerate() {
            assert_eq!(l.lookups[i].1, *u as usize, "user {u}");
        }
    }
}

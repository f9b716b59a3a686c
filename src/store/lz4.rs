//! An LZ4 block compressor that keeps its hash table from call to call.
//!
//! `lz4_flex::block::compress_into` allocates and zeroes an 8-16 KiB hash
//! table on every call. orderly compresses one entity record (about 1 KB)
//! per event, so the table's allocation and zeroing counted about two
//! thirds as many instructions as the compression itself (callgrind,
//! BENCHMARKS.md). This compressor
//! keeps one table per thread and never clears it. A stale entry is harmless:
//! every candidate is checked against the current input (it must lie before
//! the current position, within the 64 KiB window, and its four bytes must
//! be equal) before it becomes a match, so a stale entry only costs a miss.
//!
//! The output is a standard LZ4 block (the format `lz4_flex` and liblz4
//! decompress): the last five bytes are literals, and the last match starts
//! at least 12 bytes before the end.

/// Shortest match the format encodes.
const MIN_MATCH: usize = 4;
/// The format's last bytes are always literals.
const LAST_LITERALS: usize = 5;
/// No match starts within this many bytes of the end.
const MF_LIMIT: usize = 12;
/// The largest distance back a match may reach.
const MAX_DISTANCE: usize = 65_535;
/// After every 2^SKIP_STRENGTH positions without a match, the search
/// steps one byte further. liblz4 uses 6; on orderly's records (bincode,
/// with the payload's text twice: state and log) 5 took 8% fewer
/// instructions for the same size, and 4 cost 1% in size.
const SKIP_STRENGTH: u32 = 5;
/// log2 of the table's entries.
const HASH_LOG: u32 = 12;

/// Positions of the last 4-byte sequences seen, by hash; kept between calls.
pub(crate) struct Table(Box<[u32; 1 << HASH_LOG]>);

impl Default for Table {
    fn default() -> Self {
        Table(Box::new([0; 1 << HASH_LOG]))
    }
}

fn read_u32(input: &[u8], at: usize) -> u32 {
    let bytes: [u8; 4] = input[at..at + 4].try_into().expect("four bytes");
    u32::from_le_bytes(bytes)
}

fn read_u64(input: &[u8], at: usize) -> u64 {
    let bytes: [u8; 8] = input[at..at + 8].try_into().expect("eight bytes");
    u64::from_le_bytes(bytes)
}

/// Where a match found at `pos`, `distance` back, ends: compared eight
/// bytes at a time, never past `limit`.
fn match_end(input: &[u8], pos: usize, distance: usize, limit: usize) -> usize {
    let mut end = pos + MIN_MATCH;
    while end + 8 <= limit {
        let differ = read_u64(input, end) ^ read_u64(input, end - distance);
        if differ != 0 {
            return end + (differ.trailing_zeros() / 8) as usize;
        }
        end += 8;
    }
    while end < limit && input[end] == input[end - distance] {
        end += 1;
    }
    end
}

fn hash(sequence: u32) -> usize {
    (sequence.wrapping_mul(2_654_435_761) >> (32 - HASH_LOG)) as usize
}

/// Writes a length's continuation bytes (the part over 15) at `o`; returns
/// the position after them.
fn write_length(dst: &mut [u8], mut o: usize, mut n: usize) -> usize {
    while n >= 255 {
        dst[o] = 255;
        o += 1;
        n -= 255;
    }
    dst[o] = n as u8;
    o + 1
}

/// Writes one sequence at `o`: the literals, then (unless it is the last) a
/// match of `match_len` bytes `distance` back. Returns the position after it.
#[inline(always)]
fn write_sequence(
    dst: &mut [u8],
    mut o: usize,
    literals: &[u8],
    matched: Option<(usize, usize)>,
) -> usize {
    let lit = literals.len();
    let ml = matched.map_or(0, |(_, len)| len - MIN_MATCH);
    dst[o] = ((lit.min(15) as u8) << 4) | ml.min(15) as u8;
    o += 1;
    if lit >= 15 {
        o = write_length(dst, o, lit - 15);
    }
    dst[o..o + lit].copy_from_slice(literals);
    o += lit;
    if let Some((distance, _)) = matched {
        dst[o..o + 2].copy_from_slice(&(distance as u16).to_le_bytes());
        o += 2;
        if ml >= 15 {
            o = write_length(dst, o, ml - 15);
        }
    }
    o
}

/// The most bytes the block of `len` input bytes can take (liblz4's
/// `LZ4_COMPRESSBOUND`): every byte a literal, plus the token and the
/// length bytes.
fn bound(len: usize) -> usize {
    len + len / 255 + 16
}

/// Appends the LZ4 block of `input` to `out`. Inputs over 4 GiB are not
/// supported (orderly's values are capped far below that).
pub(crate) fn compress(input: &[u8], table: &mut Table, out: &mut Vec<u8>) {
    let table = &mut *table.0;
    let len = input.len();
    // Written into a slice of the worst case's size, then cut to what was
    // written: no capacity check per byte.
    let base = out.len();
    out.resize(base + bound(len), 0);
    let dst = &mut out[base..];
    let mut o = 0;
    let mut anchor = 0;
    if len > MF_LIMIT {
        // The last position a match may start at, and the last byte it may cover.
        let match_limit = len - MF_LIMIT;
        let last_match_byte = len - LAST_LITERALS;
        let mut pos = 0;
        let mut misses = 0usize;
        while pos < match_limit {
            let sequence = read_u32(input, pos);
            let slot = &mut table[hash(sequence)];
            let candidate = *slot as usize;
            *slot = pos as u32;
            let found = candidate < pos
                && pos - candidate <= MAX_DISTANCE
                && read_u32(input, candidate) == sequence;
            if !found {
                // Step faster through input that does not compress.
                pos += 1 + (misses >> SKIP_STRENGTH);
                misses += 1;
                continue;
            }
            misses = 0;
            let (mut start, mut from) = (pos, candidate);
            while start > anchor && from > 0 && input[start - 1] == input[from - 1] {
                start -= 1;
                from -= 1;
            }
            let end = match_end(input, pos, pos - candidate, last_match_byte);
            o = write_sequence(
                dst,
                o,
                &input[anchor..start],
                Some((start - from, end - start)),
            );
            anchor = end;
            pos = end;
            if pos - 2 < match_limit {
                let p = pos - 2;
                table[hash(read_u32(input, p))] = p as u32;
            }
        }
    }
    o = write_sequence(dst, o, &input[anchor..], None);
    out.truncate(base + o);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn roundtrip(input: &[u8], table: &mut Table) -> usize {
        let mut out = Vec::new();
        compress(input, table, &mut out);
        let back = lz4_flex::block::decompress(&out, input.len()).expect("a valid block");
        assert_eq!(back, input, "{} bytes", input.len());
        assert_end_rules(&out, input.len());
        out.len()
    }

    /// Walks a block's sequences and checks the rules that `lz4_flex`'s
    /// decoder does not enforce but liblz4's may: no match starts within
    /// `MF_LIMIT` bytes of the end, and the last `LAST_LITERALS` bytes are
    /// literals.
    fn assert_end_rules(block: &[u8], len: usize) {
        let length = |at: &mut usize, nibble: usize| {
            let mut n = nibble;
            if nibble == 15 {
                loop {
                    let b = block[*at] as usize;
                    *at += 1;
                    n += b;
                    if b != 255 {
                        break;
                    }
                }
            }
            n
        };
        let (mut at, mut written) = (0, 0);
        loop {
            let token = block[at] as usize;
            at += 1;
            let literals = length(&mut at, token >> 4);
            at += literals;
            written += literals;
            if at == block.len() {
                assert!(
                    len <= MF_LIMIT || literals >= LAST_LITERALS,
                    "the block of {len} bytes ends with {literals} literals"
                );
                return;
            }
            at += 2;
            let matched = length(&mut at, token & 15) + MIN_MATCH;
            assert!(written + MF_LIMIT <= len, "a match starts at {written} of {len}");
            written += matched;
            assert!(written + LAST_LITERALS <= len, "a match ends at {written} of {len}");
        }
    }

    #[test]
    fn blocks_decompress_to_their_input_with_a_table_reused_across_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut table = Table::default();
        for round in 0..3_000 {
            let len = match round % 4 {
                0 => rng.random_range(0..20),
                1 => rng.random_range(0..300),
                2 => rng.random_range(0..5_000),
                _ => rng.random_range(60_000..140_000),
            };
            // An alphabet of 1 to 255 symbols, runs and copies of earlier
            // stretches: every length and distance the format encodes.
            let symbols = rng.random_range(1..=255u16);
            let mut input = Vec::with_capacity(len);
            while input.len() < len {
                match rng.random_range(0..3) {
                    0 if !input.is_empty() => {
                        let from = rng.random_range(0..input.len());
                        let n = rng.random_range(1..400).min(len - input.len());
                        for i in 0..n {
                            let b = input[from + i % (input.len() - from)];
                            input.push(b);
                        }
                    }
                    1 => {
                        let b = rng.random_range(0..symbols) as u8;
                        let n = rng.random_range(1..600).min(len - input.len());
                        input.extend(std::iter::repeat_n(b, n));
                    }
                    _ => input.push(rng.random_range(0..symbols) as u8),
                }
            }
            roundtrip(&input, &mut table);
        }
    }

    #[test]
    fn repeated_text_shrinks_as_much_as_lz4_flex_makes_it() {
        let text: Vec<u8> = (0..40)
            .flat_map(|i| format!("{{\"event_id\":\"e-{i}\",\"type\":\"lead.updated\",\"stage\":\"won\"}}").into_bytes())
            .collect();
        let ours = roundtrip(&text, &mut Table::default());
        let theirs = lz4_flex::block::compress(&text).len();
        assert!(ours <= theirs + theirs / 10, "ours {ours}, lz4_flex {theirs}");
        assert!(ours < text.len() / 2, "{ours} of {}", text.len());
    }
}

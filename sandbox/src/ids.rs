//! Identifier and secret minting for the emulators: time-ordered, KSUID-like IDs (a prefix and
//! 27 base62 characters) and ngrok-shaped bearer tokens.
//!
//! Not a KSUID implementation: the layout only has to sort by creation time, stay unique and look
//! like the real thing. The 160 bits are 48 bits of Unix milliseconds, a 32-bit process-wide
//! counter (so IDs minted in the same millisecond still sort in minting order) and 80 random bits.

use std::sync::Mutex;

use rand::Rng;

/// Base62 alphabet in ASCII order, so that fixed-width strings sort like the numbers they encode.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of the base62 part of an ID (as in ngrok's `ak_32ELEgPmoXjxGJ3MXfoPBbZKrfD`).
pub const ID_BODY_LEN: usize = 27;

/// Length of the secret part of a token (`<id body>_<secret>` is 49 characters in all).
pub const SECRET_LEN: usize = 21;

/// Last (milliseconds, counter) handed out, shared by every sandbox in the process so that IDs
/// stay strictly increasing even when a clock reads the same millisecond twice or steps back.
static LAST: Mutex<(u64, u32)> = Mutex::new((0, 0));

/// Mints `prefix` + 27 base62 characters. With `at_ms` (a backdated creation time, from a seed)
/// the ID sorts at that instant instead of now; the counter still keeps it unique.
pub fn mint(prefix: &str, at_ms: Option<u64>, rng: &mut impl Rng) -> String {
    let (ms, counter) = {
        let mut last = LAST.lock().expect("id generator mutex poisoned");
        let counter = last.1.wrapping_add(1);
        let ms = match at_ms {
            Some(ms) => ms,
            None => {
                // Never go below the last live instant: keeps IDs increasing across clock steps.
                let ms = now_ms().max(last.0);
                last.0 = ms;
                ms
            }
        };
        last.1 = counter;
        (ms, counter)
    };
    let mut bytes = [0u8; 20];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6..10].copy_from_slice(&counter.to_be_bytes());
    rng.fill(&mut bytes[10..]);
    let mut id = String::with_capacity(prefix.len() + ID_BODY_LEN);
    id.push_str(prefix);
    id.push_str(&base62_fixed(bytes));
    id
}

/// A bearer token for the object `id`: `<id without its prefix>_<21 random base62 characters>`.
pub fn token_for(id: &str, rng: &mut impl Rng) -> String {
    let body = id.split_once('_').map_or(id, |(_, body)| body);
    let mut token = String::with_capacity(body.len() + 1 + SECRET_LEN);
    token.push_str(body);
    token.push('_');
    for _ in 0..SECRET_LEN {
        token.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    token
}

/// True when `s` is `prefix` followed by exactly 27 base62 characters.
pub fn is_well_formed(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|body| {
        body.len() == ID_BODY_LEN && body.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

fn now_ms() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0)
}

/// Encodes 160 bits big-endian as exactly 27 base62 digits (62^27 > 2^160), zero-padded.
fn base62_fixed(mut n: [u8; 20]) -> String {
    let mut out = [b'0'; ID_BODY_LEN];
    for slot in out.iter_mut().rev() {
        // Long division of the big-endian number by 62; the remainder is the next digit.
        let mut rem: u32 = 0;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = u8::try_from(acc / 62).unwrap_or(u8::MAX);
            rem = acc % 62;
        }
        *slot = ALPHABET[rem as usize];
    }
    out.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_are_strictly_increasing_within_one_millisecond() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ids: Vec<String> = (0..10_000).map(|_| mint("ak_", None, &mut rng)).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
        assert!(ids.iter().all(|id| is_well_formed(id, "ak_")));
    }

    #[test]
    fn backdated_ids_sort_before_live_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let old = mint("bot_", Some(1_600_000_000_000), &mut rng);
        let new = mint("bot_", None, &mut rng);
        assert!(old < new);
    }

    #[test]
    fn token_is_49_characters_and_carries_the_id_body() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let id = mint("ak_", None, &mut rng);
        let token = token_for(&id, &mut rng);
        assert_eq!(token.len(), 49);
        assert!(token.starts_with(&format!("{}_", &id[3..])));
    }

    #[test]
    fn base62_is_fixed_width_and_order_preserving() {
        assert_eq!(base62_fixed([0; 20]), "0".repeat(27));
        assert_eq!(base62_fixed([0xff; 20]).len(), 27);
        let mut one = [0u8; 20];
        one[19] = 1;
        assert!(base62_fixed([0; 20]) < base62_fixed(one));
    }
}

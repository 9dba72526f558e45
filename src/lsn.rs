//! [`Lsn`]: a PostgreSQL WAL position (`pg_lsn`), its text form and its wire form.

use std::error::Error as StdError;
use std::fmt;
use std::str::FromStr;

use bytes::{BufMut, BytesMut};
use postgres_types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Size of a short WAL page header (`SizeOfXLogShortPHD` on 64-bit builds).
const SHORT_PAGE_HEADER: u64 = 24;
/// Size of the long WAL page header at the start of a segment (`SizeOfXLogLongPHD`).
const LONG_PAGE_HEADER: u64 = 40;

/// A position in the write-ahead log (PostgreSQL's `pg_lsn`).
///
/// Its text form is the server's, two hexadecimal halves `X/Y` (`16/B374D848`), and it
/// converts to and from `pg_lsn` columns, so `row.get::<_, Lsn>(0)` works on
/// `SELECT pg_current_wal_insert_lsn()` without casts. Order is WAL order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position (`0/0`), which no real WAL record has.
    pub const ZERO: Lsn = Lsn(0);

    /// The position as a plain byte offset.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Bytes of WAL from `earlier` to `self`; 0 when `earlier` is not earlier (saturating).
    ///
    /// Replica lag is `primary.bytes_since(replica)`, never the other way round.
    pub const fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Maps an insert position that sits just past a WAL page header down to the page
    /// boundary; every other position is returned unchanged.
    ///
    /// `pg_current_wal_insert_lsn()` on a primary whose WAL ends exactly on a page
    /// boundary points past the next page's header (24 bytes into a page, 40 at the
    /// start of a segment), while a standby's replay position stops at the boundary.
    /// A token taken there would never be reached on an idle primary. `block_size` and
    /// `segment_size` are the server's `wal_block_size` and `wal_segment_size` in bytes;
    /// values that are zero or not powers of two leave the position unchanged.
    pub fn normalize_page_boundary(self, block_size: u64, segment_size: u64) -> Lsn {
        if !block_size.is_power_of_two()
            || !segment_size.is_power_of_two()
            || segment_size < block_size
        {
            return self;
        }
        let in_segment = self.0 % segment_size;
        if in_segment == LONG_PAGE_HEADER {
            return Lsn(self.0 - LONG_PAGE_HEADER);
        }
        // A short header only starts pages after the first one of a segment.
        if in_segment >= block_size && self.0 % block_size == SHORT_PAGE_HEADER {
            return Lsn(self.0 - SHORT_PAGE_HEADER);
        }
        self
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(v: Lsn) -> Self {
        v.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// Why a text was not a WAL position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LsnParseError {
    /// The text was empty.
    #[error("empty LSN")]
    Empty,
    /// The text has no `/` or more than one.
    #[error("LSN must be two hexadecimal halves `X/Y`, got {found} separators")]
    Separators {
        /// How many `/` the text had.
        found: usize,
    },
    /// One half is empty, too long for 32 bits, or not hexadecimal.
    #[error("LSN {half} half is not a 32-bit hexadecimal number (1 to 8 hex digits)")]
    BadHalf {
        /// `"high"` or `"low"`.
        half: &'static str,
    },
}

fn parse_half(s: &str, half: &'static str) -> Result<u64, LsnParseError> {
    // from_str_radix accepts a leading '+'; the server's form never has one.
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(LsnParseError::BadHalf { half });
    }
    u64::from_str_radix(s, 16).map_err(|_| LsnParseError::BadHalf { half })
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(LsnParseError::Empty);
        }
        let found = s.bytes().filter(|&b| b == b'/').count();
        let Some((hi, lo)) = s.split_once('/').filter(|_| found == 1) else {
            return Err(LsnParseError::Separators { found });
        };
        let hi = parse_half(hi, "high")?;
        let lo = parse_half(lo, "low")?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl<'a> FromSql<'a> for Lsn {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("pg_lsn value has {} bytes, expected 8", raw.len()))?;
        Ok(Lsn(u64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::PG_LSN
    }
}

impl ToSql for Lsn {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.put_u64(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::PG_LSN
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOCK: u64 = 8192;
    const SEGMENT: u64 = 16 * 1024 * 1024;

    #[test]
    fn parses_server_text() {
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
        assert_eq!(
            "FFFFFFFF/FFFFFFFF".parse::<Lsn>(),
            Ok(Lsn(u64::MAX)),
            "the top of the range parses"
        );
        assert_eq!("0/abc".parse::<Lsn>(), Ok(Lsn(0xABC)), "lower case hex");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(5).to_string(), "0/5");
    }

    #[test]
    fn rejects_bad_text() {
        let cases: &[(&str, LsnParseError)] = &[
            ("", LsnParseError::Empty),
            ("1/", LsnParseError::BadHalf { half: "low" }),
            ("/1", LsnParseError::BadHalf { half: "high" }),
            ("G/0", LsnParseError::BadHalf { half: "high" }),
            ("1/2/3", LsnParseError::Separators { found: 2 }),
            ("12", LsnParseError::Separators { found: 0 }),
            ("100000000/0", LsnParseError::BadHalf { half: "high" }),
            ("0/100000000", LsnParseError::BadHalf { half: "low" }),
            (" 1/2", LsnParseError::BadHalf { half: "high" }),
            ("1/2 ", LsnParseError::BadHalf { half: "low" }),
            ("1 /2", LsnParseError::BadHalf { half: "high" }),
            ("+1/2", LsnParseError::BadHalf { half: "high" }),
            ("1/-2", LsnParseError::BadHalf { half: "low" }),
            ("é/1", LsnParseError::BadHalf { half: "high" }),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Lsn>().as_ref(), Err(want), "input {text:?}");
        }
    }

    #[test]
    fn distance_saturates() {
        assert_eq!(Lsn(100).bytes_since(Lsn(40)), 60);
        assert_eq!(Lsn(40).bytes_since(Lsn(100)), 0);
    }

    #[test]
    fn serde_uses_text_form() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct W {
            at: Lsn,
        }
        let text = toml::to_string(&W {
            at: Lsn(0x1_0000_0010),
        })
        .expect("serialize");
        assert_eq!(text.trim(), r#"at = "1/10""#);
        let back: W = toml::from_str(&text).expect("deserialize");
        assert_eq!(back.at, Lsn(0x1_0000_0010));
        assert!(toml::from_str::<W>(r#"at = "1/""#).is_err());
    }

    #[test]
    fn wire_form_round_trips() {
        let mut buf = BytesMut::new();
        Lsn(0x0102_0304_0506_0708)
            .to_sql(&Type::PG_LSN, &mut buf)
            .expect("to_sql");
        assert_eq!(&buf[..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let back = Lsn::from_sql(&Type::PG_LSN, &buf).expect("from_sql");
        assert_eq!(back, Lsn(0x0102_0304_0506_0708));
        assert!(Lsn::from_sql(&Type::PG_LSN, &[1, 2, 3]).is_err());
        assert!(<Lsn as FromSql>::accepts(&Type::PG_LSN));
        assert!(!<Lsn as FromSql>::accepts(&Type::INT8));
    }

    #[test]
    fn page_boundary_normalisation() {
        let seg = 3 * SEGMENT;
        // Just past a long header at a segment start: down to the segment start.
        assert_eq!(
            Lsn(seg + 40).normalize_page_boundary(BLOCK, SEGMENT),
            Lsn(seg)
        );
        // Just past a short header inside a segment: down to the page start.
        let page = seg + 5 * BLOCK;
        assert_eq!(
            Lsn(page + 24).normalize_page_boundary(BLOCK, SEGMENT),
            Lsn(page)
        );
        // The last page of a segment has a short header too.
        let last = seg + SEGMENT - BLOCK;
        assert_eq!(
            Lsn(last + 24).normalize_page_boundary(BLOCK, SEGMENT),
            Lsn(last)
        );
        // Offset 24 in the first page of a segment is inside the long header: untouched.
        assert_eq!(
            Lsn(seg + 24).normalize_page_boundary(BLOCK, SEGMENT),
            Lsn(seg + 24)
        );
        // Ordinary positions, and the boundaries themselves, are unchanged.
        for x in [
            seg,
            page,
            page + 23,
            page + 25,
            page + 40,
            seg + 41,
            seg + 39,
            0,
        ] {
            assert_eq!(Lsn(x).normalize_page_boundary(BLOCK, SEGMENT), Lsn(x));
        }
        // Other sizes are honoured.
        assert_eq!(
            Lsn(4096 + 24).normalize_page_boundary(4096, 1 << 20),
            Lsn(4096)
        );
        assert_eq!(
            Lsn((1 << 30) + 40).normalize_page_boundary(32768, 1 << 30),
            Lsn(1 << 30)
        );
        // Nonsense sizes leave the position alone instead of panicking.
        assert_eq!(Lsn(40).normalize_page_boundary(0, 0), Lsn(40));
        assert_eq!(Lsn(40).normalize_page_boundary(3000, SEGMENT), Lsn(40));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(x in any::<u64>()) {
            prop_assert_eq!(Lsn(x).to_string().parse::<Lsn>(), Ok(Lsn(x)));
        }

        #[test]
        fn order_is_numeric(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
            let (pa, pb): (Lsn, Lsn) = (Lsn(a).to_string().parse().unwrap(), Lsn(b).to_string().parse().unwrap());
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = s.parse::<Lsn>();
        }

        #[test]
        fn normalisation_moves_at_most_a_header_and_only_down(x in any::<u64>()) {
            let n = Lsn(x).normalize_page_boundary(BLOCK, SEGMENT);
            prop_assert!(n <= Lsn(x));
            prop_assert!(x - n.0 == 0 || x - n.0 == 24 || x - n.0 == 40);
            if n != Lsn(x) {
                prop_assert_eq!(n.0 % BLOCK, 0);
            }
        }
    }
}

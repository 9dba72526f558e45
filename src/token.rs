//! [`Token`]: the position of a committed write, to read it back from a replica.

use std::fmt;
use std::str::FromStr;

use crate::lsn::Lsn;

/// The position of a committed write: which cluster (system identifier), which
/// timeline, and which WAL position.
///
/// A read carrying a token is served only by a server that has *replayed* that
/// position. Its text form is safe in cookies and headers:
/// `v2.<system id, 16 hex digits>.<timeline, hex>.<LSN X/YYYYYYYY>`, e.g.
/// `v2.6f1c2d3e4a5b6c7d.1.0/03000148`. The system id and the LSN's low half have fixed
/// widths, so a truncated token never parses as another (earlier) position; the LSN
/// part is what `pg_lsn` accepts. Parsing also accepts the `v1.` form of earlier
/// versions (the same fields, variable widths), so tokens already handed out (cookies
/// across an upgrade) keep working; every version reads the forms of the ones before.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    system_id: u64,
    timeline: u32,
    lsn: Lsn,
}

impl Token {
    /// A token for `lsn` on `timeline` of the cluster with `system_id`.
    pub const fn new(system_id: u64, timeline: u32, lsn: Lsn) -> Token {
        Token {
            system_id,
            timeline,
            lsn,
        }
    }

    /// The cluster's system identifier (`pg_control_system()`).
    pub const fn system_id(&self) -> u64 {
        self.system_id
    }

    /// The timeline the write was committed on.
    pub const fn timeline(&self) -> u32 {
        self.timeline
    }

    /// The WAL position a server must have replayed to show the write.
    pub const fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// The later of two tokens of the same cluster and timeline; otherwise the one on
    /// the higher timeline (a promotion only moves forward).
    pub fn max(self, other: Token) -> Token {
        if (other.timeline, other.lsn) > (self.timeline, self.lsn) {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lsn = self.lsn.as_u64();
        write!(
            f,
            "v2.{:016x}.{:x}.{:X}/{:08X}",
            self.system_id,
            self.timeline,
            lsn >> 32,
            lsn & 0xFFFF_FFFF
        )
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({self})")
    }
}

/// Why a token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The text is not a token; the reason says which part is wrong.
    #[error("malformed token: {reason}")]
    Malformed {
        /// Which part is wrong.
        reason: &'static str,
    },
    /// The token belongs to another cluster (another system identifier): not ours, ignored.
    #[error("token is from another cluster (system id {theirs:x}, ours {ours:x})")]
    ForeignSystem {
        /// The cluster the fleet serves.
        ours: u64,
        /// The cluster named by the token.
        theirs: u64,
    },
    /// The token names a timeline this cluster has never had.
    #[error("token names timeline {theirs}, beyond the cluster's current timeline {current}")]
    UnknownTimeline {
        /// The cluster's current timeline.
        current: u32,
        /// The timeline named by the token.
        theirs: u32,
    },
    /// The token names a position the primary has not reached: forged or from a lost history.
    #[error("token position {theirs} is ahead of the primary's {primary}")]
    AheadOfPrimary {
        /// The primary's position.
        primary: Lsn,
        /// The token's position.
        theirs: Lsn,
    },
}

fn malformed(reason: &'static str) -> TokenError {
    TokenError::Malformed { reason }
}

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 64 {
            return Err(malformed("too long"));
        }
        let mut parts = s.splitn(4, '.');
        // v2 (written now) has fixed-width fields; v1 (written by earlier versions, still
        // read) has variable-width ones.
        let fixed = match parts.next() {
            Some("v2") => true,
            Some("v1") => false,
            _ => return Err(malformed("unknown version (expected v2. or v1.)")),
        };
        // Hexadecimal of `min..=max` digits.
        let hex = |p: Option<&str>, min: usize, max: usize, reason: &'static str| {
            p.filter(|p| (min..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|p| u64::from_str_radix(p, 16).ok())
                .ok_or(malformed(reason))
        };
        let system_id = if fixed {
            hex(
                parts.next(),
                16,
                16,
                "system id is not 16 hexadecimal digits",
            )?
        } else {
            hex(parts.next(), 1, 16, "system id is not hexadecimal")?
        };
        let timeline = hex(
            parts.next(),
            1,
            8,
            "timeline is not a 32-bit hexadecimal number",
        )?;
        let timeline = u32::try_from(timeline).map_err(|_| malformed("timeline out of range"))?;
        if timeline == 0 {
            return Err(malformed("timeline 0 does not exist"));
        }
        let (hi, lo) = parts
            .next()
            .ok_or(malformed("missing LSN"))?
            .split_once('/')
            .ok_or(malformed("LSN is not X/Y hexadecimal"))?;
        let hi = hex(Some(hi), 1, 8, "LSN is not X/Y hexadecimal")?;
        let lo = if fixed {
            hex(Some(lo), 8, 8, "LSN is not X/YYYYYYYY hexadecimal")?
        } else {
            hex(Some(lo), 1, 8, "LSN is not X/Y hexadecimal")?
        };
        let lsn = Lsn((hi << 32) | lo);
        Ok(Token::new(system_id, timeline, lsn))
    }
}

impl serde::Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Token {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_form_is_stable() {
        let t = Token::new(0x6f1c_2d3e_4a5b_6c7d, 1, Lsn(0x3000148));
        assert_eq!(t.to_string(), "v2.6f1c2d3e4a5b6c7d.1.0/03000148");
        assert_eq!("v2.6f1c2d3e4a5b6c7d.1.0/03000148".parse::<Token>(), Ok(t));
        // The v1 form earlier versions wrote (variable widths) still reads the same.
        assert_eq!("v1.6f1c2d3e4a5b6c7d.1.0/3000148".parse::<Token>(), Ok(t));
        assert_eq!("v1.7.1.0/1".parse::<Token>(), Ok(Token::new(7, 1, Lsn(1))));
        let t = Token::new(7, 0x1a, Lsn(0x16_B374_D848));
        assert_eq!(t.to_string(), "v2.0000000000000007.1a.16/B374D848");
        assert_eq!(t.to_string().parse::<Token>(), Ok(t));
        // Lower-case hex is accepted too.
        assert_eq!("v2.0000000000000007.1A.16/b374d848".parse::<Token>(), Ok(t));
    }

    #[test]
    fn malformed_tokens_are_typed_errors() {
        for bad in [
            "",
            "v1",
            "v2.1.1.0/1",
            "v1..1.0/1",
            "v1.zz.1.0/1",
            "v1.1..0/1",
            "v1.1.0.0/1",
            "v1.1.100000000.0/1",
            "v1.1.1.",
            "v1.1.1.0/",
            "v1.1.1.0/1.5",
            "v1.11111111111111111.1.0/1",
            " v1.1.1.0/1",
            "v1.1.1.0/1 ",
            "v1.+1.1.0/1",
            // v2: unpadded system id or low LSN half (what a truncation would look like).
            "v2.6f1c2d3e4a5b6c7.1.0/03000148",
            "v2.6f1c2d3e4a5b6c7d.1.0/3000148",
            "v2.6f1c2d3e4a5b6c7d.1.0/0300014",
            "v2.6f1c2d3e4a5b6c7d.1.0/030001480",
            "v2.6f1c2d3e4a5b6c7d.1./03000148",
            "v2.6f1c2d3e4a5b6c7d.1.100000000/03000148",
            "v2.6f1c2d3e4a5b6c7d.1.0/+3000148",
        ] {
            assert!(
                matches!(bad.parse::<Token>(), Err(TokenError::Malformed { .. })),
                "{bad:?} should be malformed"
            );
        }
        let long = format!("v1.1.1.0/1{}", "0".repeat(100));
        assert!(long.parse::<Token>().is_err());
    }

    #[test]
    fn max_prefers_later_timeline_then_lsn() {
        let a = Token::new(1, 1, Lsn(100));
        let b = Token::new(1, 1, Lsn(200));
        let c = Token::new(1, 2, Lsn(50));
        assert_eq!(a.max(b), b);
        assert_eq!(b.max(a), b);
        assert_eq!(b.max(c), c);
    }

    proptest! {
        #[test]
        fn round_trips(sys in any::<u64>(), tl in 1u32.., lsn in any::<u64>()) {
            let t = Token::new(sys, tl, Lsn(lsn));
            prop_assert_eq!(t.to_string().parse::<Token>(), Ok(t));
        }

        #[test]
        fn no_prefix_of_a_token_parses(sys in any::<u64>(), tl in 1u32.., lsn in any::<u64>()) {
            let text = Token::new(sys, tl, Lsn(lsn)).to_string();
            for cut in 0..text.len() {
                prop_assert!(text[..cut].parse::<Token>().is_err(), "{}", &text[..cut]);
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = s.parse::<Token>();
        }

        #[test]
        fn parse_never_panics_near_valid(s in "v1\\.[0-9a-fA-F.+/ -]{0,40}") {
            let _ = s.parse::<Token>();
        }
    }
}

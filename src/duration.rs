//! Durations as users write them in the config file: an integer and one unit, `s`, `m`, `h` or
//! `d` (`0s`, `90m`, `30d`). A day is a fixed 24 hours: rotation intervals are elapsed time, not
//! calendar arithmetic, so a DST change never makes a key rotate an hour early or late.

use jiff::SignedDuration;

/// The longest duration keyward accepts: 100 years (36500d). Every duration meets a timestamp
/// somewhere (now + interval, created + rotate_every); this keeps all of them far inside what
/// the time arithmetic holds.
pub const MAX: SignedDuration = SignedDuration::from_secs(36_500 * 86_400);

/// Parses `30d`, `12h`, `90m`, `45s`, at most [`MAX`]. Anything else is an error message fit
/// for a diagnostic.
pub fn parse(text: &str) -> Result<SignedDuration, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "invalid duration `{text}`: expected an integer and a unit s, m, h or d (e.g. 30d, 12h, 90m, 45s)"
        )
    };
    let unit = t.chars().last().ok_or_else(bad)?;
    let digits = &t[..t.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let secs_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let too_long = || format!("duration `{text}` is too long: at most 36500d (100 years)");
    let secs = n.checked_mul(secs_per).ok_or_else(too_long)?;
    let d = SignedDuration::from_secs(secs);
    if d > MAX {
        return Err(too_long());
    }
    Ok(d)
}

/// Renders a duration the way users write them: the largest unit that divides it exactly.
pub fn format(d: SignedDuration) -> String {
    let s = d.as_secs();
    if s != 0 && s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s != 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s != 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Renders an age or distance approximately, for humans: `31d`, `5h`, `12m`, `40s`.
pub fn humanize(d: SignedDuration) -> String {
    let s = d.as_secs().abs();
    if s >= 86_400 {
        format!("{}d", s / 86_400)
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else if s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// `d` in its two largest units, for a time left that counts down: `1h 23m`, `1m 41s`, `41s`.
pub fn humanize_two(d: SignedDuration) -> String {
    let s = d.as_secs().abs();
    let (d_, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    if d_ > 0 {
        format!("{d_}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_units_for_a_countdown() {
        let f = |s| humanize_two(SignedDuration::from_secs(s));
        assert_eq!(f(41), "41s");
        assert_eq!(f(101), "1m 41s");
        assert_eq!(f(4980), "1h 23m");
        assert_eq!(f(90_000), "1d 1h");
    }

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("0s").unwrap().as_secs(), 0);
        assert_eq!(parse("45s").unwrap().as_secs(), 45);
        assert_eq!(parse("90m").unwrap().as_secs(), 5400);
        assert_eq!(parse("12h").unwrap().as_secs(), 43_200);
        assert_eq!(parse("30d").unwrap().as_secs(), 2_592_000);
        assert_eq!(parse("36500d").unwrap(), MAX);
        assert!(parse("2940000d").unwrap_err().contains("too long"));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "d",
            "30",
            "30w",
            "-5s",
            "1.5h",
            "30 d",
            "3d4h",
            "99999999999999999999d",
            "36501d",
            "2940000d",
            "9223372036854775807s",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["0s", "45s", "90m", "12h", "30d"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}

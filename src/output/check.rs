//! Validators no crate provides in the shape needed here: Luhn, IBAN mod 97,
//! Shannon entropy, placeholder shapes. All total: no input panics.

/// Luhn checksum over the ASCII digits of `s` (other bytes skipped).
pub(crate) fn luhn(s: &str) -> bool {
    let mut sum = 0u32;
    let mut double = false;
    let mut n = 0;
    for b in s.bytes().rev() {
        if !b.is_ascii_digit() {
            continue;
        }
        let mut d = u32::from(b - b'0');
        if double {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        double = !double;
        n += 1;
    }
    n > 0 && sum.is_multiple_of(10)
}

/// IBAN length by ISO country code (SWIFT IBAN registry), for the countries
/// whose IBANs are in use.
pub(crate) fn iban_len(country: &[u8]) -> Option<usize> {
    let len = match country {
        b"AD" => 24,
        b"AE" => 23,
        b"AL" => 28,
        b"AT" => 20,
        b"AZ" => 28,
        b"BA" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"BH" => 22,
        b"BR" => 29,
        b"BY" => 28,
        b"CH" => 21,
        b"CR" => 22,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"DO" => 28,
        b"EE" => 20,
        b"EG" => 29,
        b"ES" => 24,
        b"FI" => 18,
        b"FO" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GE" => 22,
        b"GI" => 23,
        b"GL" => 18,
        b"GR" => 27,
        b"GT" => 28,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IL" => 23,
        b"IQ" => 23,
        b"IS" => 26,
        b"IT" => 27,
        b"JO" => 30,
        b"KW" => 30,
        b"KZ" => 20,
        b"LB" => 28,
        b"LC" => 32,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MC" => 27,
        b"MD" => 24,
        b"ME" => 22,
        b"MK" => 19,
        b"MR" => 27,
        b"MT" => 31,
        b"MU" => 30,
        b"NL" => 18,
        b"NO" => 15,
        b"PK" => 24,
        b"PL" => 28,
        b"PS" => 29,
        b"PT" => 25,
        b"QA" => 29,
        b"RO" => 24,
        b"RS" => 22,
        b"SA" => 24,
        b"SC" => 31,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"ST" => 25,
        b"SV" => 28,
        b"TL" => 23,
        b"TN" => 24,
        b"TR" => 26,
        b"UA" => 29,
        b"VA" => 22,
        b"VG" => 24,
        b"XK" => 20,
        _ => return None,
    };
    Some(len)
}

/// ISO 13616 mod-97 check of a compact (no spaces) upper-case IBAN.
pub(crate) fn iban_mod97(compact: &[u8]) -> bool {
    if compact.len() < 5 {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem = 0u32;
    for &b in tail.iter().chain(head) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Shannon entropy in bits per byte.
pub(crate) fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    if n == 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Words that mark a documentation example, not a live secret.
const PLACEHOLDER_WORDS: &[&str] = &[
    "example",
    "your",
    "here",
    "placeholder",
    "dummy",
    "sample",
    "redacted",
    "changeme",
    "replace",
    "insert",
    "xxxx",
    "****",
    "....",
    "<",
    ">",
    "${",
    "{{",
];

/// Whether a token body is an obvious placeholder: a marker word
/// (`your-token-here`, `EXAMPLE`, `xxxx`, `<…>`, `${VAR}`), a run of one
/// character (`AKIAXXXXXXXXXXXXXXXX`), or a sequence such as
/// `0123456789abcdef`.
pub(crate) fn is_placeholder(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    if PLACEHOLDER_WORDS.iter().any(|w| lower.contains(w)) {
        return true;
    }
    let bytes = lower.as_bytes();
    // A run of 6 equal characters essentially never occurs in a random
    // token of this length but is how examples are written.
    let mut run = 1;
    for w in bytes.windows(2) {
        if w[0] == w[1] {
            run += 1;
            if run >= 6 {
                return true;
            }
        } else {
            run = 1;
        }
    }
    let mut ascending = 1;
    for w in bytes.windows(2) {
        if w[1] == w[0].wrapping_add(1) {
            ascending += 1;
            if ascending >= 8 {
                return true;
            }
        } else {
            ascending = 1;
        }
    }
    false
}

/// Character classes present: lower, upper, digit, other (printable).
pub(crate) fn classes(s: &str) -> u32 {
    let mut c = [false; 4];
    for b in s.bytes() {
        match b {
            b'a'..=b'z' => c[0] = true,
            b'A'..=b'Z' => c[1] = true,
            b'0'..=b'9' => c[2] = true,
            _ => c[3] = true,
        }
    }
    c.iter().filter(|&&x| x).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_valid_and_rejects_one_digit_off() {
        assert!(luhn("4111 1111 1111 1111"));
        assert!(luhn("378282246310005"));
        assert!(!luhn("4111 1111 1111 1112"));
        assert!(!luhn("378282246310006"));
        assert!(!luhn(""));
    }

    #[test]
    fn iban_mod97_known_values() {
        assert!(iban_mod97(b"DE89370400440532013000"));
        assert!(iban_mod97(b"GB82WEST12345698765432"));
        assert!(!iban_mod97(b"DE89370400440532013001"));
        assert!(!iban_mod97(b"GB82WEST1234569876543!"));
        assert!(!iban_mod97(b"DE8"));
        assert_eq!(iban_len(b"DE"), Some(22));
        assert_eq!(iban_len(b"ZZ"), None);
    }

    #[test]
    fn entropy_and_placeholders() {
        assert_eq!(entropy(""), 0.0);
        assert_eq!(entropy("aaaa"), 0.0);
        assert!((entropy("abcd") - 2.0).abs() < 1e-9);
        assert!(is_placeholder("your-token-here"));
        assert!(is_placeholder("XXXXXXXXXXXXXXXX"));
        assert!(is_placeholder("IOSFODNN7EXAMPLE"));
        assert!(is_placeholder("abcdefghijklmnop"));
        assert!(!is_placeholder("wJalrXUtnFEMIK7MDENGbPxRfiCY4q9s2LbQ"));
        assert_eq!(classes("aB3!"), 4);
        assert_eq!(classes("abc"), 1);
    }
}

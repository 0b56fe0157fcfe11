//! Kubernetes resource quantities (`512Mi`, `4G`, `1e9`, `1073741824`) turned into bytes.
//!
//! Owns only the string -> integer conversion used for MPS memory limits. Follows the
//! grammar of apimachinery's `resource.Quantity` (binary suffixes `Ki..Ei`, decimal
//! suffixes `n u m "" k M G T P E`, decimal exponents `e`/`E`), and, like
//! `Quantity.Value()`, rounds a fractional result up to the next whole byte. It does not
//! judge whether a value is sensible for a limit (that is `validate`'s job).

use thiserror::Error;

/// Why a quantity string is not a Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantityError {
    /// The string is empty or holds only a sign.
    #[error("empty quantity")]
    Empty,
    /// The numeric part is malformed (no digits, two decimal points, stray characters).
    #[error(
        "{0:?} is not a number followed by an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E, m, or an exponent like e9)"
    )]
    Malformed(String),
    /// The suffix is not one Kubernetes knows.
    #[error(
        "unknown suffix {suffix:?} in {input:?}; allowed: Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E, or an exponent like e9"
    )]
    UnknownSuffix {
        /// The whole input.
        input: String,
        /// The offending suffix.
        suffix: String,
    },
    /// The value does not fit in 64-bit signed bytes.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a Kubernetes quantity into a whole number of units (bytes for memory),
/// rounding a fractional value up (`100m` -> 1), as `resource.Quantity.Value()` does.
///
/// Negative quantities are returned negative; callers decide whether that is allowed.
/// Errors: [`QuantityError`] naming the allowed suffixes.
pub fn parse_quantity(input: &str) -> Result<i64, QuantityError> {
    let s = input.trim();
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        Some(_) => (false, s),
        None => return Err(QuantityError::Empty),
    };
    if body.is_empty() {
        return Err(QuantityError::Empty);
    }
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(num_end);
    let malformed = || QuantityError::Malformed(input.to_string());
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(malformed());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int_part}{frac_part}");
    let too_large = || QuantityError::TooLarge(input.to_string());
    // mantissa * 10^(-frac_len) * multiplier
    let mantissa: u128 = if digits.len() > 30 {
        return Err(too_large());
    } else {
        digits.parse().map_err(|_| malformed())?
    };
    let (base, exp): (u128, i32) = match suffix {
        "" => (10, 0),
        "n" => (10, -9),
        "u" => (10, -6),
        "m" => (10, -3),
        "k" => (10, 3),
        "M" => (10, 6),
        "G" => (10, 9),
        "T" => (10, 12),
        "P" => (10, 15),
        "E" => (10, 18),
        "Ki" => (2, 10),
        "Mi" => (2, 20),
        "Gi" => (2, 30),
        "Ti" => (2, 40),
        "Pi" => (2, 50),
        "Ei" => (2, 60),
        other => match other.strip_prefix(['e', 'E']) {
            Some(e) if !e.is_empty() => (10, e.parse().map_err(|_| malformed())?),
            _ => {
                return Err(QuantityError::UnknownSuffix {
                    input: input.to_string(),
                    suffix: other.to_string(),
                });
            }
        },
    };
    if exp.abs() > 60 {
        return Err(too_large());
    }
    // value = mantissa * base^exp / 10^frac_len, as an exact fraction num / den.
    let mut num = mantissa;
    let mut den: u128 = 10u128
        .checked_pow(u32::try_from(frac_part.len()).map_err(|_| too_large())?)
        .ok_or_else(too_large)?;
    let factor = base.checked_pow(exp.unsigned_abs()).ok_or_else(too_large)?;
    if exp >= 0 {
        num = num.checked_mul(factor).ok_or_else(too_large)?;
    } else {
        den = den.checked_mul(factor).ok_or_else(too_large)?;
    }
    let whole = num.div_ceil(den);
    let whole = i64::try_from(whole).map_err(|_| too_large())?;
    Ok(if negative { -whole } else { whole })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity("1Ki"), Ok(1024));
        assert_eq!(parse_quantity("512Mi"), Ok(512 << 20));
        assert_eq!(parse_quantity("2Gi"), Ok(2 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("4G"), Ok(4_000_000_000));
        assert_eq!(parse_quantity("10M"), Ok(10_000_000));
        assert_eq!(parse_quantity("3k"), Ok(3000));
        assert_eq!(parse_quantity("1073741824"), Ok(1 << 30));
        assert_eq!(parse_quantity("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("1E3"), Ok(1000));
        assert_eq!(parse_quantity("+7"), Ok(7));
    }

    #[test]
    fn fractions_round_up_and_sign_is_kept() {
        assert_eq!(parse_quantity("100m"), Ok(1));
        assert_eq!(parse_quantity("0.1"), Ok(1));
        assert_eq!(parse_quantity("0"), Ok(0));
        assert_eq!(parse_quantity("-1Gi"), Ok(-(1 << 30)));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_quantity(""), Err(QuantityError::Empty));
        assert_eq!(parse_quantity("-"), Err(QuantityError::Empty));
        assert!(matches!(
            parse_quantity("Gi"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity("1.2.3"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity("1GB"),
            Err(QuantityError::UnknownSuffix { suffix, .. }) if suffix == "GB"
        ));
        assert!(matches!(
            parse_quantity("1e"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_quantity("1ex"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity("100Ei"),
            Err(QuantityError::TooLarge(_))
        ));
    }
}

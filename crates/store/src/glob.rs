//! Shell-style wildcards for object keys: `*` matches within one path
//! segment, `**` across segments, `?` one character.

/// Whether `key` matches `pattern`.
pub fn matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[u8], k: &[u8]) -> bool {
        match p {
            [] => k.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=k.len()).any(|i| go(rest, &k[i..])),
            [b'*', rest @ ..] => (0..=k.len())
                .take_while(|&i| i == 0 || k[i - 1] != b'/')
                .any(|i| go(rest, &k[i..])),
            [b'?', rest @ ..] => !k.is_empty() && k[0] != b'/' && go(rest, &k[1..]),
            [c, rest @ ..] => k.first() == Some(c) && go(rest, &k[1..]),
        }
    }
    go(pattern.as_bytes(), key.as_bytes())
}

/// The literal part of a pattern before its first wildcard, cut back to a
/// whole path segment: the prefix to list.
pub fn literal_prefix(pattern: &str) -> &str {
    let first = pattern.find(['*', '?']).unwrap_or(pattern.len());
    match pattern[..first].rfind('/') {
        Some(slash) => &pattern[..slash],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("data/*.parquet", "data/part-1.parquet"));
        assert!(!matches("data/*.parquet", "data/sub/part-1.parquet"));
        assert!(matches("data/**.parquet", "data/sub/part-1.parquet"));
        assert!(matches("data/part-?.parquet", "data/part-7.parquet"));
        assert!(!matches("data/part-?.parquet", "data/part-17.parquet"));
        assert_eq!(literal_prefix("laion/2024/*/x*.parquet"), "laion/2024");
        assert_eq!(literal_prefix("*.parquet"), "");
    }
}

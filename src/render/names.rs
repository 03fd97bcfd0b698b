//! Kubernetes object names derived from pool and node names.

/// Longest object name we make: a DNS label, so it also fits label values.
pub const MAX_NAME_LEN: usize = 63;

/// 32-bit FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
fn fnv1a(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Joins `parts` with `-` into a DNS label: lower case, only `[a-z0-9-]`,
/// starting and ending with an alphanumeric. A name longer than 63 characters
/// is cut and ends in a hash of the full name, so distinct inputs stay distinct.
pub fn object_name(parts: &[&str]) -> String {
    let joined = parts.join("-");
    let mut name: String = joined
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.len() > MAX_NAME_LEN {
        let suffix = format!("{:08x}", fnv1a(&joined));
        name.truncate(MAX_NAME_LEN - suffix.len() - 1);
        name = format!("{}-{suffix}", name.trim_end_matches('-'));
    }
    if name.is_empty() {
        name = format!("x{:08x}", fnv1a(&joined));
    }
    name
}

/// A DNS-1123 label (namespace names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (node names).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        assert_eq!(
            object_name(&["hpp-pool", "my_Pool", "node1.example.com"]),
            "hpp-pool-my-pool-node1-example-com"
        );
        let long = "n".repeat(80);
        let a = object_name(&["hpp-pool", "p", &long]);
        let b = object_name(&["hpp-pool", "q", &long]);
        assert_eq!(a.len(), MAX_NAME_LEN);
        assert_ne!(a, b);
        assert!(is_dns_label(&a), "{a}");
        assert_eq!(a, object_name(&["hpp-pool", "p", &long]));
    }

    #[test]
    fn dns_checks() {
        assert!(is_dns_label("hostpath-provisioner"));
        assert!(!is_dns_label("Host"));
        assert!(!is_dns_label("-a"));
        assert!(is_dns_subdomain("node1.example.com"));
        assert!(!is_dns_subdomain("node1..com"));
        assert!(!is_dns_subdomain("node_1"));
    }
}

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

/// Upstream operator's `getResourceNameWithMaxLength` (util.go): `base-suffix`
/// when it fits in `max`; otherwise a cut name with an FNV-1a hash, keeping
/// every character (dots included) as upstream does.
pub fn upstream_name(base: &str, suffix: &str, max: usize) -> String {
    let name = format!("{base}-{suffix}");
    if name.len() <= max {
        return name;
    }
    match max.checked_sub(10 + suffix.len()) {
        // The suffix alone is too long: a prefix of base and the hash of all.
        None => {
            let prefix = &base[..base.len().min(max.saturating_sub(9))];
            let mut short = format!("{prefix}-{:08x}", fnv1a(&name));
            short.truncate(max);
            short
        }
        // Upstream hashes the base alone here (its comment says otherwise).
        Some(keep) => format!(
            "{}-{:08x}-{suffix}",
            &base[..keep.min(base.len())],
            fnv1a(base)
        ),
    }
}

/// The claim (and mounter Deployment) upstream's operator makes for `pool`
/// on `node`: `hpp-pool-<pool>-<node>`, or `hpp-pool-<hash>` when longer than 63.
pub fn upstream_pool_claim(pool: &str, node: &str) -> String {
    upstream_name("hpp-pool", &format!("{pool}-{node}"), MAX_NAME_LEN)
}

/// The one claim of a shared (ReadWriteMany) pool upstream makes.
pub fn upstream_shared_claim(pool: &str) -> String {
    upstream_name("hpp-pool", &format!("{pool}-shared"), MAX_NAME_LEN)
}

/// The value of upstream's `kubevirt.io.hostpath-provisioner/storagePool` label.
pub fn upstream_pool_label(pool: &str) -> String {
    upstream_name(pool, "hpp", MAX_NAME_LEN)
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
    fn upstream_names_follow_its_algorithm() {
        // Upstream's own test fact (daemonset_test.go, hashedLongStoragePoolNameDataDir).
        let pool = format!("l{}123", "1234567890".repeat(6));
        assert_eq!(
            upstream_name(&pool, "data-dir", 63),
            "l12345678901234567890123456789012345678901234-69d4290d-data-dir"
        );
        assert_eq!(upstream_name("local", "data-dir", 63), "local-data-dir");
        assert_eq!(
            upstream_pool_claim("local", "node1.example.com"),
            "hpp-pool-local-node1.example.com"
        );
        // max - 9 would cut mid-hash; the result never exceeds max.
        assert_eq!(upstream_name("b", &"s".repeat(60), 12).len(), 10);
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

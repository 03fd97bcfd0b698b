//! Property tests for everything that parses untrusted input.
//! A longer run: `PROPTEST_CASES=100000 cargo test --test properties`.

use std::path::{Component, Path};

use hostpath_csi::config::{parse_datadir, HostPathProvisioner};
use hostpath_csi::names::{is_valid_name, validate_name, MAX_NAME_LEN};
use hostpath_csi::volume::token;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
    ))]

    /// Whatever the input, an accepted name joined to a pool root is a
    /// direct child of that root.
    #[test]
    fn accepted_names_stay_inside_the_pool(name in any::<String>()) {
        let root = Path::new("/pool/root");
        if validate_name("name", &name).is_ok() {
            let joined = root.join(&name);
            prop_assert_eq!(joined.parent(), Some(root));
            let last = joined.components().next_back();
            prop_assert!(matches!(last, Some(Component::Normal(_))), "{:?}", last);
            prop_assert!(!name.starts_with('.'));
            prop_assert!(name.len() <= MAX_NAME_LEN);
        }
    }

    #[test]
    fn path_like_strings_are_refused(a in "[a-z]{0,5}", b in "[a-z]{0,5}") {
        let with_slash = format!("{a}/{b}");
        let with_dots = format!("..{a}");
        let with_nul = format!("{a}\0{b}");
        prop_assert!(!is_valid_name(&with_slash));
        prop_assert!(!is_valid_name(&with_dots));
        prop_assert!(!is_valid_name(&with_nul));
    }

    #[test]
    fn kubernetes_style_names_are_accepted(name in "pvc-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}") {
        prop_assert!(is_valid_name(&name));
    }

    /// Tokens round-trip, and arbitrary strings never panic and never decode
    /// to something that is not a valid name.
    #[test]
    fn tokens_round_trip(name in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}") {
        prop_assert_eq!(token::decode(&token::encode(&name)).unwrap(), Some(name));
    }

    #[test]
    fn foreign_tokens_are_refused_or_valid(text in any::<String>()) {
        if let Ok(Some(id)) = token::decode(&text) {
            prop_assert!(is_valid_name(&id));
        }
    }

    /// The --datadir parser never panics; what it accepts is valid.
    #[test]
    fn datadir_parser_is_total(json in any::<String>()) {
        if let Ok(pools) = parse_datadir(&json) {
            prop_assert!(!pools.is_empty());
            for p in pools {
                prop_assert!(p.path.is_absolute());
            }
        }
    }

    #[test]
    fn datadir_accepts_generated_pool_lists(names in proptest::collection::btree_set("[a-z][a-z0-9-]{0,20}", 1..5)) {
        let entries: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({"name": n, "path": format!("/data/{n}"), "extra": 1}))
            .collect();
        let pools = parse_datadir(&serde_json::Value::Array(entries).to_string()).unwrap();
        prop_assert_eq!(pools.len(), names.len());
    }

    /// The CR parser never panics on arbitrary YAML-ish text.
    #[test]
    fn cr_parser_is_total(yaml in any::<String>()) {
        let _ = HostPathProvisioner::from_yaml(&yaml);
    }

    #[test]
    fn cr_parser_handles_generated_pools(name in "[a-z]{1,60}", path in "/[a-z/]{0,300}") {
        let yaml = format!("apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner\nspec:\n  storagePools:\n  - name: {name}\n    path: \"{path}\"\n");
        match HostPathProvisioner::from_yaml(&yaml) {
            Ok((cr, _)) => {
                prop_assert!(name.len() <= 50 && path.len() <= 255);
                prop_assert_eq!(cr.pools().len(), 1);
            }
            Err(e) => prop_assert!(e.field.starts_with("spec.storagePools[0]"), "{}", e),
        }
    }
}

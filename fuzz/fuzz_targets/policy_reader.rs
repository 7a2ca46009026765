//! Feeds arbitrary text to the policy reader and validator. Neither may panic, whatever the
//! input; a policy that validates must also be well-formed HuJSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let syntax = netmap_policy::hujson::parse(text);
    if let Ok(node) = &syntax {
        // Converting the positioned tree to plain JSON must not panic either.
        let _ = node.to_json();
    }
    if netmap_policy::parse_policy(text).is_ok() {
        // A valid policy is valid HuJSON: the reader and the validator must agree.
        assert!(
            netmap_policy::hujson::parse(text).is_ok(),
            "parse_policy accepted text that hujson::parse rejects"
        );
    }
});

//! SPIFFE IDs, trust domains, selectors and entry templates, as the agent
//! uses them.
//!
//! Input: UTF-8 text. Line 1 is tried as a SPIFFE ID, a trust domain, a
//! selector and an entry template; every further line is a selector
//! (`plugin:type:value`) given to the workload the template is rendered for.
//!
//! Properties beyond "no panic":
//! * a parsed SPIFFE ID renders to a string that parses to the same ID, and
//!   its trust domain is a valid trust domain on its own;
//! * a parsed selector renders to a string that parses to the same selector;
//! * a template that parses renders, for any selectors, either nothing or a
//!   valid SPIFFE ID in the template's own trust domain (a selector value can
//!   never move an ID to another trust domain or add path segments), at most
//!   2048 bytes long (SPIFFE ID spec, "Maximum SPIFFE ID Length").
#![no_main]

use libfuzzer_sys::fuzz_target;
use spiffe::{SpiffeId, TrustDomain};
use tessera_agent::entries::IdTemplate;
use tessera_attestor::{Selector, SelectorSet};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();

    if let Ok(id) = SpiffeId::new(first) {
        let shown = id.to_string();
        let again = SpiffeId::new(&shown).expect("a rendered SPIFFE ID parses");
        assert_eq!(again, id, "SPIFFE ID round trip: {first:?} -> {shown:?}");
        assert_eq!(again.to_string(), shown);
        let td = TrustDomain::new(id.trust_domain_name()).expect("its trust domain is valid");
        assert!(id.is_member_of(&td));
    }
    if let Ok(td) = TrustDomain::new(first) {
        let again = TrustDomain::new(td.as_str()).expect("a rendered trust domain parses");
        assert_eq!(again, td);
    }
    check_selector(first);

    let mut selectors = Vec::new();
    for line in lines {
        if let Some(s) = check_selector(line) {
            selectors.push(s);
        }
    }
    let set = SelectorSet::new(selectors);

    if let Ok(template) = IdTemplate::parse(first) {
        TrustDomain::new(template.trust_domain()).expect("template trust domain is valid");
        if let Some(id) = template.render(&set) {
            assert_eq!(
                id.trust_domain_name(),
                template.trust_domain(),
                "template {first:?} rendered {id} outside its trust domain"
            );
            let shown = id.to_string();
            assert!(
                shown.len() <= 2048,
                "template {first:?} rendered a {}-byte SPIFFE ID",
                shown.len()
            );
            assert_eq!(SpiffeId::new(&shown).as_ref(), Ok(&id));
        }
        // An empty workload fills no placeholder: renders only a literal ID.
        if let Some(id) = template.render(&SelectorSet::default()) {
            assert!(
                !first.contains('{'),
                "{first:?} rendered {id} with no selectors"
            );
        }
    }
});

fn check_selector(text: &str) -> Option<Selector> {
    let s = Selector::parse(text).ok()?;
    let shown = s.to_string();
    let again = Selector::parse(&shown).expect("a rendered selector parses");
    assert_eq!(again, s, "selector round trip: {text:?} -> {shown:?}");
    Some(s)
}

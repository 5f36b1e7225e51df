//! Controller request validation and binding rules on arbitrary input: wire messages decoded from
//! arbitrary bytes, then every validator and the observation rules; nothing panics and every
//! refusal carries a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use victor_controller::api::validate::{self, MobilePrefixes};
use victor_controller::records::BindingRecord;
use victor_controller::registry::rules::{self, Knowledge, Observation, Observed, Rules, State, Verdict};
use victor_proto::v1::{DeclareVmRequest, ReportRequest};

fuzz_target!(|data: &[u8]| {
    let mobile = MobilePrefixes::new(vec!["10.10.0.0/16".parse().unwrap(), "fd00:10::/64".parse().unwrap()]);
    if let Ok(req) = DeclareVmRequest::decode(data) {
        let _ = validate::vm_ip(&req.vm_ip, &mobile);
        if let Err(e) = validate::vm_mac(&req.mac) {
            assert!(!e.to_string().is_empty());
        }
        let _ = validate::name("fe_id", &req.description);
        let _ = validate::page_token(&req.vm_ip);
    }
    if let Ok(req) = ReportRequest::decode(data) {
        let current = BindingRecord { fe_id: "fe1".into(), mac: vec![2, 0, 0, 0, 0, 1], observed_at_unix_nanos: 5, ..Default::default() };
        let removed = BindingRecord { removed: true, ..current.clone() };
        for obs in req.observations.iter().take(64) {
            let Ok(mac) = victor_proto::Mac::from_bytes(&obs.mac) else { continue };
            if victor_proto::types::ip_from_bytes(&obs.vm_ip).is_err() {
                continue;
            }
            let o = Observation {
                kind: if obs.kind == 2 { Observed::Gone } else { Observed::Learned },
                fe_id: &req.fe_id,
                fe_site: "a",
                mac,
                observed_at: obs.observed_at_unix_nanos,
                known: Knowledge::from_wire(obs.known_revision),
            };
            for record in [None, Some(current.clone()), Some(removed.clone())] {
                let state = State::stored(record, 7, 3);
                if let Verdict::Reject(r) = rules::decide_observation(&Rules::default(), &state, None, &o, 1_000_000) {
                    assert!(!r.message.is_empty());
                }
            }
        }
    }
});

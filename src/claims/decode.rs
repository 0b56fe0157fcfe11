//! Decoding of one ResourceClaim from the API server's JSON, with a nesting limit.
//!
//! Owns the rule that a claim the plugin cannot decode is that claim's problem only: each
//! claim is fetched as raw JSON and decoded on its own, and a document nested deeper than
//! [`MAX_DEPTH`] is refused with an error naming the claim before serde sees it (serde_json
//! stops at 128 levels with "recursion limit exceeded", which says neither which object
//! nor which field). Opaque parameters (`spec.devices.config[].opaque.parameters`, copied
//! to `status.allocation.devices.config`) are the only free-form part of a claim, so they
//! are what a deep document nests in; the API server bounds their size (10 KiB), not
//! their depth. A repeated key in an object (which only opaque parameters can carry, the
//! API server re-encodes the rest) is refused naming it: serde_json would keep the last
//! value silently. Must not interpret the claim (the prepare and config modules do).

use k8s_openapi::api::resource::v1::ResourceClaim;

/// Deepest nesting of JSON objects and arrays accepted in one ResourceClaim document.
///
/// The claim's own structure needs about 12 levels (managed fields included); the rest
/// is left to opaque parameters, far more than any driver config uses.
pub const MAX_DEPTH: usize = 64;

/// Why a claim document could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Objects or arrays nested deeper than [`MAX_DEPTH`] (in practice: opaque parameters).
    #[error(
        "nested more than {limit} levels deep at byte {offset}; opaque parameters \
         (spec.devices.config[].opaque.parameters) this deep are not accepted: flatten them"
    )]
    TooDeep {
        /// The limit, [`MAX_DEPTH`].
        limit: usize,
        /// Byte offset in the document where the limit was passed.
        offset: usize,
    },
    /// A JSON object in the document repeats a key (in practice: in opaque parameters,
    /// which the API server stores verbatim); decoding would silently keep the last value.
    #[error("{0}")]
    DuplicateKey(crate::config::DuplicateKey),
    /// The document is not a ResourceClaim of resource.k8s.io/v1.
    #[error("not a valid resource.k8s.io/v1 ResourceClaim")]
    Json(#[source] serde_json::Error),
}

/// The deepest nesting of `[`/`{` in `json` if at most `limit`, else where it passed it.
///
/// Brackets inside strings do not count. Malformed JSON is left to the decoder: this only
/// guards its recursion.
pub fn check_depth(json: &[u8], limit: usize) -> Result<usize, DecodeError> {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for (offset, &byte) in json.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(DecodeError::TooDeep { limit, offset });
                }
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(deepest)
}

/// Decodes one ResourceClaim, refusing documents nested deeper than [`MAX_DEPTH`] and
/// documents with a repeated key in an object (the first one found is named).
///
/// Managed fields are dropped: they are large and never read by the driver.
pub fn decode_claim(json: &[u8]) -> Result<ResourceClaim, DecodeError> {
    check_depth(json, MAX_DEPTH)?;
    let duplicates = crate::config::find_duplicate_keys(json).map_err(DecodeError::Json)?;
    if let Some(first) = duplicates.into_iter().next() {
        return Err(DecodeError::DuplicateKey(first));
    }
    let mut claim: ResourceClaim = serde_json::from_slice(json).map_err(DecodeError::Json)?;
    claim.metadata.managed_fields = None;
    Ok(claim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_counts_objects_and_arrays_not_strings() {
        assert_eq!(check_depth(br#"{"a":[{"b":"[[[{{"}]}"#, 10).unwrap(), 3);
        assert_eq!(check_depth(br#"{"a":"\"[[["}"#, 10).unwrap(), 1);
        assert_eq!(check_depth(nested(5).as_bytes(), 5).unwrap(), 5);
        assert!(matches!(
            check_depth(nested(6).as_bytes(), 5),
            Err(DecodeError::TooDeep {
                limit: 5,
                offset: 5
            })
        ));
    }

    #[test]
    fn deep_parameters_are_refused_before_serde() {
        let doc = format!(
            r#"{{"apiVersion":"resource.k8s.io/v1","kind":"ResourceClaim","metadata":{{"name":"c"}},
            "spec":{{"devices":{{"config":[{{"opaque":{{"driver":"d","parameters":{{"x":{}}}}}}}]}}}}}}"#,
            nested(200)
        );
        let err = decode_claim(doc.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooDeep {
                    limit: MAX_DEPTH,
                    ..
                }
            ),
            "{err}"
        );
        // The same document within serde's limit but past ours is still refused by us.
        let doc = doc.replace(&nested(200), &nested(100));
        assert!(matches!(
            decode_claim(doc.as_bytes()),
            Err(DecodeError::TooDeep { .. })
        ));
    }

    #[test]
    fn ordinary_claim_decodes_without_managed_fields() {
        let doc = serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ns", "uid": "u1",
                         "managedFields": [{"manager": "kube-scheduler", "fieldsV1": {"f:status": {}}}]},
            "spec": {"devices": {"config": [{"opaque": {"driver": "d", "parameters": {"a": {"b": [1]}}}}]}}
        });
        let claim = decode_claim(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(claim.metadata.uid.as_deref(), Some("u1"));
        assert!(claim.metadata.managed_fields.is_none());
        assert!(matches!(
            decode_claim(br#"{"metadata": 3}"#),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn a_repeated_key_in_opaque_parameters_is_refused_naming_it() {
        let doc = r#"{"apiVersion":"resource.k8s.io/v1","kind":"ResourceClaim","metadata":{"name":"c"},
            "spec":{"devices":{"config":[{"opaque":{"driver":"d","parameters":{"kind":"GpuConfig",
            "sharing":{"strategy":"MPS","strategy":"TimeSlicing"}}}}]}}}"#;
        let err = decode_claim(doc.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, DecodeError::DuplicateKey(d)
                if d.key_path() == "spec.devices.config[0].opaque.parameters.sharing.strategy"),
            "{err}"
        );
        assert!(
            err.to_string().contains("duplicate key \"strategy\""),
            "{err}"
        );
    }
}

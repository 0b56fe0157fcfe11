//! Which containers of this node's pods use which ResourceClaim, for the `pod` and
//! `container` labels of `gpu_dra_prepared_device_info`.
//!
//! Owns the projection of a pod onto its claims ([`claim_containers`], pure) and the
//! index fed by the node-scoped pod watch ([`PodIndex`]). A container uses a claim when
//! one of its `resources.claims[].name` names the pod's `spec.resourceClaims[]` entry of
//! that claim (the claim's name is the entry's `resourceClaimName`, or for a template the
//! name in `status.resourceClaimStatuses`), or, for the claim the scheduler made for
//! extended resources (KEP-5004), when `status.extendedResourceClaimStatus.requestMappings`
//! names the container: the same rules the kubelet's DRA manager uses to hand a
//! container its CDI devices. Init containers count like the others. Must not: call the
//! API server (the watch feeds it) or keep pods of other nodes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

/// Claim name (in the pod's namespace) -> names of the containers that use it, sorted,
/// without duplicates; a claim listed by the pod but used by no container maps to an
/// empty list.
pub type ClaimContainers = BTreeMap<String, Vec<String>>;

/// The claims of `pod` and the containers using each (rules in the module docs).
pub fn claim_containers(pod: &Pod) -> ClaimContainers {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Some(spec) = pod.spec.as_ref() else {
        return ClaimContainers::new();
    };
    let status = pod.status.as_ref();
    let generated = status
        .and_then(|s| s.resource_claim_statuses.as_deref())
        .unwrap_or_default();
    let containers: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    for entry in spec.resource_claims.iter().flatten() {
        let name = entry.resource_claim_name.clone().or_else(|| {
            generated
                .iter()
                .find(|g| g.name == entry.name)
                .and_then(|g| g.resource_claim_name.clone())
        });
        let Some(name) = name else { continue };
        let users = out.entry(name).or_default();
        for c in &containers {
            let uses = c
                .resources
                .as_ref()
                .and_then(|r| r.claims.as_ref())
                .is_some_and(|claims| claims.iter().any(|rc| rc.name == entry.name));
            if uses {
                users.insert(c.name.clone());
            }
        }
    }
    if let Some(ext) = status.and_then(|s| s.extended_resource_claim_status.as_ref()) {
        let users = out.entry(ext.resource_claim_name.clone()).or_default();
        users.extend(
            ext.request_mappings
                .iter()
                .map(|m| m.container_name.clone()),
        );
    }
    out.into_iter()
        .map(|(claim, users)| (claim, users.into_iter().collect()))
        .collect()
}

/// A pod by namespace and name.
pub type PodKey = (String, String);

/// This node's pods that use claims, and their containers per claim.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: BTreeMap<PodKey, ClaimContainers>,
    /// Pods seen during a re-list of the watch; the others are dropped when it ends.
    relist: Option<BTreeSet<PodKey>>,
}

fn key(pod: &Pod) -> PodKey {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

impl PodIndex {
    /// Applies one event of the pod watch.
    pub fn apply(&mut self, event: &watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.relist = Some(BTreeSet::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(seen) = self.relist.as_mut() {
                    seen.insert(key(pod));
                }
                self.upsert(pod);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist.take() {
                    self.pods.retain(|k, _| seen.contains(k));
                }
            }
            watcher::Event::Apply(pod) => self.upsert(pod),
            watcher::Event::Delete(pod) => {
                self.pods.remove(&key(pod));
            }
        }
    }

    fn upsert(&mut self, pod: &Pod) {
        let terminal = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let claims = claim_containers(pod);
        if claims.is_empty() || terminal {
            self.pods.remove(&key(pod));
        } else {
            self.pods.insert(key(pod), claims);
        }
    }

    /// The pods in `namespace` using claim `claim`, with their containers using it.
    pub fn users(&self, namespace: &str, claim: &str) -> Vec<(String, Vec<String>)> {
        self.pods
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .filter_map(|((_, pod), claims)| {
                claims
                    .get(claim)
                    .map(|containers| (pod.clone(), containers.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn containers_come_from_resources_claims_and_extended_resource_mappings() {
        let p = pod(json!({
            "metadata": {"namespace": "ml", "name": "trainer"},
            "spec": {
                "resourceClaims": [
                    {"name": "gpu", "resourceClaimTemplateName": "one-gpu"},
                    {"name": "shared", "resourceClaimName": "team-gpu"},
                    {"name": "unused", "resourceClaimName": "spare"}
                ],
                "initContainers": [{"name": "warmup", "resources": {"claims": [{"name": "gpu"}]}}],
                "containers": [
                    {"name": "main", "resources": {"claims": [{"name": "gpu"}, {"name": "shared"}]}},
                    {"name": "sidecar", "resources": {"claims": [{"name": "shared", "request": "r"}]}},
                    {"name": "legacy", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                ]
            },
            "status": {
                "resourceClaimStatuses": [{"name": "gpu", "resourceClaimName": "trainer-gpu-x7k2"}],
                "extendedResourceClaimStatus": {
                    "resourceClaimName": "trainer-extended-resources-abcde",
                    "requestMappings": [{"containerName": "legacy", "resourceName": "nvidia.com/gpu", "requestName": "container-2-request-0"}]
                }
            }
        }));
        let got = claim_containers(&p);
        let want = ClaimContainers::from([
            (
                "trainer-gpu-x7k2".into(),
                vec!["main".into(), "warmup".into()],
            ),
            ("team-gpu".into(), vec!["main".into(), "sidecar".into()]),
            ("spare".into(), vec![]),
            (
                "trainer-extended-resources-abcde".into(),
                vec!["legacy".into()],
            ),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn template_claim_without_a_generated_name_yet_is_skipped() {
        let p = pod(json!({
            "metadata": {"namespace": "ml", "name": "p"},
            "spec": {"resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "t"}],
                     "containers": [{"name": "c", "resources": {"claims": [{"name": "gpu"}]}}]}
        }));
        assert!(claim_containers(&p).is_empty());
    }

    #[test]
    fn index_follows_the_watch_and_drops_pods_missing_from_a_relist() {
        let a = pod(json!({
            "metadata": {"namespace": "ml", "name": "a"},
            "spec": {"resourceClaims": [{"name": "gpu", "resourceClaimName": "shared"}],
                     "containers": [{"name": "c", "resources": {"claims": [{"name": "gpu"}]}}]}
        }));
        let mut b = a.clone();
        b.metadata.name = Some("b".into());
        let mut index = PodIndex::default();
        index.apply(&watcher::Event::Apply(a.clone()));
        index.apply(&watcher::Event::Apply(b.clone()));
        assert_eq!(
            index.users("ml", "shared"),
            vec![
                ("a".into(), vec!["c".into()]),
                ("b".into(), vec!["c".into()])
            ]
        );
        assert!(index.users("other", "shared").is_empty());
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(b));
        index.apply(&watcher::Event::InitDone);
        assert_eq!(
            index.users("ml", "shared"),
            vec![("b".into(), vec!["c".into()])]
        );
        let mut done = a;
        done.metadata.name = Some("b".into());
        done.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).unwrap());
        index.apply(&watcher::Event::Apply(done));
        assert!(
            index.users("ml", "shared").is_empty(),
            "a finished pod uses nothing"
        );
    }
}

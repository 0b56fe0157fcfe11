//! The node-scoped claim cache: this node's pods that reference claims, and those claims.
//!
//! Pure data, no I/O: the pod watch feeds it pod projections ([`PodClaims`]) and says
//! which claims to fetch, fetched claims are stored only while a known pod references
//! them, and a pod's departure drops the claims no other pod references. So its size
//! follows this node's pods (at most the kubelet's `maxPods`), never the cluster's claims.
//! Liveness follows the kubelet's view of a pod: running until it has a deletion
//! timestamp or a terminal phase (`Succeeded`, `Failed`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;

use super::PodRef;

/// What the cache keeps of one pod: identity, liveness and the claims it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaims {
    /// The pod.
    pub pod: PodRef,
    /// Not terminated (phase not `Succeeded`/`Failed`) and not being deleted.
    pub live: bool,
    /// Names of the ResourceClaims (in the pod's namespace) the pod uses: each
    /// `spec.resourceClaims[].resourceClaimName`, and for template claims the name the
    /// claim controller wrote into `status.resourceClaimStatuses` (absent until it has),
    /// and the claim the scheduler made for extended resources (KEP-5004,
    /// `status.extendedResourceClaimStatus.resourceClaimName`).
    pub claims: BTreeSet<String>,
}

impl PodClaims {
    /// The projection of `pod`; `None` without a UID (not a stored object).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let uid = pod.metadata.uid.clone()?;
        let status = pod.status.as_ref();
        let terminal = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
        let generated = status
            .and_then(|s| s.resource_claim_statuses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let extended = status
            .and_then(|s| s.extended_resource_claim_status.as_ref())
            .map(|e| e.resource_claim_name.clone());
        let claims = pod
            .spec
            .as_ref()
            .and_then(|s| s.resource_claims.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|entry| {
                entry.resource_claim_name.clone().or_else(|| {
                    generated
                        .iter()
                        .find(|g| g.name == entry.name)
                        .and_then(|g| g.resource_claim_name.clone())
                })
            })
            .chain(extended)
            .collect();
        Some(Self {
            pod: PodRef {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid,
            },
            live: !terminal && pod.metadata.deletion_timestamp.is_none(),
            claims,
        })
    }
}

/// Namespace and name of a ResourceClaim.
pub type ClaimKey = (String, String);

/// This node's claim-holding pods and the claims they reference.
#[derive(Debug, Default)]
pub struct NodeCache {
    /// Pods by UID; only pods that reference at least one claim.
    pods: HashMap<String, PodClaims>,
    /// Claims by (namespace, name), each referenced by at least one pod in `pods`.
    claims: HashMap<ClaimKey, Arc<ResourceClaim>>,
    /// Pods listed so far during a re-list (the watch restarted), swapped in when done.
    relist: Option<HashMap<String, PodClaims>>,
    /// Claims being fetched (not asked for twice while a GET is in flight).
    fetching: BTreeSet<ClaimKey>,
}

/// Counts of what a [`NodeCache`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pods on this node that reference claims.
    pub pods: usize,
    /// Claims cached.
    pub claims: usize,
}

impl NodeCache {
    /// Records a pod (added or changed); returns the claims to fetch for it: those of a
    /// live pod not cached yet, or cached without this pod in `status.reservedFor` (the
    /// copy predates the pod's reservation).
    /// The returned claims count as being fetched until [`Self::store`] or
    /// [`Self::fetch_failed`].
    pub fn apply(&mut self, pod: PodClaims) -> Vec<ClaimKey> {
        let fetch = self.claims_to_fetch(&pod);
        let uid = pod.pod.uid.clone();
        if pod.claims.is_empty() {
            self.pods.remove(&uid);
            self.sweep();
        } else {
            self.pods.insert(uid, pod);
        }
        fetch
    }

    /// Forgets a deleted pod and the claims only it referenced.
    pub fn delete(&mut self, pod_uid: &str) {
        self.pods.remove(pod_uid);
        self.sweep();
    }

    /// The watch restarts its list: pods are collected apart until [`Self::relist_done`].
    pub fn relist_start(&mut self) {
        self.relist = Some(HashMap::new());
    }

    /// One pod of the re-list; returns the claims to fetch for it (as [`Self::apply`]).
    pub fn relist_apply(&mut self, pod: PodClaims) -> Vec<ClaimKey> {
        let fetch = self.claims_to_fetch(&pod);
        if !pod.claims.is_empty() {
            self.relist
                .get_or_insert_with(HashMap::new)
                .insert(pod.pod.uid.clone(), pod);
        }
        fetch
    }

    /// The re-list is complete: its pods replace the old set (pods deleted while the
    /// watch was down go), and unreferenced claims are dropped.
    pub fn relist_done(&mut self) {
        if let Some(pods) = self.relist.take() {
            self.pods = pods;
            self.sweep();
        }
    }

    /// Stores a fetched claim if a known pod still references it; returns whether it did.
    pub fn store(&mut self, claim: Arc<ResourceClaim>) -> bool {
        let key = (
            claim.metadata.namespace.clone().unwrap_or_default(),
            claim.metadata.name.clone().unwrap_or_default(),
        );
        self.fetching.remove(&key);
        let referenced = self.referenced(&key);
        if referenced {
            self.claims.insert(key, claim);
        }
        referenced
    }

    /// A fetch asked for by [`Self::apply`] failed: the claim may be asked for again.
    pub fn fetch_failed(&mut self, key: &ClaimKey) {
        self.fetching.remove(key);
    }

    /// The cached claim `namespace/name`, if any (its UID is the caller's to check).
    pub fn claim(&self, namespace: &str, name: &str) -> Option<Arc<ResourceClaim>> {
        self.claims
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The cached claim `namespace/name` if the copy can be trusted for prepare: it lists
    /// in `status.reservedFor` every live pod here that references the claim, and at least
    /// one. A copy that lists only pods that have ended may predate a deallocation and
    /// a new allocation (a shared claim whose pods all went, then a new pod), so it is not
    /// answered from.
    pub fn current_claim(&self, namespace: &str, name: &str) -> Option<Arc<ResourceClaim>> {
        let claim = self.claim(namespace, name)?;
        let reserved = reserved_pod_uids(&claim);
        let mut users = self
            .pods
            .values()
            .filter(|p| p.live && p.pod.namespace == namespace && p.claims.contains(name))
            .peekable();
        let current =
            users.peek().is_some() && users.all(|p| reserved.contains(p.pod.uid.as_str()));
        current.then_some(claim)
    }

    /// Live pods on this node the claim `namespace/name` with UID `uid` is reserved for:
    /// pods referencing the claim whose UID the cached claim's `status.reservedFor` lists.
    /// Empty when the claim is not cached with that UID (no evidence of use).
    pub fn live_holders(&self, namespace: &str, name: &str, uid: &str) -> Vec<PodRef> {
        let Some(claim) = self.claim(namespace, name) else {
            return Vec::new();
        };
        if claim.metadata.uid.as_deref() != Some(uid) {
            return Vec::new();
        }
        let reserved = reserved_pod_uids(&claim);
        let mut holders: Vec<PodRef> = self
            .pods
            .values()
            .filter(|p| p.live && p.pod.namespace == namespace && p.claims.contains(name))
            .filter(|p| reserved.contains(p.pod.uid.as_str()))
            .map(|p| p.pod.clone())
            .collect();
        holders.sort_by(|a, b| a.name.cmp(&b.name));
        holders
    }

    /// How many pods and claims are held.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            pods: self.pods.len(),
            claims: self.claims.len(),
        }
    }

    fn claims_to_fetch(&mut self, pod: &PodClaims) -> Vec<ClaimKey> {
        if !pod.live {
            return Vec::new();
        }
        let fetch: Vec<ClaimKey> = pod
            .claims
            .iter()
            .map(|name| (pod.pod.namespace.clone(), name.clone()))
            .filter(|key| !self.fetching.contains(key))
            .filter(|key| match self.claims.get(key) {
                Some(claim) => !reserved_pod_uids(claim).contains(pod.pod.uid.as_str()),
                None => true,
            })
            .collect();
        self.fetching.extend(fetch.iter().cloned());
        fetch
    }

    fn referenced(&self, key: &ClaimKey) -> bool {
        let in_set = |pods: &HashMap<String, PodClaims>| {
            pods.values()
                .any(|p| p.pod.namespace == key.0 && p.claims.contains(&key.1))
        };
        in_set(&self.pods) || self.relist.as_ref().is_some_and(in_set)
    }

    fn sweep(&mut self) {
        let wanted: BTreeSet<ClaimKey> = self
            .pods
            .values()
            .chain(self.relist.iter().flat_map(HashMap::values))
            .flat_map(|p| {
                p.claims
                    .iter()
                    .map(|c| (p.pod.namespace.clone(), c.clone()))
            })
            .collect();
        self.claims.retain(|key, _| wanted.contains(key));
    }
}

/// UIDs of the pods in the claim's `status.reservedFor`.
fn reserved_pod_uids(claim: &ResourceClaim) -> BTreeSet<&str> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.reserved_for.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or_default().is_empty())
        .map(|r| r.uid.as_str())
        .collect()
}

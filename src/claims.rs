//! Node-scoped ResourceClaim source and the claim checks the kubelet's DRA helper makes.
//!
//! Owns the node's view of ResourceClaims: a watch of this node's pods only
//! (`spec.nodeName` field selector) and the claims those pods reference, fetched when a
//! pod is seen bound (the scheduler writes allocation and reservation before binding) and
//! dropped when their pods go ([`cache`], [`watch`]); a GET on a cache miss, a UID
//! mismatch, or a copy that does not list this node's live pods of the claim in
//! `reservedFor` (it may predate a re-allocation), so a just-allocated claim is never
//! refused or answered stale because the watch lags. No code
//! here watches or lists ResourceClaims: memory and API server watch load follow this
//! node's pods, not the cluster's claims. Each claim is decoded on its own with a depth
//! limit ([`decode`]), so a claim the plugin cannot read fails only itself.
//!
//! Like the upstream kubelet plugin helper, a claim whose UID differs from the kubelet's
//! is "replaced" and an unallocated claim is refused. [`ClaimLookup::in_use_by`] answers
//! whether a claim is still reserved (`status.reservedFor`) for a live pod on this node,
//! so unprepare can refuse what a kubelet bug asks for (kubelet 1.36 could unprepare a
//! claim in use, fixed upstream by kubernetes PR 140212). It must not interpret
//! allocation results or configs (the prepare module does) and never writes claims.
//!
//! API access (the plugin's RBAC): `pods` list + watch (cluster scope, field selector) and
//! get (confirming a holder); `resourceclaims` get.

pub mod cache;
pub mod decode;
pub mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::{Client, ResourceExt};
use tracing::{debug, warn};

use crate::plugin::ClaimRef;
pub use cache::CacheStats;
use cache::{NodeCache, PodClaims};
pub use decode::DecodeError;
pub use watch::PodWatch;
use watch::{FetchError, get_claim, get_pod};

/// A pod by namespace, name and UID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// Why a claim named by the kubelet cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// No ResourceClaim with that namespace/name exists (deleted before prepare).
    #[error("ResourceClaim {namespace}/{name} not found")]
    NotFound {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// UID the kubelet asked for.
        uid: String,
    },
    /// The claim was deleted and re-created under the same name.
    #[error(
        "ResourceClaim {namespace}/{name}: claim was replaced: UID changed from {expected} to {found}, the kubelet should retry with the new claim"
    )]
    Replaced {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// UID the kubelet asked for.
        expected: String,
        /// UID of the claim now stored under that name.
        found: String,
    },
    /// The claim has no allocation result yet (or lost it).
    #[error(
        "ResourceClaim {namespace}/{name} ({uid}) is not allocated; the scheduler must allocate it before the pod can start"
    )]
    NotAllocated {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// Claim UID.
        uid: String,
    },
    /// The claim's JSON cannot be decoded (e.g. opaque parameters nested too deep).
    #[error("ResourceClaim {namespace}/{name} ({uid}) cannot be decoded")]
    Undecodable {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// UID the kubelet asked for.
        uid: String,
        /// What is wrong with the document.
        #[source]
        source: DecodeError,
    },
    /// Unprepare was asked for a claim still reserved for a live pod on this node.
    #[error(
        "ResourceClaim {namespace}/{name} ({uid}) is still reserved for running pod {pod} on this node; \
         not unpreparing a claim in use (devices, sharing policy and CDI spec kept): the \
         kubelet retries, and it succeeds once the pod has stopped; a kubelet that asks this \
         while the pod runs has an upstream bug (fixed by kubernetes PR 140212): upgrade it"
    )]
    InUse {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// Claim UID.
        uid: String,
        /// The live pod the claim is reserved for (boxed: the variant is rare).
        pod: Box<PodRef>,
    },
    /// The API server could not be asked.
    #[error("cannot read ResourceClaim {namespace}/{name} ({uid}) from the API server")]
    Api {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// UID the kubelet asked for.
        uid: String,
        /// Underlying client error (boxed: it is large and rare).
        #[source]
        source: Box<kube::Error>,
    },
}

/// Looks up the ResourceClaim a kubelet request names, checked for UID and allocation.
///
/// Implemented by [`ClaimSource`] (node-scoped cache + API server) and [`FixedClaims`]
/// (a fixed map, for component tests of the prepare state machine and offline tools).
pub trait ClaimLookup: Send + Sync + 'static {
    /// The claim named by `claim` if it still has the kubelet's UID and is allocated.
    fn get(
        &self,
        claim: &ClaimRef,
    ) -> impl Future<Output = Result<Arc<ResourceClaim>, ClaimError>> + Send;

    /// A live pod on this node (not terminated, not being deleted) that the claim is
    /// still reserved for (`status.reservedFor`), if any: unprepare must then refuse.
    fn in_use_by(&self, claim: &ClaimRef) -> impl Future<Output = Option<PodRef>> + Send;
}

impl ClaimError {
    /// The error for an unprepare of `claim` while `pod` still uses it.
    pub fn in_use(claim: &ClaimRef, pod: PodRef) -> Self {
        Self::InUse {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            uid: claim.uid.clone(),
            pod: Box::new(pod),
        }
    }
}

/// Checks a found claim against the kubelet's reference: same UID, then allocated.
pub fn verify(
    wanted: &ClaimRef,
    claim: Arc<ResourceClaim>,
) -> Result<Arc<ResourceClaim>, ClaimError> {
    let found = claim.metadata.uid.as_deref().unwrap_or_default();
    if found != wanted.uid {
        return Err(ClaimError::Replaced {
            namespace: wanted.namespace.clone(),
            name: wanted.name.clone(),
            expected: wanted.uid.clone(),
            found: found.to_owned(),
        });
    }
    if !is_allocated(&claim) {
        return Err(ClaimError::NotAllocated {
            namespace: wanted.namespace.clone(),
            name: wanted.name.clone(),
            uid: wanted.uid.clone(),
        });
    }
    Ok(claim)
}

/// True when the claim's status carries an allocation result.
pub fn is_allocated(claim: &ResourceClaim) -> bool {
    claim
        .status
        .as_ref()
        .is_some_and(|s| s.allocation.is_some())
}

/// Whether a cached copy can answer without asking the API server: only a copy with
/// the requested UID that is already allocated. Anything else may be a lagging watch.
fn cache_answers(wanted: &ClaimRef, cached: &ResourceClaim) -> bool {
    cached.metadata.uid.as_deref() == Some(wanted.uid.as_str()) && is_allocated(cached)
}

/// ResourceClaims of this node's pods from a cache, falling back to a GET; cheap to clone.
#[derive(Clone)]
pub struct ClaimSource {
    cache: Arc<Mutex<NodeCache>>,
    client: Client,
}

impl ClaimSource {
    /// A source for node `node_name` reading through `client`, and the pod watch that
    /// feeds it. Until the watch runs (or while it lags) every lookup is a GET, so
    /// correctness never depends on it.
    pub fn new(client: Client, node_name: &str) -> (Self, PodWatch) {
        let cache = Arc::new(Mutex::new(NodeCache::default()));
        (
            Self {
                cache: Arc::clone(&cache),
                client: client.clone(),
            },
            PodWatch {
                cache,
                client,
                node_name: node_name.to_owned(),
            },
        )
    }

    /// How many pods and claims the cache holds now.
    pub fn stats(&self) -> CacheStats {
        self.lock().stats()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn fetch(&self, wanted: &ClaimRef) -> Result<Arc<ResourceClaim>, ClaimError> {
        match get_claim(&self.client, &wanted.namespace, &wanted.name).await {
            Ok(claim) => {
                let claim = verify(wanted, Arc::new(claim))?;
                // Kept only if a pod on this node references it (else the watch lags).
                self.lock().store(Arc::clone(&claim));
                Ok(claim)
            }
            Err(FetchError::NotFound) => Err(ClaimError::NotFound {
                namespace: wanted.namespace.clone(),
                name: wanted.name.clone(),
                uid: wanted.uid.clone(),
            }),
            Err(FetchError::Decode(source)) => Err(ClaimError::Undecodable {
                namespace: wanted.namespace.clone(),
                name: wanted.name.clone(),
                uid: wanted.uid.clone(),
                source,
            }),
            Err(FetchError::Api(source)) => Err(ClaimError::Api {
                namespace: wanted.namespace.clone(),
                name: wanted.name.clone(),
                uid: wanted.uid.clone(),
                source: Box::new(source),
            }),
        }
    }
}

impl ClaimLookup for ClaimSource {
    async fn get(&self, claim: &ClaimRef) -> Result<Arc<ResourceClaim>, ClaimError> {
        let cached = self.lock().current_claim(&claim.namespace, &claim.name);
        if let Some(cached) = cached
            && cache_answers(claim, &cached)
        {
            return Ok(cached);
        }
        debug!(claim.uid = %claim.uid, "claim cache miss; asking the API server");
        self.fetch(claim).await
    }

    /// Candidates come from the cache (live pods referencing the claim that its cached
    /// `reservedFor` lists); each is confirmed with a GET of the pod, since the pod watch
    /// may not have delivered its deletion yet when the kubelet unprepares. A pod that
    /// cannot be read counts as live: refusing is retried, a wrong release is not undone.
    async fn in_use_by(&self, claim: &ClaimRef) -> Option<PodRef> {
        let candidates = self
            .lock()
            .live_holders(&claim.namespace, &claim.name, &claim.uid);
        for candidate in candidates {
            match get_pod(&self.client, &candidate.namespace, &candidate.name).await {
                Ok(Some(pod)) => {
                    let fresh = PodClaims::from_pod(&pod);
                    if fresh.is_some_and(|p| p.live && p.pod.uid == candidate.uid) {
                        return Some(candidate);
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    warn!(claim.uid = %claim.uid, pod = %candidate, error = %error, "cannot confirm whether the claim's pod still runs; treating it as running");
                    return Some(candidate);
                }
            }
        }
        None
    }
}

/// A fixed set of claims keyed by (namespace, name), checked like [`ClaimSource`].
#[derive(Clone, Debug, Default)]
pub struct FixedClaims {
    claims: BTreeMap<(String, String), Arc<ResourceClaim>>,
    /// Claim UID -> live pod it is reserved for; shared by clones.
    in_use: Arc<Mutex<BTreeMap<String, PodRef>>>,
}

impl FixedClaims {
    /// An empty set (every lookup is [`ClaimError::NotFound`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a claim under its metadata namespace and name.
    pub fn insert(&mut self, claim: ResourceClaim) {
        let key = (claim.namespace().unwrap_or_default(), claim.name_any());
        self.claims.insert(key, Arc::new(claim));
    }

    /// Marks the claim with UID `claim_uid` as reserved for the live pod `pod` (`None`:
    /// no longer); seen by every clone.
    pub fn set_in_use(&self, claim_uid: &str, pod: Option<PodRef>) {
        let mut in_use = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        match pod {
            Some(pod) => in_use.insert(claim_uid.to_owned(), pod),
            None => in_use.remove(claim_uid),
        };
    }
}

impl ClaimLookup for FixedClaims {
    async fn get(&self, claim: &ClaimRef) -> Result<Arc<ResourceClaim>, ClaimError> {
        let key = (claim.namespace.clone(), claim.name.clone());
        match self.claims.get(&key) {
            Some(found) => verify(claim, Arc::clone(found)),
            None => Err(ClaimError::NotFound {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                uid: claim.uid.clone(),
            }),
        }
    }

    async fn in_use_by(&self, claim: &ClaimRef) -> Option<PodRef> {
        self.in_use
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&claim.uid)
            .cloned()
    }
}

#[cfg(test)]
mod tests;

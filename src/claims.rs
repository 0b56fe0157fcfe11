//! ResourceClaim watch cache and the claim checks the kubelet's DRA helper makes.
//!
//! Owns the node's view of ResourceClaims: a kube-runtime reflector over all
//! namespaces (resource.k8s.io/v1) plus a GET on a cache miss or UID mismatch, so a
//! just-allocated claim is never refused because the watch lags. Like the upstream
//! kubelet plugin helper, a claim whose UID differs from the kubelet's is "replaced"
//! and an unallocated claim is refused. It must not interpret allocation results or
//! configs (the prepare module does) and never writes claims.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, warn};

use crate::plugin::ClaimRef;

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
/// Implemented by [`ClaimSource`] (watch cache + API server) and [`FixedClaims`] (a
/// fixed map, for component tests of the prepare state machine and offline tools).
pub trait ClaimLookup: Send + Sync + 'static {
    /// The claim named by `claim` if it still has the kubelet's UID and is allocated.
    fn get(
        &self,
        claim: &ClaimRef,
    ) -> impl Future<Output = Result<Arc<ResourceClaim>, ClaimError>> + Send;
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

/// ResourceClaims from a reflector cache, falling back to a GET; cheap to clone.
#[derive(Clone)]
pub struct ClaimSource {
    store: Store<ResourceClaim>,
    client: Client,
}

/// The watch that fills a [`ClaimSource`]'s cache; run it with [`ClaimWatch::run`].
pub struct ClaimWatch {
    writer: reflector::store::Writer<ResourceClaim>,
    client: Client,
}

impl ClaimSource {
    /// A source reading through `client` and the watch that feeds it. Until the watch
    /// runs (or while it lags) every lookup is a GET, so correctness never depends on it.
    pub fn new(client: Client) -> (Self, ClaimWatch) {
        let (store, writer) = reflector::store();
        (
            Self {
                store,
                client: client.clone(),
            },
            ClaimWatch { writer, client },
        )
    }

    /// A source over an existing store (tests fill the store through its writer).
    pub fn with_store(client: Client, store: Store<ResourceClaim>) -> Self {
        Self { store, client }
    }

    /// Waits until the cache has listed all claims once; errors if the watch is gone.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.store.wait_until_ready().await
    }

    async fn fetch(&self, wanted: &ClaimRef) -> Result<Arc<ResourceClaim>, ClaimError> {
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), &wanted.namespace);
        match api.get_opt(&wanted.name).await {
            Ok(Some(claim)) => verify(wanted, Arc::new(claim)),
            Ok(None) => Err(ClaimError::NotFound {
                namespace: wanted.namespace.clone(),
                name: wanted.name.clone(),
                uid: wanted.uid.clone(),
            }),
            Err(source) => Err(ClaimError::Api {
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
        let key = ObjectRef::new(&claim.name).within(&claim.namespace);
        if let Some(cached) = self.store.get(&key)
            && cache_answers(claim, &cached)
        {
            return Ok(cached);
        }
        debug!(claim.uid = %claim.uid, "claim cache miss; asking the API server");
        self.fetch(claim).await
    }
}

impl ClaimWatch {
    /// Watches ResourceClaims in all namespaces into the cache, retrying with backoff;
    /// returns only when the watch stream ends (it does not on its own).
    pub async fn run(self) {
        let api: Api<ResourceClaim> = Api::all(self.client);
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            // Managed fields are large and never read here.
            .modify(|claim| claim.managed_fields_mut().clear())
            .reflect(self.writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                warn!(error = %error, "ResourceClaim watch failed; retrying");
            }
        }
    }
}

/// A fixed set of claims keyed by (namespace, name), checked like [`ClaimSource`].
#[derive(Clone, Debug, Default)]
pub struct FixedClaims {
    claims: BTreeMap<(String, String), Arc<ResourceClaim>>,
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
}

#[cfg(test)]
mod tests;

//! The kubelet's batch calls (NodePrepareResources / NodeUnprepareResources) fanned out
//! per claim: each claim of a call is prepared or unprepared concurrently, bounded by
//! [`MAX_CLAIMS_IN_FLIGHT`], and answered with its own result, so one bad claim never
//! affects the others. Owns the [`NodeDriver`] implementation of the [`Preparer`]; the
//! per-claim work is the preparer's.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use tracing::{Instrument, info_span};

use super::{PrepareError, Preparer, error_chain};
use crate::claims::ClaimLookup;
use crate::plugin::{ClaimRef, NodeDriver, PreparedDevice};

/// How many claims of one kubelet call are worked on at once: bounds the API server
/// requests (claim lookups on a cache miss) and NVML work a single call can start.
pub const MAX_CLAIMS_IN_FLIGHT: usize = 16;

/// Runs `op` for the claims concurrently, at most [`MAX_CLAIMS_IN_FLIGHT`] at a time, and
/// answers each claim UID with its result; errors become one line naming the claim (the
/// gRPC edge logs them once).
pub(super) async fn each_claim<T, F, Fut>(
    op_name: &'static str,
    claims: Vec<ClaimRef>,
    op: F,
) -> BTreeMap<String, Result<T, String>>
where
    F: Fn(ClaimRef) -> Fut,
    Fut: Future<Output = (ClaimRef, Result<T, PrepareError>)>,
{
    let calls = claims.into_iter().map(|claim| {
        let span = info_span!("claim", op = op_name, claim.uid = %claim.uid, claim.namespace = %claim.namespace, claim.name = %claim.name);
        op(claim).instrument(span)
    });
    futures::stream::iter(calls)
        .buffer_unordered(MAX_CLAIMS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|(claim, result)| {
            let result = result.map_err(|err| {
                crate::metrics::events::claim_error(op_name, &err);
                crate::events::claim_failed(op_name, &claim, &err);
                format!("claim {claim}: {}", error_chain(&err))
            });
            (claim.uid, result)
        })
        .collect()
}

impl<L: ClaimLookup> NodeDriver for Preparer<L> {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        each_claim("prepare", claims, |claim| async move {
            let result = self.prepare_claim(&claim).await;
            if result.is_err() {
                crate::metrics::events::forget_claim(&claim.uid);
            }
            (claim, result)
        })
        .await
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        each_claim("unprepare", claims, |claim| async move {
            let result = self.unprepare_claim(&claim).await;
            if result.is_ok() {
                crate::metrics::events::forget_claim(&claim.uid);
            }
            (claim, result)
        })
        .await
    }
}

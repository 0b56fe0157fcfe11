//! ResourceSlice publishing outages as Events: one `ResourceSlicePublishFailing` once
//! publishing has failed without a success for longer than a threshold (one minute by
//! default), and one `ResourceSlicePublishRecovered` when it succeeds again, however many
//! retries fail in between.
//!
//! Owns the outage tracker ([`Outage`], pure: the caller passes the time) and the follower
//! of the reconciler's `PublishStatus` channel ([`follow_publish`]). Must not touch the
//! reconciler: it only reads its status.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Notice, notify};
use crate::slices::reconcile::PublishStatus;

/// Default time publishing must fail before the Warning Event.
pub const DEFAULT_THRESHOLD: Duration = Duration::from_secs(60);

/// The state of one publishing outage.
#[derive(Debug, Clone)]
pub struct Outage {
    threshold: Duration,
    since: Option<Instant>,
    last_error: String,
    reported: bool,
}

impl Outage {
    /// A tracker that reports outages longer than `threshold`.
    pub fn new(threshold: Duration) -> Self {
        Self {
            threshold,
            since: None,
            last_error: String::new(),
            reported: false,
        }
    }

    /// Records one reconcile pass at `now` (`error`: why it failed; `None`: it
    /// succeeded) and returns the notice to post, if any.
    pub fn observe(&mut self, error: Option<&str>, now: Instant) -> Option<Notice> {
        match error {
            Some(error) => {
                self.since.get_or_insert(now);
                self.last_error = error.to_owned();
                self.check(now)
            }
            None => {
                let since = self.since.take()?;
                let reported = std::mem::take(&mut self.reported);
                reported.then(|| Notice::SlicePublishRecovered {
                    failed_for_secs: now.duration_since(since).as_secs(),
                })
            }
        }
    }

    /// The notice due at `now` without a new pass (the outage crossed the threshold).
    pub fn check(&mut self, now: Instant) -> Option<Notice> {
        let since = self.since?;
        let failing_for = now.duration_since(since);
        if self.reported || failing_for < self.threshold {
            return None;
        }
        self.reported = true;
        Some(Notice::SlicePublishFailing {
            failing_for_secs: failing_for.as_secs(),
            error: self.last_error.clone(),
        })
    }

    /// When [`Self::check`] has something to say if no pass comes first.
    pub fn deadline(&self) -> Option<Instant> {
        match self.since {
            Some(since) if !self.reported => Some(since + self.threshold),
            _ => None,
        }
    }
}

/// Follows the reconciler's status until the channel closes, posting outage notices.
/// A pass is seen through `last_error` of each status update.
pub async fn follow_publish(mut status: watch::Receiver<PublishStatus>, threshold: Duration) {
    let mut outage = Outage::new(threshold);
    loop {
        let deadline = outage.deadline();
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let error = status.borrow_and_update().last_error.clone();
                if let Some(notice) = outage.observe(error.as_deref(), Instant::now()) {
                    notify(notice);
                }
            }
            // Wakes at the threshold when the reconciler's backoff leaves no pass there.
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(notice) = outage.check(Instant::now()) {
                    notify(notice);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failing_event_per_outage_and_one_on_recovery() {
        let t0 = Instant::now();
        let mut outage = Outage::new(Duration::from_secs(60));
        assert_eq!(outage.observe(None, t0), None, "success without outage");
        assert_eq!(outage.observe(Some("denied"), t0), None);
        assert_eq!(outage.deadline(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(
            outage.observe(Some("denied"), t0 + Duration::from_secs(30)),
            None
        );
        assert_eq!(outage.check(t0 + Duration::from_secs(59)), None);
        assert_eq!(
            outage.check(t0 + Duration::from_secs(61)),
            Some(Notice::SlicePublishFailing {
                failing_for_secs: 61,
                error: "denied".into()
            })
        );
        assert_eq!(outage.deadline(), None);
        for s in [70, 100, 400] {
            assert_eq!(
                outage.observe(Some("still denied"), t0 + Duration::from_secs(s)),
                None,
                "one Event per outage, not one per retry"
            );
        }
        assert_eq!(
            outage.observe(None, t0 + Duration::from_secs(500)),
            Some(Notice::SlicePublishRecovered {
                failed_for_secs: 500
            })
        );
        assert_eq!(outage.observe(None, t0 + Duration::from_secs(501)), None);
    }

    #[test]
    fn short_outage_posts_nothing() {
        let t0 = Instant::now();
        let mut outage = Outage::new(Duration::from_secs(60));
        assert_eq!(outage.observe(Some("conflict"), t0), None);
        assert_eq!(outage.observe(None, t0 + Duration::from_secs(5)), None);
        assert_eq!(outage.deadline(), None);
        // A new outage starts its own clock.
        assert_eq!(
            outage.observe(Some("x"), t0 + Duration::from_secs(100)),
            None
        );
        assert_eq!(outage.check(t0 + Duration::from_secs(130)), None);
        assert!(outage.check(t0 + Duration::from_secs(160)).is_some());
    }
}

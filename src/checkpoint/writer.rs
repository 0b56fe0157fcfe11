//! The single writer of the checkpoint, committing concurrent updates in groups.
//!
//! Owns the in-memory checkpoint after start-up: callers send a mutation and wait for it
//! to be durable; the task applies every pending mutation to a copy, writes the file once
//! (one fsync pair for the whole group), then acknowledges all of them. So 64 claims
//! prepared at once cost a handful of fsyncs instead of 64 serialised ones, and no caller
//! holds a lock across disk I/O. Readers take snapshots from a `watch` channel. If a write
//! fails, the group's mutations are discarded (memory keeps matching the file) and every
//! caller in the group gets the error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::model::Checkpoint;
use super::store::{CheckpointError, CheckpointStore};

/// Runs a caller's mutation and returns the function that delivers its outcome.
type Job =
    Box<dyn FnOnce(&mut Checkpoint) -> Box<dyn FnOnce(Result<(), CheckpointError>) + Send> + Send>;

/// Handle to the checkpoint writer task; cheap to clone. The task stops when every handle
/// is dropped.
#[derive(Clone)]
pub struct CheckpointWriter {
    jobs: mpsc::UnboundedSender<Job>,
    snapshot: watch::Receiver<Arc<Checkpoint>>,
    writes: Arc<AtomicU64>,
}

impl CheckpointWriter {
    /// Starts the writer task on the current Tokio runtime with `initial` as the state
    /// (normally `CheckpointStore::load`'s result). Nothing is written until the first update.
    pub fn spawn(store: CheckpointStore, initial: Checkpoint) -> (Self, JoinHandle<()>) {
        let (jobs, rx) = mpsc::unbounded_channel();
        let (snap_tx, snapshot) = watch::channel(Arc::new(initial));
        let writes = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(store, rx, snap_tx, Arc::clone(&writes)));
        (
            Self {
                jobs,
                snapshot,
                writes,
            },
            task,
        )
    }

    /// Applies `mutate` and returns once the result is on disk, with `mutate`'s return
    /// value. `mutate` runs on the writer task, after earlier updates: keep it short and
    /// free of I/O. A check-and-set belongs inside it (e.g. refuse a device held by another
    /// claim by returning an error value). Errors: the group's write failed (the mutation is
    /// not applied) or the writer stopped.
    pub async fn update<R, F>(&self, mutate: F) -> Result<R, CheckpointError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Checkpoint) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, CheckpointError>>();
        let job: Job = Box::new(move |cp: &mut Checkpoint| {
            let value = mutate(cp);
            Box::new(move |written: Result<(), CheckpointError>| {
                // The caller may have given up waiting; nothing to do then.
                let _ = tx.send(written.map(|()| value));
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| CheckpointError::WriterStopped)?;
        rx.await.map_err(|_| CheckpointError::WriterStopped)?
    }

    /// The latest durable checkpoint.
    pub fn snapshot(&self) -> Arc<Checkpoint> {
        Arc::clone(&self.snapshot.borrow())
    }

    /// A receiver that sees each durable checkpoint.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Checkpoint>> {
        self.snapshot.clone()
    }

    /// How many times the file has been written successfully (for tests and metrics).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

async fn run(
    store: CheckpointStore,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    snapshot: watch::Sender<Arc<Checkpoint>>,
    writes: Arc<AtomicU64>,
) {
    let mut current: Arc<Checkpoint> = Arc::clone(&snapshot.borrow());
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        while let Ok(more) = jobs.try_recv() {
            group.push(more);
        }
        let mut next = Checkpoint::clone(&current);
        let acks: Vec<_> = group.into_iter().map(|job| job(&mut next)).collect();
        let result = if next == *current {
            Ok(()) // nothing changed (e.g. a read-only check): no need to pay a write
        } else {
            let next = Arc::new(next);
            let (store, to_save) = (store.clone(), Arc::clone(&next));
            // A panic in save is a bug; callers learn the write did not happen.
            let saved = tokio::task::spawn_blocking(move || store.save(&to_save))
                .await
                .unwrap_or(Err(CheckpointError::WriterStopped));
            if saved.is_ok() {
                writes.fetch_add(1, Ordering::Relaxed);
                current = next;
                snapshot.send_replace(Arc::clone(&current));
            }
            saved
        };
        for ack in acks {
            ack(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::model::{ClaimEntry, ClaimState};
    use std::fs;

    fn entry(name: &str) -> ClaimEntry {
        ClaimEntry {
            state: ClaimState::PrepareStarted,
            namespace: "ns".into(),
            name: name.into(),
            devices: vec![],
            extra: Default::default(),
        }
    }

    fn store(dir: &tempfile::TempDir) -> CheckpointStore {
        let boot = dir.path().join("boot_id");
        fs::write(&boot, "boot-a").expect("boot id");
        CheckpointStore::new(&dir.path().join("plugin"), &boot)
    }

    #[tokio::test]
    async fn concurrent_updates_share_writes() {
        const N: usize = 64;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir);
        let (writer, task) = CheckpointWriter::spawn(store.clone(), Checkpoint::new("boot-a"));
        let updates = (0..N).map(|i| {
            let writer = writer.clone();
            async move {
                writer
                    .update(move |cp| {
                        cp.claims
                            .insert(format!("uid-{i:02}"), entry(&format!("c{i}")))
                            .is_none()
                    })
                    .await
            }
        });
        let results = futures::future::join_all(updates).await;
        assert!(results.iter().all(|r| matches!(r, Ok(true))), "{results:?}");
        assert!(
            writer.writes() < N as u64,
            "{} writes for {N} updates",
            writer.writes()
        );
        assert!(writer.writes() >= 1);
        assert_eq!(writer.snapshot().claims.len(), N);
        let on_disk = store.load().expect("load").checkpoint;
        assert_eq!(on_disk, *writer.snapshot());
        drop(writer);
        task.await
            .expect("writer task ends when handles are dropped");
    }

    #[tokio::test]
    async fn update_returns_value_and_unchanged_state_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (writer, _task) = CheckpointWriter::spawn(store(&dir), Checkpoint::new("boot-a"));
        let mut rx = writer.subscribe();
        writer
            .update(|cp| cp.claims.insert("u".into(), entry("c")))
            .await
            .expect("write");
        assert_eq!(writer.writes(), 1);
        assert!(rx.has_changed().expect("open"));
        assert_eq!(rx.borrow_and_update().claims.len(), 1);
        let state = writer
            .update(|cp| {
                let e = cp.claims.get_mut("u").expect("present");
                e.state = ClaimState::PrepareCompleted;
                e.state
            })
            .await
            .expect("write");
        assert_eq!(state, ClaimState::PrepareCompleted);
        assert_eq!(writer.writes(), 2);
        // A read-only check costs no write.
        let held = writer
            .update(|cp| cp.claims.contains_key("u"))
            .await
            .expect("no-op");
        assert!(held);
        assert_eq!(writer.writes(), 2);
    }

    #[tokio::test]
    async fn failed_write_is_reported_and_not_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir);
        // A directory where the file should be makes the rename fail.
        fs::create_dir_all(store.path()).expect("dir in the way");
        let (writer, _task) = CheckpointWriter::spawn(store, Checkpoint::new("boot-a"));
        let err = writer
            .update(|cp| cp.claims.insert("u".into(), entry("c")))
            .await
            .expect_err("fails");
        assert!(matches!(err, CheckpointError::Write { .. }), "{err:?}");
        assert!(writer.snapshot().claims.is_empty());
        assert_eq!(writer.writes(), 0);
    }
}

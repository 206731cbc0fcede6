//! Groups concurrent calls into one: each caller hands in its job and awaits its own result,
//! a collector takes whatever jobs are waiting (up to a maximum) and runs them together.
//!
//! One database statement and commit per job caps a small machine at a few thousand per
//! second and makes callers queue for connections; here under light load a group is a single
//! job and nothing waits, and under a burst the groups grow instead of the queue.

use std::{future::Future, sync::Arc};

use tokio::sync::{mpsc, oneshot, Semaphore};

type Reply<R> = oneshot::Sender<Result<R, String>>;

/// Hands jobs to the collector task.
pub struct Batcher<J, R> {
    tx: mpsc::Sender<(J, Reply<R>)>,
}

impl<J, R> Clone for Batcher<J, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<J: Send + 'static, R: Send + 'static> Batcher<J, R> {
    /// Starts the collector on the current runtime: at most `queue` jobs wait, a group holds
    /// at most `max` jobs, and at most `concurrency` groups run at once. `run` gets a group
    /// and answers with one result per job, in order, or one error for all of them.
    pub fn start<F, Fut>(queue: usize, max: usize, concurrency: usize, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, String>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(queue.max(1));
        tokio::spawn(collect(rx, max.max(1), concurrency.max(1), Arc::new(run)));
        Self { tx }
    }

    /// Runs `job` in the next group and returns its result.
    pub async fn call(&self, job: J) -> Result<R, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((job, reply))
            .await
            .map_err(|_| "batcher stopped".to_string())?;
        rx.await
            .map_err(|_| "batcher dropped the job".to_string())?
    }
}

async fn collect<J, R, F, Fut>(
    mut rx: mpsc::Receiver<(J, Reply<R>)>,
    max: usize,
    concurrency: usize,
    run: Arc<F>,
) where
    J: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<R>, String>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Everything that queued while the groups in flight ran goes in this one.
        let mut group = vec![first];
        while group.len() < max {
            match rx.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let run = run.clone();
        tokio::spawn(async move {
            let (jobs, replies): (Vec<J>, Vec<Reply<R>>) = group.into_iter().unzip();
            let n = jobs.len();
            match run(jobs).await {
                Ok(results) if results.len() == n => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(r));
                    }
                }
                Ok(results) => {
                    let e = format!("a group of {n} jobs gave {} results", results.len());
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_groups_and_each_gets_its_own_result() {
        let groups = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = groups.clone();
        let b = Batcher::start(1000, 64, 1, move |jobs: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(jobs.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(jobs.into_iter().map(|j| j * 2).collect())
            }
        });
        let calls = (0..500u32).map(|j| {
            let b = b.clone();
            async move { (j, b.call(j).await) }
        });
        for (j, r) in futures::future::join_all(calls).await {
            assert_eq!(r, Ok(j * 2));
        }
        let groups = groups.lock().unwrap();
        assert_eq!(groups.iter().sum::<usize>(), 500);
        assert!(groups.iter().all(|n| *n <= 64), "{groups:?}");
        assert!(groups.len() < 50, "calls were grouped: {groups:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_or_a_short_answer_reaches_every_job_of_the_group() {
        // Every group answers one result; job 9 holds the only slot for a while, so the two
        // calls made meanwhile end up in one group, which is then one result short.
        let b = Batcher::start(10, 10, 1, |jobs: Vec<u32>| async move {
            if jobs.contains(&0) {
                return Err("boom".to_string());
            }
            if jobs == [9] {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(vec![1])
        });
        assert_eq!(b.call(0).await, Err("boom".to_string()));
        assert_eq!(b.call(5).await, Ok(1));
        let slow = tokio::spawn({
            let b = b.clone();
            async move { b.call(9).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (x, y) = tokio::join!(b.call(1), b.call(2));
        let short = Err("a group of 2 jobs gave 1 results".to_string());
        assert_eq!((x, y), (short.clone(), short));
        assert_eq!(slow.await.unwrap(), Ok(1));
    }
}

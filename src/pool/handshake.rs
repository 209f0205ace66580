//! The Stratum handshake with a pool: a subscribe, the pool's own user, and the first job, before
//! a deadline. Aggregate sessions open with it, and the health probe is it: a pool is up when it
//! completes it, since a stopped pool process keeps its listening socket and a TCP connect
//! proves nothing.

use tokio::time::{timeout_at, Instant};

use crate::codec::FrameError;
use crate::pool_session::{PoolSession, Step};
use crate::protocol::pool::Notify;
use crate::upstream::PoolLink;

/// Writes `requests` (the session's handshake), then reads until the pool has answered the
/// subscribe and the login and sent a job, all before `deadline`. Returns the jobs that came,
/// each with the difficulty it was sent under.
pub async fn handshake(
    link: &mut PoolLink,
    session: &mut PoolSession,
    requests: Vec<u8>,
    deadline: Instant,
) -> Result<Vec<(Notify, f64)>, String> {
    let (mut to_pool, mut relayed) = (requests, Vec::new());
    let mut jobs = Vec::new();
    while !(session.subscribed && session.logged_in && !jobs.is_empty()) {
        link.queue(&to_pool);
        to_pool.clear();
        let line = match timeout_at(deadline, link.next_line()).await {
            Err(_) => return Err("no subscribe, authorize and job within upstream.connect_timeout".into()),
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(FrameError::TooLong(_)))) => return Err("line over upstream.max_line_bytes".into()),
            Ok(Some(Err(FrameError::Io(e)))) => return Err(format!("connection failed: {e}")),
            Ok(None) => return Err("the pool closed the connection".into()),
        };
        match session.on_line(&line, Instant::now(), &mut to_pool, &mut relayed).map_err(str::to_owned)? {
            Some(Step::Reconnect { .. }) => return Err("the pool asked for a reconnect during the handshake".into()),
            Some(Step::Job(n)) => {
                if n.clean_jobs {
                    jobs.clear();
                }
                jobs.push((n, session.difficulty));
            }
            _ => {}
        }
    }
    link.queue(&to_pool);
    Ok(jobs)
}

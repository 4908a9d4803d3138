//! Periodic upkeep of one pool: close idle backends that died, grew too old or sat idle
//! too long (never going under `min_idle`), and open backends up to `min_idle`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{PoolError, Timeouts};
use tokio_util::sync::CancellationToken;

use super::Pool;

const TICK: Duration = Duration::from_secs(1);
/// How often a pool that cannot reach its server says so.
const WARN_EVERY: Duration = Duration::from_secs(30);

pub(super) async fn run(pool: Arc<Pool>, stop: CancellationToken) {
    let mut last_warning: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if pool.is_retired() && pool.clients() == 0 && pool.close_if_retired() {
            tracing::info!(pool = %pool.name, "closed a retired pool (a reload removed it, or its found user left it unused): no client left");
            return;
        }
        // Deadpool sees every idle backend, the warm ones too.
        pool.cool();
        if pool.is_paused() {
            // PAUSE keeps none open: not even min_idle's.
            pool.inner.retain(|_, _| false);
            continue;
        }
        evict(&pool);
        if let Err(e) = super::FILLING.scope((), fill_to_min_idle(&pool)).await {
            if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                tracing::warn!(pool = %pool.name, error = %e, "cannot open min_idle backends");
                last_warning = Some(Instant::now());
            }
        }
    }
}

/// Closes idle backends that must go, and surplus ones idle past `server_idle_timeout`.
fn evict(pool: &Pool) {
    let manager = pool.inner.manager();
    let settings = pool.settings();
    let idle_timeout = settings.server_idle_timeout;
    let mut closable = pool.inner.status().size.saturating_sub(settings.min_idle);
    // max_idle_percent: idle backends of the database beyond it close, oldest idle first.
    let db_limit = super::lock(&manager.db_limit).clone();
    let mut excess = db_limit.map_or(0, |l| l.idle_excess());
    let removed = pool.inner.retain(|server, _| {
        let reason = if let Some(reason) = manager.unfit(server, &settings) {
            closable = closable.saturating_sub(1);
            reason
        } else if closable > 0 && excess > 0 {
            closable -= 1;
            excess -= 1;
            "max_idle_percent reached"
        } else if closable > 0 && idle_timeout.is_some_and(|t| server.idle_for() >= super::jittered(t, server.id().0)) {
            closable -= 1;
            "server_idle_timeout reached"
        } else {
            return true;
        };
        backend_event!(settings.log_connections, pool = %pool.name, server = %server.id(), pid = server.process_id(), reason, "closing idle backend");
        false
    });
    if !removed.removed.is_empty() {
        tracing::debug!(pool = %pool.name, closed = removed.removed.len(), "closed idle backends");
    }
}

/// Opens backends until the pool has `min_idle` open (those lent count). Borrows without
/// waiting, so it never takes a place in the queue from a client, and (under
/// [`super::FILLING`]) opens only where `max_db_connections` has a free place.
async fn fill_to_min_idle(pool: &Pool) -> Result<(), PoolError<crate::server::ServerError>> {
    let want = if pool.is_retired() {
        0
    } else {
        pool.settings().min_idle
    };
    if want == 0 || pool.inner.status().size >= want {
        return Ok(());
    }
    let no_wait = Timeouts {
        wait: Some(Duration::ZERO),
        create: None,
        recycle: None,
    };
    // Deadpool lends the idle ones first. Each backend, idle or new, is kept warm at once
    // (deadpool counts it lent, so the next get opens one rather than lend it again), for
    // clients to take while the rest open; one that cannot be goes back to deadpool at
    // once: a borrower waits in its queue (it is lent there), or the pool is pausing.
    let mut taken = 0;
    let mut result = Ok(());
    while pool.inner.status().size < want && taken < want {
        // A place under max_size first, as any borrower.
        let Some(place) = pool.gate.try_take() else {
            break;
        };
        match pool.inner.timeout_get(&no_wait).await {
            Ok(mut obj) => {
                taken += 1;
                obj.mark_idle_now();
                if let Err((obj, place)) = pool.warm.put(obj, Some(place)) {
                    // (The backend before its place.)
                    drop(obj);
                    drop(place);
                }
            }
            Err(PoolError::Timeout(_)) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    result
}

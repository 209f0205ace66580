//! The inventory's JSON views: `GET /api/v1/workers` (filtered, sorted, paged),
//! `GET /api/v1/workers/{name}` (with the hashrate history) and `DELETE /api/v1/workers/{name}`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::{DeleteError, Inventory, Snapshot, WorkerState};
use crate::submissions::RejectReason;

/// `limit` when none is given, and the most one page may hold.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A worker as the API shows it. Times are unix seconds (null for never), hashrates H/s.
#[derive(Debug, Serialize)]
pub struct WorkerJson {
    pub name: String,
    pub state: WorkerState,
    pub first_seen: Option<u64>,
    pub last_seen: Option<u64>,
    pub last_share: Option<u64>,
    pub address: Option<String>,
    pub pool: Option<String>,
    pub difficulty: Option<f64>,
    pub hashrate_10m: f64,
    pub hashrate_1h: f64,
    pub hashrate_24h: f64,
    /// The proxy's verdicts: shares that passed its checks, and those refused, by reason.
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by: BTreeMap<&'static str, u64>,
    /// Shares refused as stale (a job the pool had replaced), also in `rejected_by`.
    pub stale: u64,
    /// The pool's verdicts on the shares the proxy sent it.
    pub pool_accepted: u64,
    pub pool_rejected: u64,
    pub reconnects_24h: u64,
    /// Authorized sessions open now.
    pub sessions: u16,
}

impl From<&Snapshot> for WorkerJson {
    fn from(w: &Snapshot) -> Self {
        let time = |t: u32| (t > 0).then_some(u64::from(t));
        let by = |r: RejectReason| u64::from(w.rejected_by[r.local_index()]);
        WorkerJson {
            name: w.name.clone(),
            state: w.state,
            first_seen: time(w.first_seen),
            last_seen: time(w.last_seen),
            last_share: time(w.last_share),
            address: w.address.map(|a| a.to_string()),
            pool: w.pool.as_deref().map(str::to_owned),
            difficulty: (w.difficulty > 0.0).then_some(w.difficulty),
            hashrate_10m: w.hashrates[0],
            hashrate_1h: w.hashrates[1],
            hashrate_24h: w.hashrates[2],
            accepted: w.accepted,
            rejected: w.rejected(),
            rejected_by: RejectReason::LOCAL.iter().map(|&r| (r.as_str(), by(r))).collect(),
            stale: by(RejectReason::Stale),
            pool_accepted: w.pool_accepted,
            pool_rejected: w.pool_rejected,
            reconnects_24h: w.reconnects_24h,
            sessions: w.sessions,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Counts {
    pub online: usize,
    pub stale: usize,
    pub offline: usize,
    pub never_seen: usize,
}

impl Counts {
    pub fn of(counts: [usize; 4]) -> Self {
        Counts { online: counts[0], stale: counts[1], offline: counts[2], never_seen: counts[3] }
    }
}

#[derive(Debug, Serialize)]
pub struct Page {
    /// Workers matching the filters, over all pages.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    /// Every worker by state, whatever the filters.
    pub counts: Counts,
    pub workers: Vec<WorkerJson>,
}

#[derive(Debug, Serialize)]
pub struct Point {
    pub t: u64,
    pub hashrate: f64,
}

#[derive(Debug, Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub worker: WorkerJson,
    /// The last 24 hours, oldest first.
    pub history: Vec<Point>,
}

/// What a request may sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    Name,
    State,
    LastSeen,
    LastShare,
    Hashrate(usize),
    Accepted,
    Rejected,
    Reconnects,
}

impl Sort {
    fn parse(text: &str) -> Option<Sort> {
        Some(match text {
            "name" => Sort::Name,
            "state" => Sort::State,
            "last_seen" => Sort::LastSeen,
            "last_share" => Sort::LastShare,
            "hashrate_10m" => Sort::Hashrate(0),
            "hashrate_1h" => Sort::Hashrate(1),
            "hashrate_24h" => Sort::Hashrate(2),
            "accepted" => Sort::Accepted,
            "rejected" => Sort::Rejected,
            "reconnects_24h" => Sort::Reconnects,
            _ => return None,
        })
    }

    fn compare(self, a: &Snapshot, b: &Snapshot) -> Ordering {
        match self {
            Sort::Name => Ordering::Equal,
            Sort::State => a.state.cmp(&b.state),
            Sort::LastSeen => a.last_seen.cmp(&b.last_seen),
            Sort::LastShare => a.last_share.cmp(&b.last_share),
            Sort::Hashrate(i) => a.hashrates[i].total_cmp(&b.hashrates[i]),
            Sort::Accepted => a.accepted.cmp(&b.accepted),
            Sort::Rejected => a.rejected().cmp(&b.rejected()),
            Sort::Reconnects => a.reconnects_24h.cmp(&b.reconnects_24h),
        }
        .then_with(|| a.name.cmp(&b.name))
    }
}

/// A request the API refuses, as `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (self.0, Json(Body { error: self.1 })).into_response()
    }
}

fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// The list's filters and paging, checked.
struct ListQuery {
    states: Option<Vec<WorkerState>>,
    q: Option<String>,
    sort: Sort,
    descending: bool,
    limit: usize,
    offset: usize,
}

impl ListQuery {
    fn parse(params: &HashMap<String, String>) -> Result<Self, ApiError> {
        let number = |key: &str, default: usize| -> Result<usize, ApiError> {
            params.get(key).map_or(Ok(default), |v| {
                v.parse().map_err(|_| bad(format!("{key} must be a non-negative integer, not {v:?}")))
            })
        };
        let limit = number("limit", DEFAULT_LIMIT)?;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(bad(format!("limit must be 1 to {MAX_LIMIT}, not {limit}")));
        }
        let states = match params.get("state").filter(|s| !s.is_empty()) {
            None => None,
            Some(list) => Some(
                list.split(',')
                    .map(|s| {
                        WorkerState::parse(s.trim()).ok_or_else(|| {
                            bad(format!("unknown state {s:?}: expected online, stale, offline or never_seen"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let sort = match params.get("sort") {
            None => Sort::Name,
            Some(s) => Sort::parse(s).ok_or_else(|| bad(format!("unknown sort key {s:?}")))?,
        };
        let descending = match params.get("order").map(String::as_str) {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(o) => return Err(bad(format!("order must be asc or desc, not {o:?}"))),
        };
        let q = params.get("q").filter(|q| !q.is_empty()).map(|q| q.to_lowercase());
        Ok(ListQuery { states, q, sort, descending, limit, offset: number("offset", 0)? })
    }
}

/// Whether `name` contains `needle` (already lower-case), ignoring ASCII case, without allocating.
fn contains_ignore_case(name: &str, needle: &str) -> bool {
    let (name, needle) = (name.as_bytes(), needle.as_bytes());
    needle.is_empty() || name.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

pub async fn list(
    State(inventory): State<Arc<Inventory>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Page>, ApiError> {
    let query = ListQuery::parse(&params)?;
    let mut matching = inventory.select(|name, state| {
        query.states.as_ref().is_none_or(|states| states.contains(&state))
            && query.q.as_deref().is_none_or(|q| contains_ignore_case(name, q))
    });
    matching.sort_by(|a, b| {
        let order = query.sort.compare(a, b);
        if query.descending {
            order.reverse()
        } else {
            order
        }
    });
    let total = matching.len();
    let workers = matching.iter().skip(query.offset).take(query.limit).map(WorkerJson::from).collect();
    let counts = Counts::of(inventory.counts());
    Ok(Json(Page { total, offset: query.offset, limit: query.limit, counts, workers }))
}

fn unknown(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no worker named {name:?}"))
}

pub async fn one(State(inventory): State<Arc<Inventory>>, Path(name): Path<String>) -> Result<Json<Detail>, ApiError> {
    let worker = inventory.get(&name).ok_or_else(|| unknown(&name))?;
    let history = inventory.history(&name).await.into_iter().map(|(t, hashrate)| Point { t, hashrate }).collect();
    Ok(Json(Detail { worker: WorkerJson::from(&worker), history }))
}

pub async fn delete(State(inventory): State<Arc<Inventory>>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    match inventory.delete(&name) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(DeleteError::Unknown) => Err(unknown(&name)),
        Err(DeleteError::Online) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("worker {name:?} is online; only an offline worker can be forgotten"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_ignores_case() {
        assert!(contains_ignore_case("Farm.Rig12", "rig1"));
        assert!(contains_ignore_case("x", ""));
        assert!(!contains_ignore_case("rig", "rig1"));
    }

    #[test]
    fn queries_are_checked() {
        let q = |pairs: &[(&str, &str)]| {
            ListQuery::parse(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        let ok = q(&[("state", "online,stale"), ("sort", "hashrate_1h"), ("order", "desc"), ("limit", "1000")])
            .unwrap_or_else(|e| panic!("{}", e.1));
        assert_eq!(ok.states, Some(vec![WorkerState::Online, WorkerState::Stale]));
        assert_eq!((ok.sort, ok.descending, ok.limit, ok.offset), (Sort::Hashrate(1), true, 1000, 0));
        for bad in [
            &[("limit", "0")][..],
            &[("limit", "1001")],
            &[("limit", "-1")],
            &[("offset", "x")],
            &[("state", "gone")],
            &[("sort", "speed")],
            &[("order", "up")],
        ] {
            let e = q(bad).err().unwrap_or_else(|| panic!("{bad:?} passed"));
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
        }
    }
}

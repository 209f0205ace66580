//! What one POST says: a window's events one by one, or past `webhook_max_events` one summary,
//! each with a human-readable `text` that chat webhooks (Slack, Mattermost) show as the message.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use super::{Event, WorkerState};

/// The events of one window: the first `limit` kept whole, every one counted by transition.
/// Bounded by `limit` whatever arrives.
pub struct Batch {
    limit: usize,
    events: Vec<Event>,
    transitions: BTreeMap<(WorkerState, WorkerState), u64>,
    received: u64,
    /// Events lost before they reached the batch (the notifier's queue was full).
    dropped: u64,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Payload<'a> {
    WorkerEvents {
        text: String,
        events: &'a [Event],
    },
    WorkerSummary {
        text: String,
        /// Every change in the window, `dropped` included.
        total: u64,
        dropped: u64,
        transitions: Vec<Transition>,
        /// The first `limit` workers, in the order their changes came.
        workers: Vec<&'a str>,
    },
}

#[derive(Serialize)]
struct Transition {
    from: WorkerState,
    to: WorkerState,
    count: u64,
}

impl Batch {
    pub fn new(limit: usize) -> Self {
        Self { limit, events: Vec::new(), transitions: BTreeMap::new(), received: 0, dropped: 0 }
    }

    pub fn push(&mut self, event: Event) {
        self.received += 1;
        *self.transitions.entry((event.from, event.to)).or_default() += 1;
        if self.events.len() < self.limit {
            self.events.push(event);
        }
    }

    pub fn add_dropped(&mut self, dropped: u64) {
        self.dropped += dropped;
    }

    pub fn is_empty(&self) -> bool {
        self.received + self.dropped == 0
    }

    /// The changes that reached the batch.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Every change the batch stands for, those lost to a full queue included.
    pub fn total(&self) -> u64 {
        self.received + self.dropped
    }

    /// The JSON body: the events themselves when all of them fit, else a summary.
    pub fn to_json(&self) -> Vec<u8> {
        let payload = if self.dropped == 0 && self.received <= self.limit as u64 {
            Payload::WorkerEvents { text: self.events_text(), events: &self.events }
        } else {
            let mut transitions: Vec<_> =
                self.transitions.iter().map(|(&(from, to), &count)| Transition { from, to, count }).collect();
            transitions.sort_by_key(|t| std::cmp::Reverse(t.count));
            Payload::WorkerSummary {
                text: self.summary_text(&transitions),
                total: self.total(),
                dropped: self.dropped,
                transitions,
                workers: self.events.iter().map(|e| e.worker.as_str()).collect(),
            }
        };
        serde_json::to_vec(&payload).expect("a payload serializes")
    }

    fn events_text(&self) -> String {
        let mut text = format!("loka-stratum: {}", changes(self.received));
        for e in &self.events {
            let _ = write!(text, "\n{}: {} → {} at {}", shown(&e.worker), e.from, e.to, rfc3339(e.at));
            if let Some(address) = e.address {
                let _ = write!(text, " from {address}");
            }
            if let Some(pool) = &e.pool {
                let _ = write!(text, " on {pool}");
            }
        }
        text
    }

    fn summary_text(&self, transitions: &[Transition]) -> String {
        let counts: Vec<_> = transitions.iter().map(|t| format!("{} {} → {}", t.count, t.from, t.to)).collect();
        let mut text = format!("loka-stratum: {}: {}", changes(self.total()), counts.join(", "));
        if self.dropped > 0 {
            let _ = write!(text, ", and {} not itemised (the notifier's queue was full)", self.dropped);
        }
        let names: Vec<_> = self.events.iter().map(|e| shown(&e.worker)).collect();
        let _ = write!(text, ".\nWorkers: {}", names.join(", "));
        if self.received > names.len() as u64 {
            let _ = write!(text, " and {} more", self.received - names.len() as u64);
        }
        text
    }
}

/// Longest worker name the `text` shows; the JSON fields carry it whole.
const SHOWN_NAME: usize = 64;

/// A worker name as the `text` shows it. Names come from miners, and chat services act on markup
/// in the text: `<!channel>` in Slack, `@everyone` in Discord, `@all` in Mattermost. So only
/// letters, digits and `._-:` are shown, anything else as `_`, and at most [`SHOWN_NAME`] of them.
fn shown(name: &str) -> String {
    let mut shown: String = name
        .chars()
        .take(SHOWN_NAME)
        .map(|c| if c.is_alphanumeric() || "._-:".contains(c) { c } else { '_' })
        .collect();
    if name.chars().nth(SHOWN_NAME).is_some() {
        shown.push('…');
    }
    shown
}

fn changes(n: u64) -> String {
    format!("{n} worker state change{}", if n == 1 { "" } else { "s" })
}

/// Serializes a time as RFC 3339 in UTC.
pub(crate) fn serialize_time<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*at))
}

/// `2026-11-30T07:55:00Z`, to the second; times before 1970 are shown as 1970.
pub fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3_600, rest % 3_600 / 60, rest % 60)
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::*;

    fn event(worker: &str, from: WorkerState, to: WorkerState) -> Event {
        Event {
            worker: worker.into(),
            from,
            to,
            at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            address: Some("10.0.0.7".parse().unwrap()),
            pool: Some("pool.example.com:3333".into()),
        }
    }

    fn json(batch: &Batch) -> Value {
        serde_json::from_slice(&batch.to_json()).unwrap()
    }

    #[test]
    fn times() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), text);
        }
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00Z");
        // Against httpdate's own calendar, a day and a bit at a time across a few centuries.
        for secs in (0..10_000_000_000u64).step_by(90_061 * 997) {
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            let back = httpdate::parse_http_date(&httpdate::fmt_http_date(at)).unwrap();
            assert_eq!(back, at);
            let ours = rfc3339(at);
            let date = httpdate::fmt_http_date(at);
            // "Tue, 14 Nov 2023 22:13:20 GMT"
            let parts: Vec<_> = date.split([' ', ',']).filter(|s| !s.is_empty()).collect();
            let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
                .iter()
                .position(|m| *m == parts[2])
                .unwrap()
                + 1;
            assert_eq!(ours, format!("{}-{month:02}-{}T{}Z", parts[3], parts[1], parts[4]), "{secs}");
        }
    }

    #[test]
    fn names_in_the_text_carry_no_markup() {
        assert_eq!(shown("wallet.rig-01:a"), "wallet.rig-01:a");
        assert_eq!(shown("<!channel> @everyone\n*x*"), "__channel___everyone__x_");
        let long = "w".repeat(100);
        assert_eq!(shown(&long), format!("{}…", &long[..64]));
        let mut batch = Batch::new(1);
        batch.push(event("<!here>", WorkerState::Online, WorkerState::Offline));
        let v = json(&batch);
        assert!(v["text"].as_str().unwrap().contains("\n__here_: online → offline"), "{v}");
        assert_eq!(v["events"][0]["worker"], "<!here>", "the JSON keeps the name as it is");
        batch.push(event("@all", WorkerState::Online, WorkerState::Offline));
        assert!(json(&batch)["text"].as_str().unwrap().ends_with("Workers: __here_ and 1 more"));
    }

    #[test]
    fn events_one_by_one() {
        let mut batch = Batch::new(3);
        assert!(batch.is_empty());
        batch.push(event("farm.a", WorkerState::Online, WorkerState::Offline));
        batch.push(Event { address: None, pool: None, ..event("farm.b", WorkerState::Stale, WorkerState::Online) });
        let v = json(&batch);
        assert_eq!(v["type"], "worker_events");
        assert_eq!(
            v["events"],
            json!([
                {"worker": "farm.a", "from": "online", "to": "offline", "at": "2023-11-14T22:13:20Z",
                 "address": "10.0.0.7", "pool": "pool.example.com:3333"},
                {"worker": "farm.b", "from": "stale", "to": "online", "at": "2023-11-14T22:13:20Z",
                 "address": null, "pool": null},
            ])
        );
        assert_eq!(
            v["text"],
            "loka-stratum: 2 worker state changes\n\
             farm.a: online → offline at 2023-11-14T22:13:20Z from 10.0.0.7 on pool.example.com:3333\n\
             farm.b: stale → online at 2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn past_the_limit_a_summary() {
        let mut batch = Batch::new(3);
        for i in 0..3_000 {
            let to = if i % 100 == 0 { WorkerState::Stale } else { WorkerState::Offline };
            batch.push(event(&format!("w{i}"), WorkerState::Online, to));
        }
        batch.push(event("back", WorkerState::Offline, WorkerState::Online));
        let v = json(&batch);
        assert_eq!(v["type"], "worker_summary");
        assert_eq!((v["total"].as_u64(), v["dropped"].as_u64()), (Some(3_001), Some(0)));
        assert_eq!(
            v["transitions"],
            json!([
                {"from": "online", "to": "offline", "count": 2_970},
                {"from": "online", "to": "stale", "count": 30},
                {"from": "offline", "to": "online", "count": 1},
            ])
        );
        assert_eq!(v["workers"], json!(["w0", "w1", "w2"]));
        assert_eq!(
            v["text"],
            "loka-stratum: 3001 worker state changes: 2970 online → offline, 30 online → stale, \
             1 offline → online.\nWorkers: w0, w1, w2 and 2998 more"
        );
        assert!(batch.events.len() == 3, "the batch keeps only what a summary names");
    }

    /// Events lost to a full queue cannot be listed, so the POST is a summary that says so.
    #[test]
    fn dropped_events_make_a_summary() {
        let mut batch = Batch::new(20);
        batch.push(event("farm.a", WorkerState::Online, WorkerState::Offline));
        batch.add_dropped(5);
        assert_eq!(batch.total(), 6);
        let v = json(&batch);
        assert_eq!(
            (v["type"].as_str(), v["total"].as_u64(), v["dropped"].as_u64()),
            (Some("worker_summary"), Some(6), Some(5))
        );
        assert_eq!(
            v["text"],
            "loka-stratum: 6 worker state changes: 1 online → offline, and 5 not itemised (the notifier's \
             queue was full).\nWorkers: farm.a"
        );
    }
}

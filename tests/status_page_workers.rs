//! The status page's worker view against a farm of 2,000 real miner connections in aggregate
//! mode, of which 50 have left and 5 never send a share: the offline/stale panel, the paged
//! table and its filter, and a worker's detail with its chart, in a real headless browser.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::browser::{dump_dom, screenshot, section};
use support::*;
use tokio_util::sync::CancellationToken;

const RIGS: usize = 1994;
const HOSTILE_WORKER: &str = "farm.<img src=x id=injected>";
/// Short, so that the idle miners go stale within the test; the others send a share every
/// second or so to stay online.
const STALE_AFTER: u64 = 10;
/// Miners handshaking at once.
const CONCURRENCY: usize = 64;

fn rig(i: usize) -> String {
    format!("farm.rig{i:04}")
}

/// The 50 rigs that leave: every 39th.
fn offline() -> Vec<String> {
    (1..=50).map(|k| rig(39 * k)).collect()
}

fn idle() -> Vec<String> {
    (1..=5).map(|i| format!("farm.idle{i}")).collect()
}

async fn get_json(proxy: &Proxy, path: &str) -> Value {
    let (status, body) = proxy.http_get(path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Connects and authorizes a miner for each name, `CONCURRENCY` at a time; with `share`, each
/// also has one share accepted.
async fn connect_all(proxy: &Proxy, names: Vec<String>, share: bool) -> Vec<(String, SimMiner)> {
    let addr = proxy.addr;
    futures::stream::iter(names)
        .map(|name| async move {
            let mut miner = SimMiner::connect(addr).await;
            miner.handshake(&name).await;
            if share {
                submit_one(&name, &mut miner).await;
            }
            (name, miner)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

async fn submit_one(name: &str, miner: &mut SimMiner) {
    let share = miner.any_share();
    let id = miner.submit(name, &share).await;
    let reply = miner.wait_reply(&id).await.expect("a submit reply");
    assert_eq!(reply["result"], json!(true), "{name}: {reply}");
}

/// The texts of the worker links (`<a class="worker" …>NAME</a>`) in `html`, in order.
fn worker_links(html: &str) -> Vec<&str> {
    html.split("<a class=\"worker\"")
        .skip(1)
        .map(|rest| {
            let text = &rest[rest.find('>').expect("the tag ends") + 1..];
            &text[..text.find("</a>").expect("the link ends")]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_view_of_a_farm_in_a_browser() {
    let began = Instant::now();
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(Mode::Aggregate, pool.addr);
    config.inventory.worker_stale_after = STALE_AFTER;
    config.inventory.worker_offline_after = 1;
    config.inventory.flush_interval = 1;
    config.inventory.history_interval = 2;
    let proxy = spawn_proxy(config).await;

    // The idle miners first: they go stale while the rest keep sending shares.
    let idle_miners = connect_all(&proxy, idle(), false).await;
    let leaving = offline();
    let names: Vec<String> = (1..=RIGS).map(rig).chain([HOSTILE_WORKER.to_owned()]).collect();
    let mut online = connect_all(&proxy, names, true).await;
    let connected = began.elapsed();
    online.retain(|(name, _)| !leaving.contains(name));
    assert_eq!(online.len() + leaving.len() + idle_miners.len(), 2000);

    let stop = CancellationToken::new();
    let keeper = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                futures::stream::iter(online.iter_mut())
                    .for_each_concurrent(CONCURRENCY, |(name, miner)| submit_one(name, miner))
                    .await;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            online
        }
    });

    let expected = json!({"online": 1945, "stale": 5, "offline": 50, "never_seen": 0});
    let settled = eventually(Duration::from_secs(STALE_AFTER + 20), || async {
        get_json(&proxy, "/api/v1/summary").await["worker_states"] == expected
    })
    .await;
    assert!(settled, "{}", get_json(&proxy, "/api/v1/summary").await);
    // A point of history every 2 s: a few for the chart.
    let detail_path = format!("/api/v1/workers/{}", urlencoding(HOSTILE_WORKER));
    assert!(
        eventually(WAIT, || async { get_json(&proxy, &detail_path).await["history"].as_array().unwrap().len() >= 3 })
            .await
    );
    let settled_at = began.elapsed();

    let base = format!("http://{}/", proxy.http);
    let dom = dump_dom(&base).await;
    assert!(!dom.contains("id=\"injected\""), "a worker name became markup");

    // The panel at the top: the counts, and every offline and stale worker by name.
    let attention = section(&dom, "attention");
    assert!(dom.find("<section id=\"attention\"") < dom.find("<section id=\"totals\""), "the panel is first");
    for (state, count) in [("online", "1,945"), ("stale", "5"), ("offline", "50"), ("never_seen", "0")] {
        assert!(attention.contains(&format!("id=\"c-{state}\">{count}<")), "{state} {count}:\n{attention}");
    }
    let mut listed = worker_links(attention);
    listed.sort_unstable();
    let mut expected_names: Vec<String> = leaving.iter().cloned().chain(idle()).collect();
    expected_names.sort_unstable();
    assert_eq!(listed, expected_names);
    assert_eq!(attention.matches("class=\"badge offline\"").count(), 50, "{attention}");
    assert_eq!(attention.matches("class=\"badge stale\"").count(), 5, "{attention}");
    assert!(attention.contains("id=\"attention-more\" hidden"), "55 fit in the panel:\n{attention}");
    // Most recently seen first: the stale, still connected, before those that left.
    assert!(idle().iter().all(|n| listed_position(attention, n) < listed_position(attention, &rig(39))));

    // The table: the first page of 50, by name, out of 2,000.
    let workers = section(&dom, "workers");
    assert!(workers.contains("1–50 of 2,000 workers"), "{workers}");
    let page: Vec<String> = worker_links(workers).into_iter().map(str::to_owned).collect();
    let mut first: Vec<String> = [HOSTILE_WORKER.replace('<', "&lt;").replace('>', "&gt;")]
        .into_iter()
        .chain(idle())
        .chain((1..=44).map(rig))
        .collect();
    first.truncate(50);
    assert_eq!(page, first);
    // The per-session table is capped.
    let connections = section(&dom, "connections");
    assert_eq!(connections.matches("<tr>").count(), 201, "a header and 200 rows");
    assert!(connections.contains("1,750 more connections not shown"), "{connections}");

    // The filter, from the address as the filter box writes it.
    let dom = dump_dom(&format!("{base}#q=rig01")).await;
    let workers = section(&dom, "workers");
    assert!(workers.contains("1–50 of 100 matching"), "{workers}");
    let page = worker_links(workers);
    assert_eq!(page.len(), 50);
    assert!(page.iter().all(|n| n.contains("rig01")), "{page:?}");
    let dom = dump_dom(&format!("{base}#q=RIG01&state=offline&sort=name&order=desc")).await;
    let workers = section(&dom, "workers");
    assert!(workers.contains("1–3 of 3 matching"), "{workers}");
    assert_eq!(worker_links(workers), ["farm.rig0195", "farm.rig0156", "farm.rig0117"]);

    // A worker's detail, the hostile one: its name as text, its chart drawn from its points.
    let deep_link = format!("{base}#worker={}", urlencoding(HOSTILE_WORKER));
    let dom = dump_dom(&deep_link).await;
    assert!(!dom.contains("id=\"injected\""), "a worker name became markup");
    let detail = section(&dom, "worker-detail");
    assert!(!detail.contains("<section id=\"worker-detail\" hidden"), "{detail}");
    assert!(detail.contains("id=\"d-name\">farm.&lt;img src=x id=injected&gt;<"), "{detail}");
    assert!(detail.contains("class=\"badge online\""), "{detail}");
    let chart = &detail[detail.find("id=\"worker-chart\"").expect("the chart")..];
    let points = chart.split("<polyline").nth(1).expect("a line in the chart");
    let points = &points[points.find("points=\"").unwrap() + 8..];
    let points = &points[..points.find('"').unwrap()];
    assert!(points.split(' ').count() >= 3, "{points}");
    for label in ["Accepted", "Rejected", "Stale", "Pool accepted / rejected", "Reconnects 24 h", "Difficulty"] {
        assert!(detail.contains(&format!("<dt>{label}</dt>")), "{label} missing:\n{detail}");
    }

    let png = screenshot(&format!("{base}#worker=farm.rig0001&q=rig00"), "status-page-workers.png", 1280, 2600).await;
    let checked = began.elapsed();
    eprintln!(
        "2,000 miners connected in {connected:?}, states settled at {settled_at:?}, page checked at {checked:?}; \
         screenshot {}",
        png.display()
    );

    stop.cancel();
    let online = keeper.await.expect("the keeper");
    drop((online, idle_miners));
    proxy.shutdown().await;
}

fn listed_position(html: &str, name: &str) -> usize {
    html.find(&format!(">{name}</a>")).unwrap_or_else(|| panic!("{name} is not listed"))
}

/// `name` as one path segment or fragment value.
fn urlencoding(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

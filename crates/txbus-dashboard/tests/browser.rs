//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! against the running example. The pages render; a browser without credentials gets nothing
//! (its requests are answered 401); a dead letter is replayed by clicking and its delivery then
//! succeeds; a read-only user cannot replay. Screenshots of every page are
//! saved (to `docs/` when `TXBUS_SCREENSHOTS=docs`, else to the target's temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{start, HANG, OPERATOR_PASSWORD, VIEWER_PASSWORD};
use fantoccini::{Client, ClientBuilder, Locator};
use txbus_core::inspect::DeliveryStatus;
use txbus_core::store::DeadLetterQuery;

struct Driver {
    child: tokio::process::Child,
    port: u16,
    _profile: tempfile::TempDir,
}

async fn chromedriver() -> Driver {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver is installed (Debian package chromium-driver; .ci/run installs it)");
    tokio::time::timeout(HANG, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("chromedriver listens");
    Driver {
        child,
        port,
        _profile: tempfile::tempdir().unwrap(),
    }
}

async fn browser(driver: &Driver) -> Client {
    let profile = tempfile::tempdir().unwrap().keep();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session");
    client.set_window_size(1400, 1000).await.unwrap();
    client
}

fn shots_dir() -> PathBuf {
    let dir = if std::env::var("TXBUS_SCREENSHOTS").as_deref() == Ok("docs") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(shots_dir().join(format!("dashboard-{name}.png")), png).unwrap();
}

/// Waits until `locator` is on the page, reloading it while not.
async fn find(client: &Client, css: &str) -> fantoccini::elements::Element {
    tokio::time::timeout(HANG, async {
        loop {
            if let Ok(e) = client.find(Locator::Css(css)).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{css} never appeared"))
}

/// The text of the page's main part, lowercased (headings are shown in capitals).
async fn text(client: &Client) -> String {
    text_of(client, "main").await
}

/// The text of the first element matching `css`, lowercased.
async fn text_of(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let s = start().await;
    let driver = chromedriver().await;
    let base = |user: &str, password: &str| {
        format!(
            "http://{user}:{}@{}/admin/queues",
            password.replace(' ', "%20").replace(',', "%2C"),
            s.addr
        )
    };
    let op = base("operator", OPERATOR_PASSWORD);
    let client = browser(&driver).await;

    // The overview: handlers with their counts, the live region filled by the stream.
    client.goto(&op).await.unwrap();
    find(&client, "#overview[data-updated]").await;
    let overview = text(&client).await;
    for expect in [
        "handlers",
        "warehouse",
        "billing",
        "mailer",
        "dead letters",
        "throughput",
    ] {
        assert!(
            overview.contains(expect),
            "the overview shows {expect:?}: {overview}"
        );
    }
    shot(&client, "overview").await;

    // A browser without credentials (a session of its own) gets nothing of the dashboard:
    // headless Chromium, which cannot ask anyone for a password, shows an error page.
    let anonymous = browser(&driver).await;
    anonymous
        .goto(&format!("http://{}/admin/queues", s.addr))
        .await
        .unwrap();
    let shown = anonymous
        .execute(
            "return location.href + '\\n' + document.documentElement.outerHTML;",
            vec![],
        )
        .await
        .unwrap();
    let shown = shown.as_str().unwrap_or_default().to_lowercase();
    for private in [
        "warehouse",
        "billing",
        "dead letters",
        "order.placed",
        "<main",
    ] {
        assert!(
            !shown.contains(private),
            "{private:?} shown to anyone: {shown}"
        );
    }
    assert!(anonymous.find(Locator::Css("main")).await.is_err());
    // From the service's public page, what a script fetches without credentials is refused
    // with 401 and a basic-auth challenge.
    anonymous
        .goto(&format!("http://{}/", s.addr))
        .await
        .unwrap();
    assert!(text_of(&anonymous, "body").await.contains("orders service"));
    let refused = anonymous
        .execute_async(
            r#"const done = arguments[0];
               const base = location.origin + '/admin/queues';
               Promise.all(['', '/operations', '/live/overview', '/dead-letters'].map(p =>
                   fetch(base + p, { credentials: 'omit' }).then(async r =>
                       [p, r.status, r.headers.get('www-authenticate'), await r.text()])))
                 .then(done, e => done('fetch failed: ' + e));"#,
            vec![],
        )
        .await
        .unwrap();
    let refused = refused.as_array().unwrap_or_else(|| panic!("{refused}"));
    assert_eq!(refused.len(), 4);
    for r in refused {
        assert_eq!(r[1], serde_json::json!(401), "{r}");
        assert!(
            r[2].as_str().unwrap_or_default().starts_with("Basic"),
            "{r}"
        );
        let body = r[3].as_str().unwrap();
        assert!(body.contains("credentials required"), "{r}");
        assert!(!body.contains("warehouse"), "{r}");
    }
    anonymous.close().await.unwrap();

    // Operations, and one failed operation as a tree.
    client
        .goto(&format!("{op}/operations?status=failed"))
        .await
        .unwrap();
    let list = text(&client).await;
    assert!(list.contains("card declined"), "{list}");
    shot(&client, "operations").await;
    client
        .find(Locator::Css("main table tbody tr td a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    find(&client, ".event").await;
    let tree = text(&client).await;
    assert!(
        tree.contains("operation failed") && tree.contains("mailer") && tree.contains("succeeded"),
        "{tree}"
    );
    shot(&client, "operation").await;

    // Dead letters: the warehouse's, with their error.
    client.goto(&format!("{op}/dead-letters")).await.unwrap();
    let page = text(&client).await;
    assert!(page.contains("connection refused"), "{page}");
    shot(&client, "dead-letters").await;
    let dead = s
        .demo
        .bus
        .dead_letters(DeadLetterQuery {
            limit: 100,
            ..DeadLetterQuery::default()
        })
        .await
        .unwrap();
    assert!(dead.len() >= 2, "{dead:?}");
    let target = dead[0].clone();
    client
        .goto(&format!("{op}/dead-letters/{}", target.delivery_id))
        .await
        .unwrap();
    let detail = text(&client).await;
    assert!(
        detail.contains("\"fragile\": true"),
        "the payload is shown: {detail}"
    );
    shot(&client, "dead-letter").await;

    // A read-only user sees no replay button and is refused when it posts anyway.
    let viewer = browser(&driver).await;
    viewer
        .goto(&format!("{}/dead-letters", base("viewer", VIEWER_PASSWORD)))
        .await
        .unwrap();
    find(&viewer, "#dead-letters").await;
    assert!(viewer.find(Locator::Css("#replay-selected")).await.is_err());
    let status = viewer
        .execute_async(
            r#"const [id, done] = arguments;
               const csrf = document.querySelector('input[name=csrf]').value;
               const url = location.origin + location.pathname + '/replay';
               fetch(url, { method: 'POST', credentials: 'include',
                     headers: {'content-type': 'application/x-www-form-urlencoded'},
                     body: 'csrf=' + encodeURIComponent(csrf) + '&id=' + id })
                 .then(r => done(r.status), e => done('fetch failed: ' + e));"#,
            vec![serde_json::json!(target.delivery_id)],
        )
        .await
        .unwrap();
    assert_eq!(status, serde_json::json!(403), "a viewer cannot replay");
    assert!(
        s.demo
            .bus
            .inspect()
            .dead_letter(target.delivery_id)
            .await
            .is_ok(),
        "still a dead letter"
    );
    viewer.close().await.unwrap();

    // The operator heals the warehouse, ticks the dead letter and clicks "Replay selected".
    s.demo
        .healed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    client.goto(&format!("{op}/dead-letters")).await.unwrap();
    client
        .find(Locator::Css(&format!(
            "input[name=id][value=\"{}\"]",
            target.delivery_id
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .find(Locator::Css("#replay-selected"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let done = find(&client, "#done").await.text().await.unwrap();
    assert!(
        done.to_lowercase()
            .contains("1 of 1 dead letter(s) replayed"),
        "{done}"
    );
    // Its delivery then succeeds.
    let tree = tokio::time::timeout(HANG, async {
        loop {
            let tree = s
                .demo
                .bus
                .inspect()
                .operation(target.operation_id)
                .await
                .unwrap()
                .unwrap();
            let d = tree.events[target.message_index as usize]
                .deliveries
                .iter()
                .find(|d| d.delivery_id == target.delivery_id)
                .cloned()
                .unwrap();
            if d.status == DeliveryStatus::Succeeded {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the replayed delivery succeeds");
    assert_eq!(tree.attempts, 1);
    client
        .goto(&format!("{op}/operations/{}", target.operation_id))
        .await
        .unwrap();
    let page = text(&client).await;
    assert!(
        page.contains("warehouse") && page.contains("succeeded"),
        "{page}"
    );

    // The action is in the audit trail, with who did it.
    client.goto(&format!("{op}/audit")).await.unwrap();
    let audit = text(&client).await;
    assert!(
        audit.contains("operator") && audit.contains("replay"),
        "{audit}"
    );
    assert!(audit.contains(&target.delivery_id.to_string()), "{audit}");
    shot(&client, "audit").await;

    // The other pages render.
    for (path, name, expect) in [
        ("/sagas?status=completed", "sagas", "order-fulfilment"),
        ("/subscriptions", "subscriptions", "head of the log"),
        ("/log", "log", "order.placed"),
        ("/log/verify", "verify", "every commit verified"),
    ] {
        client.goto(&format!("{op}{path}")).await.unwrap();
        let page = text(&client).await;
        assert!(page.contains(expect), "{path}: {page}");
        shot(&client, name).await;
    }
    client
        .find(Locator::Css("main table tbody tr td a"))
        .await
        .ok();
    client
        .goto(&format!("{op}/sagas?status=completed"))
        .await
        .unwrap();
    client
        .find(Locator::Css("main table tbody tr td a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let history = text(&client).await;
    assert!(
        history.contains("step-completed") || history.contains("completed"),
        "{history}"
    );

    client.close().await.unwrap();
    let mut child = driver.child;
    let _ = child.kill().await;
    s.demo.bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

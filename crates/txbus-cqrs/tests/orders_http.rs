//! The `orders` example over real HTTP, served in-process on loopback with its SQLite file in
//! a temporary directory: create, add items, the 101st item refused by the aggregate's
//! invariant, idempotent POSTs, and queries answered from the projection through the cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../examples/orders/app.rs"]
mod app;
#[path = "../examples/orders/commands.rs"]
mod commands;
#[path = "../examples/orders/domain.rs"]
mod domain;
#[path = "../examples/orders/read_model.rs"]
mod read_model;

use std::net::SocketAddr;
use std::time::Duration;

use common::{within, Reply, Request};
use serde_json::{json, Value};
use tokio::net::TcpListener;

struct Server {
    addr: SocketAddr,
    app: app::App,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let app = app::build(&dir.path().join("orders.db")).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app.router.clone();
        let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            addr,
            app,
            task,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, body: Value, key: Option<&str>) -> Reply {
        let body = body.to_string();
        let mut request = Request::new("POST", path).body(body.as_bytes());
        if let Some(key) = key {
            request = request.key(key);
        }
        request.send(self.addr).await
    }

    async fn get(&self, path: &str) -> Reply {
        Request::new("GET", path).send(self.addr).await
    }

    /// Waits until the projection has seen every commit made so far.
    async fn caught_up(&self) {
        within(self.app.projection.catch_up()).await.unwrap();
    }

    async fn create(&self, customer: &str) -> String {
        let reply = self
            .post("/orders", json!({ "customer": customer }), None)
            .await;
        assert_eq!(reply.status, 201, "{reply:?}");
        reply.json()["id"].as_str().unwrap().to_owned()
    }

    async fn stop(self) {
        self.task.abort();
        within(self.app.projection.stop()).await.unwrap();
        within(self.app.bus.shutdown(Duration::from_secs(5)))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_takes_100_items_and_refuses_the_101st() {
    let s = Server::start().await;
    let reply = s.post("/orders", json!({ "customer": "ada" }), None).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let created = reply.json();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        reply.header("location"),
        Some(format!("/orders/{id}").as_str())
    );
    assert_eq!(created["version"], 1);

    for n in 1..=100 {
        let reply = s
            .post(
                &format!("/orders/{id}/items"),
                json!({ "sku": format!("sku-{n}"), "quantity": 1 }),
                None,
            )
            .await;
        assert_eq!(reply.status, 201, "item {n}: {reply:?}");
        assert_eq!(reply.json()["item_count"], n);
    }
    let refused = s
        .post(
            &format!("/orders/{id}/items"),
            json!({ "sku": "one-too-many", "quantity": 1 }),
            None,
        )
        .await;
    assert_eq!(refused.status, 422, "{refused:?}");
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "too_many_items");
    assert_eq!(error["message"], "an order holds at most 100 items");

    // Nothing of the refused command was written: the read model shows 100 items, version 101.
    s.caught_up().await;
    let order = s.get(&format!("/orders/{id}")).await;
    assert_eq!(order.status, 200, "{order:?}");
    let order = order.json();
    assert_eq!(order["customer"], "ada");
    assert_eq!(order["items"].as_array().unwrap().len(), 100);
    assert_eq!(
        order["items"][99],
        json!({ "sku": "sku-100", "quantity": 1 })
    );
    assert_eq!(order["version"], 101);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_post_with_the_same_key_runs_once() {
    let s = Server::start().await;
    let first = s
        .post("/orders", json!({ "customer": "bob" }), Some("create-bob"))
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let again = s
        .post("/orders", json!({ "customer": "bob" }), Some("create-bob"))
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        again.json(),
        first.json(),
        "the same order, not a second one"
    );
    let id = first.json()["id"].as_str().unwrap().to_owned();

    let path = format!("/orders/{id}/items");
    let item = json!({ "sku": "A1", "quantity": 3 });
    let added = s.post(&path, item.clone(), Some("add-a1")).await;
    let repeat = s.post(&path, item, Some("add-a1")).await;
    assert_eq!(added.status, 201);
    assert_eq!(repeat.header("idempotent-replayed"), Some("true"));
    assert_eq!(repeat.json(), added.json());
    let misuse = s
        .post(&path, json!({ "sku": "B2", "quantity": 1 }), Some("add-a1"))
        .await;
    assert_eq!(misuse.status, 422);
    assert_eq!(misuse.json()["error"]["code"], "idempotency_key_reused");

    s.caught_up().await;
    let list = s.get("/orders").await.json();
    assert_eq!(list["orders"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["orders"][0]["item_count"], 1);
    let order = s.get(&format!("/orders/{id}")).await.json();
    assert_eq!(order["items"], json!([{ "sku": "A1", "quantity": 3 }]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_cached_until_the_projection_moves_on() {
    let s = Server::start().await;
    let id = s.create("cy").await;
    s.caught_up().await;
    let path = format!("/orders/{id}");
    let first = s.get(&path).await;
    assert_eq!(first.json()["items"], json!([]));
    let hits = s.app.queries.cache_stats().hits;
    let second = s.get(&path).await;
    assert_eq!(second.body, first.body);
    assert_eq!(
        s.app.queries.cache_stats().hits,
        hits + 1,
        "served from the cache"
    );

    let added = s
        .post(
            &format!("{path}/items"),
            json!({ "sku": "C3", "quantity": 1 }),
            None,
        )
        .await;
    assert_eq!(added.status, 201);
    s.caught_up().await;
    // The projection moved: the cached view is no longer served.
    let after = s.get(&path).await.json();
    assert_eq!(after["items"], json!([{ "sku": "C3", "quantity": 1 }]));
    assert_eq!(after["version"], 2);

    // Lists page through orders in creation order.
    let second_id = s.create("dee").await;
    s.caught_up().await;
    let page = s.get("/orders?limit=1").await.json();
    assert_eq!(page["orders"].as_array().unwrap().len(), 1);
    assert_eq!(page["orders"][0]["id"], id.as_str());
    let next = s.get(&format!("/orders?limit=1&after={id}")).await.json();
    assert_eq!(next["orders"][0]["id"], second_id.as_str());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let s = Server::start().await;
    let unknown = s
        .post(
            "/orders/no-such-order/items",
            json!({ "sku": "A", "quantity": 1 }),
            None,
        )
        .await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.json()["error"]["code"], "order_not_found");
    assert_eq!(s.get("/orders/no-such-order").await.status, 404);

    let id = s.create("eve").await;
    let zero = s
        .post(
            &format!("/orders/{id}/items"),
            json!({ "sku": "A", "quantity": 0 }),
            None,
        )
        .await;
    assert_eq!(zero.status, 400, "{zero:?}");
    assert_eq!(zero.json()["error"]["code"], "invalid");
    assert!(zero.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at least 1"));

    let empty = s.post("/orders", json!({ "customer": " " }), None).await;
    assert_eq!(empty.status, 400, "{empty:?}");
    assert_eq!(s.get("/orders?limit=1000").await.status, 400);
    s.stop().await;
}

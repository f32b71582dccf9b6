//! How many connections an agent opens to a real kube-apiserver while it watches.
//!
//! An engaged agent holds four watches (its Node, the lock Leases, the policy ConfigMap, the
//! lock holders' Nodes) and makes requests beside them. kube-rs 5 builds an HTTP/1.1 client,
//! where each open watch holds a TCP (and TLS) connection of its own; `kreboot::connect::client`
//! offers HTTP/2, so everything shares one. At 5,000 nodes that is the difference between
//! about 5,000 and 20,000–30,000 connections into kube-apiserver (and its file descriptors).
//! The count is read from this process's own sockets (`/proc/self/fd` against
//! `/proc/self/net/tcp*`), so kube-controller-manager's connections are not in it.

mod common;

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Node},
};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

use common::real::{ADMIN_TOKEN, ControlPlane, Options};

/// This process's sockets (inodes).
fn own_socket_inodes() -> BTreeSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Established TCP connections of this process to `port`.
fn connections_to(port: u16) -> usize {
    let own = own_socket_inodes();
    let mut count = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(rem), Some(st), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
                continue;
            };
            let rem_port = rem
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let established = *st == "01";
            if established && rem_port == Some(port) && inode.parse::<u64>().is_ok_and(|i| own.contains(&i)) {
                count += 1;
            }
        }
    }
    count
}

/// Runs a watch of `api`, saying on `listed` each time it has listed.
fn watch_until_listed<K>(
    api: Api<K>,
    cfg: watcher::Config,
    listed: tokio::sync::mpsc::Sender<()>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let stream = watcher(api, cfg).default_backoff();
        futures::pin_mut!(stream);
        while let Some(e) = stream.next().await {
            if matches!(e, Ok(watcher::Event::InitDone)) {
                let _ = listed.send(()).await;
            }
        }
    })
}

/// Opens the agent's four watches with `client` and a GET beside them, and counts the
/// connections to kube-apiserver once every watch has listed.
async fn connections_while_watching(client: kube::Client, port: u16) -> usize {
    let (listed_tx, mut listed_rx) = tokio::sync::mpsc::channel::<()>(8);
    let tasks = vec![
        watch_until_listed(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields("metadata.name=n0"),
            listed_tx.clone(),
        ),
        watch_until_listed(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels("kreboot.io/lock-holder=true"),
            listed_tx.clone(),
        ),
        watch_until_listed(
            Api::<Lease>::namespaced(client.clone(), "default"),
            watcher::Config::default(),
            listed_tx.clone(),
        ),
        watch_until_listed(
            Api::<ConfigMap>::namespaced(client.clone(), "default"),
            watcher::Config::default(),
            listed_tx,
        ),
    ];
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(30), listed_rx.recv())
            .await
            .expect("every watch lists within 30 s");
    }
    // A request beside the open watches.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.list(&Default::default()).await.expect("list nodes");
    let count = connections_to(port);
    for t in tasks {
        t.abort();
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_shares_one_connection_among_its_watches() {
    let cp = ControlPlane::start(Options {
        kwok: false,
        ..Options::default()
    })
    .await;
    let port: u16 = cp
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in the server URL");

    // kube-rs' own client (HTTP/1.1): the yardstick, which shows that the count sees every
    // connection.
    let kube_default = kube::Client::try_from(cp.config(ADMIN_TOKEN)).expect("kube-rs client");
    let http1 = connections_while_watching(kube_default, port).await;

    let product = kreboot::connect::client(cp.config(ADMIN_TOKEN)).expect("kreboot's client");
    let http2 = connections_while_watching(product, port).await;

    println!(
        "connections to kube-apiserver with four watches and a list: kube-rs' client {http1}, kreboot's {http2}"
    );
    assert!(
        http1 >= 4,
        "kube-rs' HTTP/1.1 client holds a connection per watch; counted {http1} (is the count blind?)"
    );
    assert_eq!(
        http2, 1,
        "kreboot's client shares one HTTP/2 connection among its watches and requests"
    );
}

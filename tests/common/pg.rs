//! A real PostgreSQL database for a test: a fresh database on the server `.ci/run` started
//! (`KEYWARD_TEST_PG_URL`), dropped afterwards; without that variable, a throwaway cluster of
//! the test's own, started by `tests/support/pg-cluster` from the distribution's packages and
//! stopped afterwards. Never skipped: no server is a failure that says how to get one.

use std::path::PathBuf;
use std::process::Command;

/// A database for one test.
pub struct Pg {
    /// Its URL (no password: trust authentication on loopback).
    pub url: String,
    /// The server's URL and the database's name, when the database is dropped afterwards.
    dropped: Option<(String, String)>,
    /// The test's own cluster, stopped afterwards.
    cluster: Option<PathBuf>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/pg-cluster")
}

impl Pg {
    /// A fresh, empty database.
    pub fn new() -> Pg {
        if let Ok(server) = std::env::var("KEYWARD_TEST_PG_URL") {
            let name = format!("kw_{}_{}", std::process::id(), rand_suffix());
            let mut client = postgres::Client::connect(&server, postgres::NoTls)
                .unwrap_or_else(|e| panic!("KEYWARD_TEST_PG_URL does not answer: {e}"));
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap();
            let url = match server.rfind('/') {
                Some(i) => format!("{}/{name}", &server[..i]),
                None => panic!("KEYWARD_TEST_PG_URL has no database part: {server}"),
            };
            return Pg {
                url,
                dropped: Some((server, name)),
                cluster: None,
            };
        }
        Self::own_cluster(false)
    }

    /// A cluster of the test's own that takes TLS connections only, its certificate signed by
    /// [`Pg::ca`] for the name `localhost` alone.
    pub fn with_tls() -> Pg {
        Self::own_cluster(true)
    }

    /// The CA that signed a TLS cluster's certificate (a PEM file).
    pub fn ca(&self) -> PathBuf {
        self.cluster
            .as_ref()
            .expect("a cluster of the test's own")
            .join("ca.crt")
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.port())
            .expect("a port in the URL")
    }

    fn own_cluster(tls: bool) -> Pg {
        let dir = std::env::temp_dir().join(format!(
            "keyward-pg-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .env("PG_CLUSTER_TLS", if tls { "1" } else { "0" })
            .output()
            .expect("running tests/support/pg-cluster");
        assert!(
            out.status.success(),
            "no PostgreSQL for the test: {} (install the `postgresql` package, or set KEYWARD_TEST_PG_URL)",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Pg {
            url,
            dropped: None,
            cluster: Some(dir),
        }
    }

    /// A client of the database (for the test's own checks; not for a TLS cluster).
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl Default for Pg {
    fn default() -> Self {
        Self::new()
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() % 1_000_000_000
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some((server, name)) = self.dropped.take()
            && let Ok(mut client) = postgres::Client::connect(&server, postgres::NoTls)
        {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
        if let Some(dir) = self.cluster.take() {
            let _ = Command::new(script()).arg("stop").arg(&dir).output();
        }
    }
}

//! Plain HTTP for tests: GET a page (once, or until the server answers), find a free
//! loopback port for a server to listen on, and a server that accepts and never answers.

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use crate::proc::eventually;

/// GET `url` and return the body (status must be 200).
pub fn http_get(url: &str) -> String {
    let mut resp = ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.body_mut().read_to_string().unwrap()
}

/// GET with retries until it answers (a server that is still starting).
pub fn http_get_eventually(url: &str) -> String {
    let mut body = None;
    eventually(&format!("{url} to answer"), || {
        body = ureq::get(url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok());
        body.is_some()
    });
    body.unwrap_or_default()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Finds a free TCP port on 127.0.0.1 (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP server on 127.0.0.1 that accepts connections and never answers (a hung collector).
/// For each connection it accepts, it first runs `on_accept` and records its result, so a
/// test can check the state of the world at the moment a client started talking to it.
pub struct Unresponsive<T> {
    /// The port it listens on.
    pub port: u16,
    seen: Arc<Mutex<Vec<T>>>,
}

impl<T: Send + 'static> Unresponsive<T> {
    /// Starts listening (before returning: a client can connect at once).
    pub fn start(on_accept: impl Fn() -> T + Send + 'static) -> Unresponsive<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        std::thread::spawn(move || {
            // Connections are kept open, unanswered, until the test process exits.
            let mut open: Vec<TcpStream> = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let v = on_accept();
                record.lock().unwrap().push(v);
                open.push(conn);
            }
        });
        Unresponsive { port, seen }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What `on_accept` returned for each connection so far.
    pub fn seen(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.seen.lock().unwrap().clone()
    }
}

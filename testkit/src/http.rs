//! Plain HTTP for tests: GET a page (once, or until the server answers) and find a free
//! loopback port for a server to listen on.

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

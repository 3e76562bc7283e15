//! The lazy dump's page server made to send its handshake at once.
//!
//! CRIU's TLS (GnuTLS behind CRIU's own push function) sends each record
//! of a handshake flight with its own `send`, on a connection CRIU leaves
//! with Nagle's algorithm on until the handshake is over: the page
//! server's second record then waits for the ACK of its first, which the
//! lazy-pages daemon delays by up to 40 ms (Linux's delayed ACK). Half of
//! all lazy moves froze 40-45 ms longer for it (docs/performance.md).
//! CRIU has no option for it, but it waits for our answer to its
//! `status-ready` notice with its page server listening and no client
//! yet, and a socket accepted from a listener inherits its TCP_NODELAY.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{
    getsockname, getsockopt, setsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
};

use crate::pidfd;

/// Descriptors of the CRIU process looked at, at most (CRIU holds a few
/// dozen while it dumps).
const FDS_MAX: usize = 4096;

/// Turns Nagle's algorithm off on the socket of process `pid` that
/// listens on TCP `port`. `Ok(false)` if it has none.
pub fn send_at_once(pid: u32, port: u16) -> io::Result<bool> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    let process = pidfd::open(pid)?;
    for (fd, target) in crate::procfs::open_fds(pid).take(FDS_MAX) {
        if !target.as_os_str().as_bytes().starts_with(b"socket:") {
            continue;
        }
        // Closed since the directory was read, or not ours to take.
        let Ok(socket) = pidfd::get_fd(&process, fd) else {
            continue;
        };
        if listens_on(&socket, port) {
            setsockopt(&socket, sockopt::TcpNoDelay, &true)?;
            return Ok(true);
        }
    }
    Ok(false)
}

fn listens_on(socket: &OwnedFd, port: u16) -> bool {
    if !getsockopt(socket, sockopt::AcceptConn).unwrap_or(false) {
        return false;
    }
    let Ok(addr) = getsockname::<SockaddrStorage>(socket.as_raw_fd()) else {
        return false;
    };
    let bound = match addr.family() {
        Some(AddressFamily::Inet) => addr.as_sockaddr_in().map(|a| a.port()),
        Some(AddressFamily::Inet6) => addr.as_sockaddr_in6().map(|a| a.port()),
        _ => None,
    };
    bound == Some(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn nodelay(fd: impl AsFd) -> bool {
        getsockopt(&fd, sockopt::TcpNoDelay).unwrap()
    }

    #[test]
    fn the_listener_on_the_port_and_what_it_accepts_send_at_once() {
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!nodelay(&listener));

        assert!(send_at_once(std::process::id(), port).unwrap());

        assert!(nodelay(&listener));
        assert!(!nodelay(&other), "only the socket on that port is changed");
        let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(nodelay(&accepted));
    }

    #[test]
    fn a_port_nobody_listens_on_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let connected_elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(connected_elsewhere.local_addr().unwrap()).unwrap();
        assert!(!send_at_once(std::process::id(), port).unwrap());
    }
}

//! The process's open-files budget, and telling "out of descriptors" from
//! other I/O errors.
//!
//! At start the gateway raises its soft open-files limit to the hard one
//! (as Go's runtime does), then sizes the caller-connection limit
//! (`--max-connections`, [`crate::accept`]) so that every admitted caller
//! connection can hold its own descriptor while a reserve stays for the
//! admin server, the tunnel socket, upstream connections, and the files the
//! gateway reads (credentials, discovery, policy). Without that reserve a
//! flood of callers takes the last descriptor: `/readyz` stops answering
//! and file reloads fail. A caller connection proxied as TCP to a local
//! endpoint holds a second descriptor, which only the reserve covers: where
//! most traffic is local TCP, give the gateway an open-files limit of at
//! least twice `--max-connections` (a failed accept or connect then backs
//! off and is counted, it does not crash).
//!
//! It owns no socket and no listener; [`exhaustion`] is also what the
//! credential and file reloaders use to say "too many open files" instead of
//! blaming the files.

/// Descriptors counted per admitted caller connection: its own (one toward
/// a local endpoint, for TCP proxying, comes out of the reserve; HTTP
/// shares pooled connections, and remote calls use the tunnel's socket).
pub const FDS_PER_CONNECTION: u64 = 1;

/// The most descriptors kept out of the caller connections' budget.
const MAX_RESERVE: u64 = 256;

/// The open-files limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit: what `open`, `accept` and `socket` are held to.
    pub soft: u64,
    /// The hard limit (`u64::MAX`: unlimited).
    pub hard: u64,
}

/// Raises the soft open-files limit to the hard limit (or to 1,048,576,
/// Linux's default ceiling, when the hard limit is unlimited), and returns
/// the limits then in force. A failure to raise leaves the soft limit as it
/// was; the caller sizes its budget from what is returned.
pub fn raise_open_files() -> OpenFiles {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    let hard = now.maximum.unwrap_or(u64::MAX);
    let want = hard.min(1 << 20);
    if soft >= want {
        return OpenFiles { soft, hard };
    }
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: now.maximum,
        },
    );
    match raised {
        Ok(()) => OpenFiles { soft: want, hard },
        Err(e) => {
            tracing::debug!(error = %e, soft, want, "cannot raise the soft open-files limit");
            OpenFiles { soft, hard }
        }
    }
}

/// The descriptors kept for everything but caller connections under a soft
/// limit of `soft`: a quarter of it, at most [`MAX_RESERVE`].
pub fn reserve(soft: u64) -> u64 {
    (soft / 4).min(MAX_RESERVE)
}

/// The caller-connection limit that fits `wanted` into a soft open-files
/// limit of `soft`: `wanted`, or fewer when `wanted` connections could take
/// the descriptors of the reserve. At least 1.
pub fn fit_connections(wanted: usize, soft: u64) -> usize {
    let room = soft.saturating_sub(reserve(soft)) / FDS_PER_CONNECTION;
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    wanted.min(room).max(1)
}

/// When an I/O error says the process or the system ran out of a resource,
/// what ran out and what to try (one copy, shared with the credential
/// store).
pub use meshfed_cli::io::exhaustion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_a_reserve_of_descriptors() {
        // The shipped default fits a container's usual 1,048,576.
        assert_eq!(fit_connections(2048, 1 << 20), 2048);
        // 1,024 (a common default): 256 kept.
        assert_eq!(fit_connections(2048, 1024), 768);
        // Tiny limits keep a quarter and still admit someone.
        assert_eq!(fit_connections(2048, 64), 48);
        assert_eq!(fit_connections(2048, 1), 1);
        assert_eq!(fit_connections(10, u64::MAX), 10);
    }

    #[test]
    fn raising_the_soft_limit_never_lowers_it() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let after = raise_open_files();
        assert!(after.soft >= before.min(1 << 20));
        assert!(after.soft <= after.hard);
    }
}

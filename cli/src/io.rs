//! I/O helpers every binary shares: [`exhaustion`] tells an error caused by
//! a resource limit (open files, kernel buffers, memory) from one caused by
//! the file or peer itself, and [`delegate_async_write!`](crate::delegate_async_write)
//! writes the write half of a stream wrapper that only adds to reading or
//! to what it carries.
//!
//! It owns no descriptor budget: the gateway's `limits` module sizes its
//! connection limit; the credential and file reloaders only use the
//! classification here to say "too many open files" instead of blaming the
//! files.

use std::io;

/// When `e` says the process or the system ran out of a resource (open
/// files, kernel buffers, memory), what ran out and what to try; `None` for
/// any other error.
pub fn exhaustion(e: &io::Error) -> Option<&'static str> {
    use rustix::io::Errno;
    match Errno::from_io_error(e)? {
        Errno::MFILE => Some(
            "the gateway has too many open files (EMFILE): a resource limit, not a problem with \
             the file; raise its open-files limit (LimitNOFILE=, ulimit -n) or lower \
             --max-connections",
        ),
        Errno::NFILE => Some(
            "the system has too many open files (ENFILE): a resource limit, not a problem with \
             the file; raise fs.file-max or find the process holding them",
        ),
        Errno::NOBUFS | Errno::NOMEM => Some(
            "the kernel is out of memory for buffers (ENOBUFS/ENOMEM): a resource limit; lower \
             --max-connections or give the gateway more memory",
        ),
        _ => None,
    }
}

/// The methods of `tokio::io::AsyncWrite` for a wrapper that writes
/// through to its `Unpin` field `$field` unchanged (vectored writes
/// included), for use inside the `impl AsyncWrite` block of a stream
/// wrapper that only adds to reading or to what it carries.
#[macro_export]
macro_rules! delegate_async_write {
    ($field:ident) => {
        fn poll_write(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
        }

        fn poll_flush(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
        }

        fn poll_shutdown(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
        }

        fn poll_write_vectored(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;

    #[test]
    fn running_out_of_descriptors_is_told_apart_from_other_errors() {
        let emfile = io::Error::from_raw_os_error(Errno::MFILE.raw_os_error());
        let says = exhaustion(&emfile).unwrap_or_default();
        assert!(says.contains("too many open files"), "{says}");
        assert!(says.contains("not a problem with the file"), "{says}");
        let enfile = io::Error::from_raw_os_error(Errno::NFILE.raw_os_error());
        assert!(exhaustion(&enfile).is_some());
        let enoent = io::Error::from_raw_os_error(Errno::NOENT.raw_os_error());
        assert_eq!(exhaustion(&enoent), None);
        assert_eq!(exhaustion(&io::Error::other("x")), None);
    }
}

//! The bytes of a Raft snapshot as openraft moves them: exported from the state machine
//! when a follower needs them, or received from a leader chunk by chunk.
//!
//! A snapshot is not kept as a file. The state machine already lives on disk in RocksDB,
//! so building a snapshot only fixes a point (`state_machine.rs`); the bytes are exported
//! from a consistent RocksDB snapshot on a blocking thread when openraft asks for the
//! current snapshot to send it, and readers wait for them here.

use std::future::Future;
use std::io::{self, Cursor, Seek, SeekFrom};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// openraft's `SnapshotData`: readable, writable and seekable bytes that may still be
/// being exported.
pub struct SnapshotData {
    state: State,
    /// A seek started before the bytes were there; done once they are.
    seek: Option<SeekFrom>,
}

enum State {
    /// Exported on a blocking thread; the result arrives here.
    Exporting(oneshot::Receiver<io::Result<Vec<u8>>>),
    Ready(Cursor<Vec<u8>>),
    /// What `build_snapshot` returns: openraft keeps only its metadata.
    MetaOnly,
    Failed(io::ErrorKind, String),
}

impl SnapshotData {
    /// Bytes already in memory (and an empty buffer to receive a snapshot into).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self::with(State::Ready(Cursor::new(bytes)))
    }

    /// Bytes that an exporter will send on the other end of `rx`.
    pub fn exporting(rx: oneshot::Receiver<io::Result<Vec<u8>>>) -> Self {
        Self::with(State::Exporting(rx))
    }

    /// No bytes: the snapshot's metadata is all its holder may use.
    pub fn meta_only() -> Self {
        Self::with(State::MetaOnly)
    }

    fn with(state: State) -> Self {
        SnapshotData { state, seek: None }
    }

    /// All the bytes, once exported.
    pub async fn into_bytes(mut self) -> io::Result<Vec<u8>> {
        std::future::poll_fn(|cx| self.poll_cursor(cx).map_ok(|_| ())).await?;
        match self.state {
            State::Ready(c) => Ok(c.into_inner()),
            _ => Err(io::Error::other("snapshot bytes not available")),
        }
    }

    fn poll_cursor(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut Cursor<Vec<u8>>>> {
        if let State::Exporting(rx) = &mut self.state {
            self.state = match ready!(Pin::new(rx).poll(cx)) {
                Ok(Ok(bytes)) => State::Ready(Cursor::new(bytes)),
                Ok(Err(e)) => State::Failed(e.kind(), e.to_string()),
                Err(_) => State::Failed(
                    io::ErrorKind::BrokenPipe,
                    "snapshot export ended without a result".into(),
                ),
            };
        }
        match &mut self.state {
            State::Ready(c) => Poll::Ready(Ok(c)),
            State::Failed(kind, msg) => Poll::Ready(Err(io::Error::new(*kind, msg.clone()))),
            State::MetaOnly => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a built snapshot carries only its metadata; its bytes come from the current snapshot",
            ))),
            State::Exporting(_) => Poll::Pending,
        }
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let cursor = ready!(this.poll_cursor(cx))?;
        Pin::new(cursor).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let cursor = ready!(this.poll_cursor(cx))?;
        Pin::new(cursor).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.get_mut().seek = Some(position);
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        let pending = this.seek.take();
        let cursor = match this.poll_cursor(cx) {
            Poll::Pending => {
                this.seek = pending;
                return Poll::Pending;
            }
            Poll::Ready(r) => r?,
        };
        Poll::Ready(match pending {
            Some(position) => cursor.seek(position),
            None => Ok(cursor.position()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_and_seeks_wait_for_the_export() {
        let (tx, rx) = oneshot::channel();
        let mut data = SnapshotData::exporting(rx);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(Ok(b"0123456789".to_vec()))
        });
        assert_eq!(data.seek(SeekFrom::End(0)).await.expect("seek end"), 10);
        data.seek(SeekFrom::Start(4)).await.expect("seek");
        let mut buf = String::new();
        data.read_to_string(&mut buf).await.expect("read");
        assert_eq!(buf, "456789");
        assert!(sender.await.expect("join").is_ok());
    }

    #[tokio::test]
    async fn export_failure_and_meta_only_are_errors_not_empty_snapshots() {
        let (tx, rx) = oneshot::channel();
        drop(tx);
        let mut gone = SnapshotData::exporting(rx);
        let mut buf = Vec::new();
        let err = gone.read_to_end(&mut buf).await.expect_err("no bytes");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);

        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(io::Error::other("disk on fire")));
        let err = SnapshotData::exporting(rx)
            .into_bytes()
            .await
            .expect_err("failed");
        assert!(err.to_string().contains("disk on fire"), "{err}");

        let err = SnapshotData::meta_only()
            .into_bytes()
            .await
            .expect_err("meta only");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
    }

    #[tokio::test]
    async fn receives_chunks_at_offsets() {
        let mut data = SnapshotData::from_bytes(Vec::new());
        data.seek(SeekFrom::Start(0)).await.expect("seek");
        data.write_all(b"abc").await.expect("write");
        data.seek(SeekFrom::Start(3)).await.expect("seek");
        data.write_all(b"def").await.expect("write");
        assert_eq!(data.into_bytes().await.expect("bytes"), b"abcdef");
    }
}

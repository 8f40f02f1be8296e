//! The thread that writes to the successor. The rank's own thread reads from
//! its predecessor meanwhile: if every rank wrote with blocking sends and
//! nobody read, a ring would deadlock as soon as a chunk outgrew the socket
//! buffers. Buffers travel to the thread by value and come back empty, so at
//! most `max_in_flight` chunks wait per rank and no memory is shared.

use std::io::Write;
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::{Error, Peer, Result};

pub(crate) struct Sender {
    jobs: Option<mpsc::Sender<Vec<u8>>>,
    returned: mpsc::Receiver<Vec<u8>>,
    /// Buffers this side may fill now.
    idle: Vec<Vec<u8>>,
    /// Buffers handed to the thread and not back yet.
    out: usize,
    created: usize,
    max: usize,
    chunk_bytes: usize,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Sender {
    pub fn spawn(
        stream: TcpStream,
        peer: Peer,
        timeout: Duration,
        chunk_bytes: usize,
        max_in_flight: usize,
    ) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Vec<u8>>();
        let (give_back, returned) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("ring-send-{}", peer.rank))
            .spawn(move || write_loop(stream, queue, give_back, peer, timeout))
            .map_err(|source| Error::Io {
                op: "start the sender thread",
                peer,
                source,
            })?;
        Ok(Self {
            jobs: Some(jobs),
            returned,
            idle: Vec::new(),
            out: 0,
            created: 0,
            max: max_in_flight.max(1),
            chunk_bytes,
            thread: Some(thread),
        })
    }

    /// An empty buffer to fill; waits for the thread to finish one when all
    /// are in flight (the thread always finishes or fails within its write
    /// timeout, so this cannot wait forever).
    pub fn buffer(&mut self) -> Result<Vec<u8>> {
        while let Ok(buf) = self.returned.try_recv() {
            self.out -= 1;
            self.idle.push(buf);
        }
        if let Some(mut buf) = self.idle.pop() {
            buf.clear();
            return Ok(buf);
        }
        if self.created < self.max {
            self.created += 1;
            return Ok(Vec::with_capacity(self.chunk_bytes));
        }
        match self.returned.recv() {
            Ok(mut buf) => {
                self.out -= 1;
                buf.clear();
                Ok(buf)
            }
            Err(_) => Err(self.failure()),
        }
    }

    /// Queues a filled buffer for the successor.
    pub fn send(&mut self, buf: Vec<u8>) -> Result<()> {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(buf));
        match sent {
            Some(Ok(())) => {
                self.out += 1;
                Ok(())
            }
            _ => Err(self.failure()),
        }
    }

    /// Waits until everything queued has been written, so that a collective
    /// returns only after its bytes left and any send error belongs to it.
    pub fn flush(&mut self) -> Result<()> {
        while self.out > 0 {
            match self.returned.recv() {
                Ok(buf) => {
                    self.out -= 1;
                    self.idle.push(buf);
                }
                Err(_) => return Err(self.failure()),
            }
        }
        Ok(())
    }

    /// The thread stopped: collects why.
    fn failure(&mut self) -> Error {
        self.jobs = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Ok(Ok(()))) => Error::Broken {
                first: "the sender thread stopped".into(),
            },
            Some(Err(_)) => Error::Broken {
                first: "the sender thread panicked".into(),
            },
            None => Error::Broken {
                first: "the sender thread had already failed".into(),
            },
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what is queued.
        self.jobs = None;
        if let Some(Ok(Err(e))) = self.thread.take().map(JoinHandle::join) {
            tracing::debug!("ring sender ended with: {e}");
        }
    }
}

fn write_loop(
    mut stream: TcpStream,
    queue: mpsc::Receiver<Vec<u8>>,
    give_back: mpsc::Sender<Vec<u8>>,
    peer: Peer,
    timeout: Duration,
) -> Result<()> {
    for buf in queue {
        stream
            .write_all(&buf)
            .map_err(|e| Error::link("send", peer, timeout, e))?;
        if give_back.send(buf).is_err() {
            break;
        }
    }
    Ok(())
}

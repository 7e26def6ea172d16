//! Log files: opened in append mode (created when missing), reopened by path on SIGUSR1 so
//! that logrotate's `mv access.log access.log.1; kill -USR1` leaves new lines in a new
//! `access.log`.
//!
//! Written here rather than with `tracing-appender`: its non-blocking writer hands every line
//! to a thread as a `Vec` of its own (an allocation per request) and drops lines when that
//! thread falls behind, and the crate brings `time` and `crossbeam-channel` into the lock file
//! for rotation we leave to logrotate. What nginx does is simpler and enough: a line is copied
//! into a buffer under a short lock (no allocation, never held across an `.await`); a full
//! buffer is written by the thread that filled it, and a flusher thread writes what is left
//! once a second (nginx's `access_log … buffer=64k flush=1s`). A disk that stalls stalls the
//! writer, as it does nginx's workers.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What a buffered file holds before the thread writing a line writes it out.
const BUFFER: usize = 64 << 10;

/// How often the flusher writes out what buffered files hold.
pub(super) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One log file. Lines are written whole: a line and the lines around it never interleave.
#[derive(Debug)]
pub(super) struct LogFile {
    path: PathBuf,
    /// Flushed once a second and when full (the access log), rather than after each line
    /// (the error log, whose lines must be there if the process dies).
    buffered: bool,
    out: Mutex<BufWriter<File>>,
}

impl LogFile {
    pub(super) fn open(path: &Path, buffered: bool) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_owned(),
            buffered,
            out: Mutex::new(BufWriter::with_capacity(BUFFER, open_append(path)?)),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn buffered(&self) -> bool {
        self.buffered
    }

    /// A poisoned lock only means a writer panicked mid-line; the file is still usable.
    fn lock(&self) -> MutexGuard<'_, BufWriter<File>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_line(&self, line: &[u8]) -> io::Result<()> {
        let mut out = self.lock();
        out.write_all(line)?;
        if !self.buffered {
            out.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&self) -> io::Result<()> {
        self.lock().flush()
    }

    /// Opens the path again and writes to the new file from now on; what was buffered goes
    /// to the old one (logrotate's `.1`). When the path cannot be opened the old file stays.
    pub(super) fn reopen(&self) -> io::Result<()> {
        let file = open_append(&self.path)?;
        let mut out = self.lock();
        let flushed = out.flush();
        let old = std::mem::replace(&mut *out, BufWriter::with_capacity(BUFFER, file));
        drop(out);
        // Already flushed (or failed to): dropping it only closes the old file.
        drop(old);
        flushed
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

/// A `tracing-subscriber` writer into a [`LogFile`]: the formatter hands it one whole line
/// per `write_all`.
#[derive(Clone, Debug)]
pub(super) struct FileWriter(pub(super) Arc<LogFile>);

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_line(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_line(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for FileWriter {
    type Writer = FileWriter;

    fn make_writer(&'a self) -> FileWriter {
        self.clone()
    }
}

/// Writes buffered files out every [`FLUSH_EVERY`]; runs for the life of the process.
pub(super) fn spawn_flusher(files: Vec<Arc<LogFile>>) {
    let files: Vec<_> = files.into_iter().filter(|f| f.buffered()).collect();
    if files.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("edgecache-log-flush".into())
        .spawn(move || loop {
            std::thread::sleep(FLUSH_EVERY);
            for f in &files {
                let _ = f.flush();
            }
        });
    if let Err(e) = spawned {
        // Lines still reach the file when the buffer fills, at reopen and at exit.
        tracing::warn!(error = %e, "could not start the log flusher thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_after_a_rename_writes_to_a_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = LogFile::open(&path, true).expect("open");
        log.write_line(b"one\n").expect("write");
        std::fs::rename(&path, dir.path().join("access.log.1")).expect("rename");
        log.write_line(b"two\n").expect("write");
        log.reopen().expect("reopen");
        log.write_line(b"three\n").expect("write");
        log.flush().expect("flush");
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect("read");
        assert_eq!(read("access.log.1"), "one\ntwo\n");
        assert_eq!(read("access.log"), "three\n");
    }

    #[test]
    fn an_unbuffered_file_has_each_line_at_once_and_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("error.log");
        std::fs::write(&path, "before\n").expect("write");
        let log = LogFile::open(&path, false).expect("open");
        log.write_line(b"after\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "before\nafter\n"
        );
    }

    #[test]
    fn a_path_that_cannot_be_reopened_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).expect("mkdir");
        let path = sub.join("access.log");
        let log = LogFile::open(&path, false).expect("open");
        std::fs::rename(&sub, dir.path().join("moved")).expect("rename");
        assert!(log.reopen().is_err());
        log.write_line(b"kept\n").expect("write");
        let moved = dir.path().join("moved/access.log");
        assert_eq!(std::fs::read_to_string(moved).expect("read"), "kept\n");
    }
}

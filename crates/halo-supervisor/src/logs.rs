//! Instance logs: one file per instance that the process writes to
//! directly (opened in append mode), so output is kept even while halo is
//! down and an adopted instance keeps logging. Size-capped by copy and
//! truncate: the file is copied to `NAME.1` (the one older generation kept)
//! and truncated; the process's next append lands at the start.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The current log file and its older generation.
#[derive(Debug, Clone)]
pub struct LogFile {
    pub path: PathBuf,
}

impl LogFile {
    /// The log of `instance` of `service` under `dir`, creating the
    /// service's folder (for the writer).
    pub fn new(dir: &Path, service: &str, instance: &str) -> std::io::Result<LogFile> {
        let log = LogFile::at(dir, service, instance);
        if let Some(parent) = log.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(log)
    }

    /// The same path without touching the disk (for readers). The names
    /// must be checked by the caller: they become path components.
    pub fn at(dir: &Path, service: &str, instance: &str) -> LogFile {
        LogFile { path: dir.join(service).join(format!("{instance}.log")) }
    }

    fn older(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Rotates when the file has grown past `cap` bytes.
    pub fn rotate_if_over(&self, cap: u64) -> std::io::Result<bool> {
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if len <= cap {
            return Ok(false);
        }
        std::fs::copy(&self.path, self.older())?;
        std::fs::OpenOptions::new().write(true).open(&self.path)?.set_len(0)?;
        Ok(true)
    }

    /// The last `n` lines, across the rotation.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let mut text = std::fs::read(self.older()).unwrap_or_default();
        text.extend(std::fs::read(&self.path).unwrap_or_default());
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
    }

    /// What was appended after `offset`, and the offset to read from next.
    /// A file that shrank was rotated: read it from the start.
    pub fn read_from(&self, offset: u64) -> (String, u64) {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return (String::new(), offset) };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = if len < offset { 0 } else { offset };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_ok() && f.take(1 << 20).read_to_end(&mut buf).is_ok() {
            let next = from + buf.len() as u64;
            return (String::from_utf8_lossy(&buf).into_owned(), next);
        }
        (String::new(), from)
    }

    /// The current size: where a follower starts.
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.older());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn rotation_keeps_one_generation_and_tail_spans_it() {
        let dir = halo_testkit::TempDir::new("logs");
        let log = LogFile::new(&dir.0, "web", "web-1").unwrap();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log.path).unwrap();
        for i in 0..100 {
            writeln!(f, "line {i}").unwrap();
        }
        assert!(!log.rotate_if_over(10_000).unwrap());
        assert!(log.rotate_if_over(100).unwrap());
        assert_eq!(log.size(), 0);
        // The writer's appends land at the start of the truncated file.
        writeln!(f, "after").unwrap();
        assert_eq!(log.tail(3), ["line 98", "line 99", "after"]);
        let (text, next) = log.read_from(0);
        assert_eq!((text.as_str(), next), ("after\n", 6));
        assert_eq!(log.read_from(1000).0, "after\n", "a shrunk file is read from the start");
    }
}

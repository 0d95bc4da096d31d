//! Archives packed to a temporary file, with their size and content hash.

use std::io::{BufWriter, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A tar.zst on disk: what the invoker ships, named by its SHA-256.
#[derive(Debug)]
pub struct PackedArchive {
    file: tempfile::TempPath,
    /// Size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the bytes: the store's key and what the agent checks.
    pub sha256: String,
}

impl PackedArchive {
    /// A writer into a fresh temporary file that hashes what goes through it.
    pub fn writer() -> std::io::Result<PackedWriter> {
        let file = tempfile::NamedTempFile::new()?;
        let (file, path) = file.into_parts();
        Ok(PackedWriter {
            out: BufWriter::with_capacity(256 * 1024, file),
            path,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The whole archive, for the small ones that travel inside a request.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path())
    }
}

/// Writes an archive to disk, hashing and counting on the way.
pub struct PackedWriter {
    out: BufWriter<std::fs::File>,
    path: tempfile::TempPath,
    hasher: Sha256,
    size: u64,
}

impl PackedWriter {
    /// Flushes and hands the archive over.
    pub fn finish(mut self) -> std::io::Result<PackedArchive> {
        self.out.flush()?;
        Ok(PackedArchive {
            file: self.path,
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
        })
    }
}

impl Write for PackedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_size_are_those_of_the_file() {
        let mut w = PackedArchive::writer().unwrap();
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let packed = w.finish().unwrap();
        assert_eq!(packed.size, 11);
        assert_eq!(packed.read().unwrap(), b"hello world");
        assert_eq!(
            packed.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        let path = packed.path().to_path_buf();
        drop(packed);
        assert!(!path.exists(), "the temporary file goes with the archive");
    }
}

//! The config's own file I/O: reading a config or key file with limits, and the token keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ConfigError, TokenSecret, invalid};

/// The largest config or key file read: a config is a few KiB, and a path swapped for
/// something endless must not be read into memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads a config (or key) file as text, refusing what is not a regular file once symlinks are
/// followed (a ConfigMap or Secret mount is a symlink) and what is over [`MAX_CONFIG_BYTES`].
/// It is opened without blocking (a FIFO cannot hold the reader) and read through
/// `Read::take`, so a path swapped for `/dev/zero` or a growing file is never read past the
/// cap. Refusals are `InvalidData` errors that say why.
pub fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "something else"
        };
        return Err(refuse(format!("not a regular file ({what})")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "larger than {MAX_CONFIG_BYTES} bytes, the most a config file may be"
        )));
    }
    String::from_utf8(bytes).map_err(|e| refuse(format!("not UTF-8 text: {e}")))
}

impl TokenSecret {
    /// Reads the key file; errors name `tokenSecret.file`.
    pub fn read(file: PathBuf) -> Result<Self, ConfigError> {
        let text = read_config_file(&file).map_err(|e| {
            invalid(
                "tokenSecret.file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let keys = dataplane::policy::seal::KeyRing::parse(&text)
            .map_err(|e| invalid("tokenSecret.file", format!("{}: {e}", file.display())))?;
        Ok(Self {
            file,
            keys: Arc::new(keys),
        })
    }
}

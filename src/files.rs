//! Files keyward reads and writes, handled as a program holding production keys must: the
//! state directory and sink directories are checked before use (owned by keyward's user, not
//! writable by anyone else), files inside them are opened without following symbolic links,
//! every input is a regular file of bounded size (a FIFO or `/dev/zero` in place of a config is
//! an error, never a hang or a 2 GB read), and private files are replaced atomically and durably
//! with mode 0600.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Largest config file (and included file) keyward reads: 64 MiB, room for a config of
/// 100,000 users.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// Largest `*_file` secret keyward reads: 64 KiB (credentials are a few hundred bytes).
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;
/// Largest sink file keyward reads back to check what it holds: 1 MiB.
pub const MAX_SINK_FILE_BYTES: u64 = 1 << 20;
/// Largest state, journal or plan file keyward reads: 1 GiB.
pub const MAX_STATE_BYTES: u64 = 1 << 30;

/// The effective user id of this process: the owner every private directory must have.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why a file could not be read as a bounded, regular input.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The path is not a regular file; the payload names what it is (directory, FIFO, …).
    #[error("it is not a regular file (a {0}); keyward reads only regular files here")]
    NotRegular(&'static str),
    /// The file is larger than keyward reads; sizes in bytes.
    #[error("it is larger than {limit} bytes ({size} bytes)")]
    TooLarge {
        /// The file's size.
        size: u64,
        /// The most keyward reads from it.
        limit: u64,
    },
}

impl ReadError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` for reading without blocking (a FIFO with no writer would otherwise hang the
/// open) and checks that it is a regular file of at most `limit` bytes. With `follow_links`
/// false a symbolic link is refused (`O_NOFOLLOW`). Returns the file and the metadata checked.
fn open_regular(
    path: &Path,
    limit: u64,
    follow_links: bool,
) -> Result<(File, std::fs::Metadata), ReadError> {
    let mut flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC;
    if !follow_links {
        flags |= rustix::fs::OFlags::NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| {
            // ELOOP is what O_NOFOLLOW answers for a link.
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                ReadError::NotRegular("symbolic link")
            } else {
                ReadError::Io(e)
            }
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular(kind_of(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    Ok((file, meta))
}

/// Reads `file` to its end into `bytes`, refusing one that grew past `limit` since it was
/// checked.
fn read_to_limit(file: File, limit: u64, bytes: &mut Vec<u8>) -> Result<(), ReadError> {
    file.take(limit + 1).read_to_end(bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(())
}

/// Reads a whole regular file of at most `limit` bytes (see [`open_regular`]). A file that
/// grows past the limit while being read is refused too.
pub fn read_bounded(path: &Path, limit: u64, follow_links: bool) -> Result<Vec<u8>, ReadError> {
    let (file, _) = open_regular(path, limit, follow_links)?;
    let mut bytes = Vec::new();
    read_to_limit(file, limit, &mut bytes)?;
    Ok(bytes)
}

/// Creates `dir` and any missing parents with mode 0700, then checks it with
/// [`check_private_dir`].
pub fn create_private_dir(dir: &Path, what: &str) -> anyhow::Result<()> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the {what} {}", dir.display()))?;
    }
    check_private_dir(dir, what)
}

/// Refuses a directory that another user could plant files or links in: it must be owned by
/// keyward's user and writable by nobody else (no group or other write bit), and every
/// directory above it must be owned by root or keyward's user and writable by no one else
/// unless it is sticky (`/tmp`): otherwise someone could swap the directory itself for a link.
/// The path may be a symbolic link (systemd's `StateDirectory=` with `DynamicUser=` makes one);
/// where it leads is what is checked.
pub fn check_private_dir(dir: &Path, what: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("the {what} {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!(
            "the {what} {} is not a directory ({})",
            dir.display(),
            kind_of(meta.file_type())
        );
    }
    let me = euid();
    if meta.uid() != me {
        anyhow::bail!(
            "refusing the {what} {}: it is owned by uid {}, not by keyward's user (uid {me}); another user could replace what keyward keeps there. Fix: chown it to keyward's user, or use another directory",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.permissions().mode();
    check_ancestors(dir, what)?;
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "refusing the {what} {}: it is writable by {} (mode {:04o}), who could plant links or files in it. Fix: chmod go-w {}",
            dir.display(),
            if mode & 0o002 != 0 {
                "every user"
            } else {
                "its group"
            },
            mode & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// The directories above `dir` (where it really lives): each owned by root or keyward's user,
/// and group- or world-writable only when sticky.
fn check_ancestors(dir: &Path, what: &str) -> anyhow::Result<()> {
    let real =
        std::fs::canonicalize(dir).with_context(|| format!("the {what} {}", dir.display()))?;
    let me = euid();
    for ancestor in real.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)
            .with_context(|| format!("the directory {} above the {what}", ancestor.display()))?;
        let mode = meta.permissions().mode();
        let sticky = mode & 0o1000 != 0;
        if meta.uid() != 0 && meta.uid() != me {
            anyhow::bail!(
                "refusing the {what} {}: the directory {} above it is owned by uid {}, who could replace it. Fix: use a directory under one owned by root or keyward's user",
                dir.display(),
                ancestor.display(),
                meta.uid()
            );
        }
        if mode & 0o022 != 0 && !sticky {
            anyhow::bail!(
                "refusing the {what} {}: the directory {} above it is writable by others (mode {:04o}), who could swap the {what} for a link. Fix: chmod go-w {}",
                dir.display(),
                ancestor.display(),
                mode & 0o7777,
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// Opens (creating with mode 0600) a file inside a checked private directory for reading and
/// writing, never through a symbolic link.
pub fn open_private(path: &Path, append: bool) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options
        .create(true)
        .read(true)
        .mode(0o600)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(false);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file ({})",
            path.display(),
            kind_of(meta.file_type())
        )));
    }
    Ok(file)
}

/// Replaces `path` with `bytes` atomically and durably, mode 0600: a temp file in the same
/// directory, fsync, rename over the target (a link at `path` is replaced, never followed),
/// fsync of the directory.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let file = written_private(path, bytes)?;
    file.commit()
        .with_context(|| format!("committing {}", path.display()))?;
    keep_private(path)
}

/// A new temporary file beside `path` (mode 0600) holding `bytes`, synced on commit, which
/// replaces `path`; dropped uncommitted, it is removed.
fn written_private(
    path: &Path,
    bytes: &[u8],
) -> anyhow::Result<atomic_write_file::AtomicWriteFile> {
    use atomic_write_file::AtomicWriteFile;
    use atomic_write_file::unix::OpenOptionsExt as _;
    let mut options = AtomicWriteFile::options();
    options.preserve_mode(false).preserve_owner(false);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// The mode is set at creation, but makes sure an umask never widened it.
fn keep_private(path: &Path) -> anyhow::Result<()> {
    let perms = std::fs::symlink_metadata(path)?.permissions();
    if perms.mode() & 0o777 != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// A check made right before a write takes effect (the state lock's lease); an error stops the
/// write with nothing replaced.
pub type Fence = std::sync::Arc<dyn Fn() -> anyhow::Result<()> + Send + Sync>;

/// How long a writer waits for another keyward process's write of the same file.
const WRITE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// [`write_private_file`] for a file several keyward processes may write (a sink on shared
/// storage): under an exclusive lock on `.NAME.keyward-lock` beside it, and only if `fence`
/// still passes once the new content is on disk, just before it replaces the old. A writer
/// that stopped after the check (a paused process) holds the lock meanwhile, so no other
/// keyward's newer write can come between its check and its replace.
pub fn write_private_file_fenced(path: &Path, bytes: &[u8], fence: &Fence) -> anyhow::Result<()> {
    let lock = write_lock(path)?;
    fence()?;
    let file = written_private(path, bytes)?;
    // The slow part (the data on disk) is done: the check that counts is the one right
    // before the replace. Dropping the file uncommitted removes its temp file.
    fence()?;
    file.commit()
        .with_context(|| format!("committing {}", path.display()))?;
    keep_private(path)?;
    drop(lock);
    Ok(())
}

/// Removes `path` (gone already is fine) under the same lock as
/// [`write_private_file_fenced`], and only if `fence` passes right before.
pub fn remove_private_file_fenced(path: &Path, fence: &Fence) -> anyhow::Result<()> {
    let lock = write_lock(path)?;
    fence()?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    drop(lock);
    Ok(())
}

/// The exclusive lock on `.NAME.keyward-lock` beside `path`, waited for up to
/// [`WRITE_LOCK_WAIT`]; released when the file is dropped.
fn write_lock(path: &Path) -> anyhow::Result<File> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path = path.with_file_name(format!(".{name}.keyward-lock"));
    let lock = open_private(&lock_path, false)
        .with_context(|| format!("opening the write lock {}", lock_path.display()))?;
    let waited = std::time::Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) if waited.elapsed() < WRITE_LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "{} is being written by another keyward process (its lock {} stayed held for {}s)",
                path.display(),
                lock_path.display(),
                WRITE_LOCK_WAIT.as_secs()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
    }
}

/// Creates `path`, which must not exist yet (`O_CREAT|O_EXCL`: an existing file or a link is
/// never replaced or followed), mode 0644, empty: the caller fills it with [`fill_new_file`]
/// once it has the content, or removes it. For documents people keep, such as the config
/// `keyward import --out` writes.
pub fn reserve_new_file(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))
}

/// Writes `bytes` into `file` (created at `path` by [`reserve_new_file`]) and syncs it and its
/// directory.
pub fn fill_new_file(mut file: File, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    file.write_all(bytes)?;
    file.sync_all()?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads back a file keyward wrote into a private directory (a sink file), only if it is one
/// keyward could have written: a regular file, not a link, owned by keyward's user, with no
/// group or other permission bits, of bounded size. Anything else reads as `None`.
pub fn read_own_file(path: &Path) -> Option<secrecy::zeroize::Zeroizing<Vec<u8>>> {
    let (file, meta) = open_regular(path, MAX_SINK_FILE_BYTES, false).ok()?;
    if meta.uid() != euid() || meta.permissions().mode() & 0o077 != 0 {
        return None;
    }
    let mut bytes = secrecy::zeroize::Zeroizing::new(Vec::new());
    read_to_limit(file, MAX_SINK_FILE_BYTES, &mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_devices_are_refused_without_hanging() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = read_bounded(&fifo, 100, true).unwrap_err().to_string();
        assert!(err.contains("FIFO"), "{err}");
        let err = read_bounded(Path::new("/dev/zero"), 100, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("character device"), "{err}");
        let err = read_bounded(tmp.path(), 100, true).unwrap_err().to_string();
        assert!(err.contains("directory"), "{err}");
    }

    #[test]
    fn size_is_bounded_and_links_refused_on_request() {
        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![b'x'; 101]).unwrap();
        assert!(matches!(
            read_bounded(&big, 100, true),
            Err(ReadError::TooLarge { size: 101, .. })
        ));
        assert_eq!(read_bounded(&big, 101, true).unwrap().len(), 101);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert_eq!(read_bounded(&link, 200, true).unwrap().len(), 101);
        let err = read_bounded(&link, 200, false).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn writable_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        create_private_dir(&dir, "state directory").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private_dir(&dir, "state directory")
            .unwrap_err()
            .to_string();
        assert!(err.contains("writable by every user"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        let err = check_private_dir(&dir, "state directory")
            .unwrap_err()
            .to_string();
        assert!(err.contains("writable by its group"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_private_dir(&dir, "state directory").unwrap();
        // A parent others can write (not sticky) could swap the directory for a link.
        let inner = dir.join("inner");
        create_private_dir(&inner, "sink directory").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private_dir(&inner, "sink directory")
            .unwrap_err()
            .to_string();
        assert!(err.contains("above it is writable by others"), "{err}");
        // Sticky, like /tmp: others cannot rename what is ours.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_private_dir(&inner, "sink directory").unwrap();
    }

    #[test]
    fn open_private_never_follows_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, b"keep me").unwrap();
        let link = tmp.path().join("journal.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_private(&link, true).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn read_own_file_wants_a_private_regular_file() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        write_private_file(&f, b"doc").unwrap();
        assert_eq!(read_own_file(&f).unwrap().as_slice(), b"doc");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_own_file(&f).is_none());
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(read_own_file(&link).is_none());
    }
}

//! Reading sources: files, directories (kubelet volumes through `..data`) and
//! globs, into framed certificate blocks with the path they came from.
//!
//! This module owns "what bytes are there", never "are they trustworthy"
//! (that is [`crate::bundle`]). It must never read a file whole past
//! [`MAX_FILE_SIZE`], never block on a FIFO, and never put the content of a
//! private-key block into a value or an error.

pub mod mounts;
pub mod pem;
pub mod spiffe;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use pem::{CertBlock, FrameError};
pub use spiffe::SpiffeError;

/// A source file larger than this is refused, not read whole (guarantee 9).
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// The name kubelet's AtomicWriter points at the current generation.
pub const KUBELET_DATA: &str = "..data";

/// How often a kubelet volume is re-read when its generation vanishes while
/// being read (kubelet removed it after a newer swap).
const GENERATION_ATTEMPTS: usize = 16;

/// One configured source, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file or a directory: which one is decided when it is read.
    Path(PathBuf),
    /// A glob pattern (`*`, `?`, `[`); `*` never matches a leading dot.
    Glob(String),
}

impl Source {
    /// Reads a source spec: a pattern if it holds glob metacharacters.
    pub fn parse(spec: &str) -> Result<Self, glob::PatternError> {
        if spec.contains(['*', '?', '[']) {
            glob::Pattern::new(spec)?;
            Ok(Self::Glob(spec.to_owned()))
        } else {
            Ok(Self::Path(PathBuf::from(spec)))
        }
    }

    /// The spec as the user wrote it, for logs.
    pub fn display(&self) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Glob(g) => g.clone(),
        }
    }

    /// Reads every file of this source. An absent path reads as no files; an
    /// unreadable one is an error naming it.
    pub fn read(&self) -> Result<Vec<SourceFile>, SourceError> {
        let mut files = Vec::new();
        match self {
            Self::Path(path) => read_path(path, &mut files)?,
            Self::Glob(pattern) => read_glob(pattern, &mut files)?,
        }
        // Kept until the source changes (see `decode`).
        files.shrink_to_fit();
        Ok(files)
    }
}

/// One file's certificate blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The path as the user sees it (a kubelet volume's visible name, not the
    /// timestamped directory it was read from). Shared by every certificate
    /// found in it, at every render.
    pub path: std::sync::Arc<Path>,
    pub blocks: Vec<CertBlock>,
    /// Where it was read from, when it is a symlink to a file in another
    /// directory than its own (`/etc/ssl/certs` into
    /// `/usr/share/ca-certificates`): that file changes without an event in
    /// the source's directory, so its directory is watched too.
    pub link: Option<Box<Path>>,
}

/// Where the symlink `path` leads when the file it names lies in another
/// directory than `home` (the canonical path of the directory the source
/// reads); `None` for anything else. A symlink's own directory sees it
/// replaced; only its target's sees the target rewritten.
fn outside_target(path: &Path, home: Option<&Path>) -> Option<Box<Path>> {
    let target = fs::canonicalize(path).ok()?;
    (target.parent() != home).then(|| target.into_boxed_path())
}

/// A source that cannot be used; the bundle it feeds is refused.
#[derive(Debug)]
pub struct SourceError {
    pub path: PathBuf,
    pub kind: SourceErrorKind,
}

#[derive(Debug)]
pub enum SourceErrorKind {
    /// Permissions, a symlink loop, a directory where a file was, ...
    Unreadable(io::Error),
    /// Over [`MAX_FILE_SIZE`].
    TooLarge { size: u64 },
    /// The file is empty (or only whitespace): a copy caught half-way.
    Empty,
    /// No PEM block at all and not a DER certificate.
    NotCertificate,
    /// A certificate block is damaged.
    Damaged(FrameError),
    /// A JSON file that is not a usable SPIFFE bundle.
    DamagedSpiffe(SpiffeError),
}

impl SourceError {
    /// A path that held a file at the last read and is a directory now.
    pub fn directory_where_a_file_was(path: &Path) -> Self {
        unreadable(
            path,
            io::Error::new(io::ErrorKind::IsADirectory, "a directory where a file was"),
        )
    }

    fn new(path: &Path, kind: SourceErrorKind) -> Self {
        Self {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// A short stable label, used as the metrics `reason`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            SourceErrorKind::Unreadable(_) => "unreadable",
            SourceErrorKind::TooLarge { .. } => "too_large",
            SourceErrorKind::Empty => "empty",
            SourceErrorKind::NotCertificate => "not_certificate",
            SourceErrorKind::Damaged(_) | SourceErrorKind::DamagedSpiffe(_) => "damaged",
        }
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        match &self.kind {
            SourceErrorKind::Unreadable(e) => write!(f, "{path}: cannot read: {e}"),
            SourceErrorKind::TooLarge { size } => write!(
                f,
                "{path}: {size} bytes is over the {MAX_FILE_SIZE}-byte limit for a source file"
            ),
            SourceErrorKind::Empty => write!(f, "{path}: the file is empty"),
            SourceErrorKind::NotCertificate => {
                write!(f, "{path}: holds no PEM block and is not a DER certificate")
            }
            SourceErrorKind::Damaged(e) => write!(f, "{path}: {e}"),
            SourceErrorKind::DamagedSpiffe(e) => write!(f, "{path}: {e}"),
        }
    }
}

impl std::error::Error for SourceError {}

fn unreadable(path: &Path, e: io::Error) -> SourceError {
    SourceError::new(path, SourceErrorKind::Unreadable(e))
}

fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// A FIFO, socket or device: never opened in a way that could block, never
/// read (guarantee 10).
fn not_regular(path: &Path) -> SourceError {
    unreadable(
        path,
        io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
    )
}

fn read_path(path: &Path, out: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    // A kubelet volume says so by its `..data` link: one readlink, no stat
    // (a thousand volumes are read at start).
    if let Ok(target) = fs::read_link(path.join(KUBELET_DATA)) {
        return read_dir(path, Some(target), out);
    }
    let (meta, is_link) = stat(path);
    match meta {
        Ok(meta) if meta.is_dir() => read_dir(path, None, out),
        Ok(meta) if !meta.is_file() => Err(not_regular(path)),
        Ok(_) => {
            if let Some(file) = read_file(path, path)? {
                out.push(with_link(file, path, is_link, &mut Homes::new()));
            }
            Ok(())
        }
        // A vanished file or a dangling symlink counts as absent.
        Err(e) if is_absent(&e) => Ok(()),
        Err(e) => Err(unreadable(path, e)),
    }
}

/// What is at `path`, followed, and whether `path` itself is a symlink:
/// one `lstat`, and a `stat` only for a symlink, where `fs::metadata`
/// alone would not tell.
fn stat(path: &Path) -> (io::Result<fs::Metadata>, bool) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => (fs::metadata(path), true),
        other => (other, false),
    }
}

/// Directories and their real paths, resolved once each: a glob's matches
/// (`/etc/ssl/certs/*.pem`, all symlinks) mostly share one.
type Homes = std::collections::HashMap<PathBuf, Option<PathBuf>>;

/// `file`, read at `path`, with where it leads when `path` is a symlink
/// (`is_link`) out of its own directory.
fn with_link(file: SourceFile, path: &Path, is_link: bool, homes: &mut Homes) -> SourceFile {
    if !is_link {
        return file;
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    let home = homes
        .entry(parent.to_path_buf())
        .or_insert_with(|| fs::canonicalize(parent).ok());
    let link = outside_target(path, home.as_deref());
    SourceFile { link, ..file }
}

fn read_glob(pattern: &str, out: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    let options = glob::MatchOptions {
        require_literal_leading_dot: true,
        ..glob::MatchOptions::new()
    };
    let paths = glob::glob_with(pattern, options).map_err(|e| {
        unreadable(
            Path::new(pattern),
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        )
    })?;
    let mut homes = Homes::new();
    for entry in paths {
        let path = entry.map_err(|e| {
            let path = e.path().to_path_buf();
            unreadable(&path, e.into())
        })?;
        let (meta, is_link) = stat(&path);
        match meta {
            Ok(meta) if meta.is_file() => {
                if let Some(file) = read_file(&path, &path)? {
                    out.push(with_link(file, &path, is_link, &mut homes));
                }
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(not_regular(&path)),
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(unreadable(&path, e)),
        }
    }
    Ok(())
}

/// Reads a directory; a kubelet volume is read through `..data`, one
/// generation at a time (ARCHITECTURE.md, "Kubernetes volumes"). `data`:
/// where `..data` pointed, if the caller just looked.
fn read_dir(
    dir: &Path,
    data: Option<PathBuf>,
    out: &mut Vec<SourceFile>,
) -> Result<(), SourceError> {
    let mut looked = data;
    let data = dir.join(KUBELET_DATA);
    for _ in 0..GENERATION_ATTEMPTS {
        let link = match looked.take() {
            Some(target) => Ok(target),
            None => fs::read_link(&data),
        };
        let generation = match link {
            Ok(target) => dir.join(target),
            // Not a kubelet volume (no `..data`, or not a symlink).
            Err(e) if is_absent(&e) || e.kind() == io::ErrorKind::InvalidInput => {
                return read_entries(dir, dir, out, false).map(|_| ());
            }
            Err(e) => return Err(unreadable(&data, e)),
        };
        let mut files = Vec::new();
        match read_entries(&generation, dir, &mut files, true) {
            // Still the live generation after the read: kubelet swaps
            // `..data` before it removes the old one, so a generation that
            // was being removed while read shows here as replaced.
            Ok(true) if fs::read_link(&data).is_ok_and(|now| dir.join(now) == generation) => {
                out.append(&mut files);
                return Ok(());
            }
            Ok(true) => continue,
            // `..data` still names a generation that is not there: no swap
            // under way (kubelet swaps before it removes), a dangling link.
            Ok(false)
                if fs::read_link(&data).is_ok_and(|now| dir.join(now) == generation)
                    && fs::symlink_metadata(&generation).is_err_and(|e| is_absent(&e)) =>
            {
                return Err(unreadable(
                    &data,
                    io::Error::other(format!(
                        "it names {}, which does not exist",
                        generation.display()
                    )),
                ));
            }
            // The generation was removed under us: a newer one is live.
            Ok(false) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(unreadable(
        dir,
        io::Error::other("the kubelet volume kept changing while it was read"),
    ))
}

/// Reads the files of `dir`, naming them under `visible`. With `generation`,
/// a vanished directory or file means the generation is gone: returns
/// `Ok(false)` so the caller starts again.
fn read_entries(
    dir: &Path,
    visible: &Path,
    out: &mut Vec<SourceFile>,
    generation: bool,
) -> Result<bool, SourceError> {
    use rustix::fs::{Dir, FileType, Mode, OFlags};
    use std::os::unix::ffi::OsStrExt;
    // One open of the directory, for its listing and for opening its files
    // relative to it (no path walk per file). rustix lists it with
    // getdents64 alone: libc's opendir adds an fstat, two fcntl and a
    // rewind to every listing, and every render lists each source.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let opened = rustix::fs::openat(rustix::fs::CWD, dir, flags, Mode::empty());
    let mut listing = match opened.and_then(Dir::new) {
        Ok(listing) => listing,
        Err(rustix::io::Errno::NOENT) => return Ok(!generation),
        Err(e) => return Err(unreadable(dir, e.into())),
    };
    let mut names = Vec::new();
    for entry in listing.by_ref() {
        let entry = entry.map_err(|e| unreadable(dir, e.into()))?;
        let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
        // `.`, `..`, and kubelet's `..data` and generations.
        if name.as_encoded_bytes().starts_with(b".")
            && (name.len() == 1 || name.as_encoded_bytes().starts_with(b".."))
        {
            continue;
        }
        // The type from the directory listing costs no system call; only a
        // symlink (or a filesystem that does not say) needs a stat.
        let kind = match entry.file_type() {
            FileType::RegularFile => Some(Kind::File),
            FileType::Directory => Some(Kind::Dir),
            FileType::Symlink | FileType::Unknown => None,
            _ => Some(Kind::Other),
        };
        let link = entry.file_type() == FileType::Symlink;
        names.push((name.to_os_string(), kind, link));
    }
    // Sorted, so that errors and logs come in a stable order.
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let handle = listing.fd().map_err(|e| unreadable(dir, e.into()))?;
    // The directory's own path, once, if a symlink is to be followed.
    let home = std::sync::OnceLock::new();
    let home = || home.get_or_init(|| fs::canonicalize(dir).ok()).as_deref();
    // What each entry holds, read in parallel for large directories.
    let read = crate::parallel::map(&names, |(name, kind, link)| {
        let shown = visible.join(name);
        let kind = match kind {
            Some(kind) => Ok(*kind),
            None => fs::metadata(dir.join(name)).map(|m| match m.file_type() {
                t if t.is_file() => Kind::File,
                t if t.is_dir() => Kind::Dir,
                _ => Kind::Other,
            }),
        };
        let entry = match kind {
            // A kubelet generation's subdirectory (a projected item's
            // path `signers/a.pem`) is part of that one generation.
            Ok(Kind::Dir) if generation && !link => Ok(Entry::Dir),
            Ok(Kind::Dir) => Ok(Entry::Other),
            // A FIFO, socket or device fails the bundle, as any unreadable
            // file does; it is never opened.
            Ok(Kind::Other) => Err(not_regular(&shown)),
            Ok(Kind::File) => {
                match open_at(handle, name, &shown).and_then(|f| read_open(f, &shown)) {
                    Ok(Some(bytes)) => decode(&bytes)
                        .map(|blocks| {
                            let link = link.then(|| outside_target(&dir.join(name), home()));
                            Entry::File(blocks, link.flatten())
                        })
                        .map_err(|kind| SourceError::new(&shown, kind)),
                    Ok(None) => Ok(Entry::Vanished),
                    Err(e) => Err(e),
                }
            }
            Err(e) if is_absent(&e) => Ok(Entry::Vanished),
            Err(e) => Err(unreadable(&shown, e)),
        };
        (shown, entry)
    });
    for (shown, entry) in read {
        match entry? {
            Entry::File(blocks, link) => out.push(SourceFile {
                path: shown.into(),
                blocks,
                link,
            }),
            Entry::Dir => {
                let name = shown.file_name().unwrap_or_default();
                if !read_entries(&dir.join(name), &shown, out, true)? {
                    return Ok(false);
                }
            }
            Entry::Vanished if generation => return Ok(false),
            Entry::Vanished | Entry::Other => {}
        }
    }
    Ok(true)
}

/// What a directory entry is.
#[derive(Clone, Copy)]
enum Kind {
    File,
    Dir,
    /// A FIFO, socket or device.
    Other,
}

/// What a directory entry turned out to be.
enum Entry {
    /// A directory of a kubelet generation: read too.
    Dir,
    /// Its blocks, and where it leads if it is a symlink out of its
    /// directory.
    File(Vec<CertBlock>, Option<Box<Path>>),
    Vanished,
    Other,
}

/// Opens `name` in the directory `dir` for reading; `None` if absent.
fn open_at(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    shown: &Path,
) -> Result<Option<File>, SourceError> {
    use nix::fcntl::{OFlag, openat};
    // Non-blocking: a FIFO swapped in after the stat must not hang the
    // open; `read_open` then refuses anything but a regular file.
    match openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(unreadable(shown, e.into())),
    }
}

/// Reads and frames one file; `None` if it vanished. `shown` is the path
/// errors name.
pub fn read_file(path: &Path, shown: &Path) -> Result<Option<SourceFile>, SourceError> {
    let Some(bytes) = read_bounded(path, shown)? else {
        return Ok(None);
    };
    let blocks = decode(&bytes).map_err(|kind| SourceError::new(shown, kind))?;
    Ok(Some(SourceFile {
        path: shown.into(),
        blocks,
        link: None,
    }))
}

/// Reads at most [`MAX_FILE_SIZE`] bytes of a regular file; `None` if the
/// file is absent. A FIFO, socket or device is refused without blocking.
pub fn read_bounded(path: &Path, shown: &Path) -> Result<Option<Vec<u8>>, SourceError> {
    match open_nonblocking(path) {
        Ok(file) => read_open(Some(file), shown),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(unreadable(shown, e)),
    }
}

/// Opens `path` for reading without ever blocking in `open()` (a FIFO with
/// no writer would), and without taking it as a controlling terminal.
pub fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
}

/// Reads an open file, at most [`MAX_FILE_SIZE`] bytes.
fn read_open(file: Option<File>, shown: &Path) -> Result<Option<Vec<u8>>, SourceError> {
    let Some(mut file) = file else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(|e| unreadable(shown, e))?;
    if meta.is_dir() {
        return Err(unreadable(
            shown,
            io::Error::new(io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    if !meta.is_file() {
        return Err(not_regular(shown));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(SourceError::new(
            shown,
            SourceErrorKind::TooLarge { size: meta.len() },
        ));
    }
    // One byte more than the file holds: a regular file that fills the
    // buffer has grown since the fstat. Never read past the limit.
    let mut bytes = vec![0u8; meta.len() as usize + 1];
    let mut filled = 0;
    loop {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unreadable(shown, e)),
        }
        if filled < bytes.len() {
            // A short read of a regular file is its end.
            break;
        }
        if filled as u64 > MAX_FILE_SIZE {
            return Err(SourceError::new(
                shown,
                SourceErrorKind::TooLarge {
                    size: filled as u64,
                },
            ));
        }
        let grown = (bytes.len() * 2).min(MAX_FILE_SIZE as usize + 1);
        bytes.resize(grown.max(filled + 1), 0);
    }
    bytes.truncate(filled);
    Ok(Some(bytes))
}

/// Frames a file's bytes: a SPIFFE bundle (JSON), PEM blocks, or one DER
/// certificate.
pub fn decode(bytes: &[u8]) -> Result<Vec<CertBlock>, SourceErrorKind> {
    // Kept until the file changes: without the room a push leaves (four
    // blocks for one), a thousand one-CA sources hold 170 KB less.
    let mut blocks = frame_any(bytes)?;
    blocks.shrink_to_fit();
    Ok(blocks)
}

fn frame_any(bytes: &[u8]) -> Result<Vec<CertBlock>, SourceErrorKind> {
    // Before PEM: a JSON document may quote a PEM block in a string, and is
    // still JSON.
    if spiffe::looks_like_json(bytes) {
        return spiffe::frame(bytes).map_err(SourceErrorKind::DamagedSpiffe);
    }
    if pem::looks_like_pem(bytes) {
        let framed = pem::frame(bytes).map_err(SourceErrorKind::Damaged)?;
        return Ok(framed.certificates);
    }
    if bytes.trim_ascii().is_empty() {
        return Err(SourceErrorKind::Empty);
    }
    // A DER certificate is a SEQUENCE; anything else is not ours.
    if bytes.first() == Some(&0x30) {
        // A DER private key (PKCS#8, PKCS#1, SEC1) is skipped, as a PEM one
        // is (guarantee 8): its SEQUENCE opens with a version INTEGER, a
        // certificate's with the SEQUENCE of its body.
        if rustls_pki_types::PrivateKeyDer::try_from(bytes).is_ok() {
            return Ok(Vec::new());
        }
        return Ok(vec![CertBlock::new(bytes.to_vec(), false)]);
    }
    Err(SourceErrorKind::NotCertificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).expect("write");
    }

    #[test]
    fn parses_specs() {
        assert_eq!(
            Source::parse("/a/b").expect("spec"),
            Source::Path("/a/b".into())
        );
        assert_eq!(
            Source::parse("/a/*.pem").expect("spec"),
            Source::Glob("/a/*.pem".into())
        );
        assert!(Source::parse("/a/[").is_err());
    }

    #[test]
    fn absent_path_reads_as_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Source::Path(dir.path().join("nope")).read().expect("read");
        assert!(files.is_empty());
    }

    #[test]
    fn dangling_symlink_is_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("ca.crt");
        std::os::unix::fs::symlink("missing", &link).expect("symlink");
        assert!(
            Source::Path(dir.path().to_path_buf())
                .read()
                .expect("read")
                .is_empty()
        );
        assert!(Source::Path(link).read().expect("read").is_empty());
    }

    /// A volume whose `..data` names a generation that is not there is
    /// unreadable, and says so: nothing is changing.
    #[test]
    fn a_dangling_data_link_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", dir.path().join(KUBELET_DATA))
            .expect("symlink");
        let err = Source::Path(dir.path().to_path_buf())
            .read()
            .expect_err("a dangling ..data");
        let text = err.to_string();
        assert!(
            text.contains("..data")
                && text.contains("..2026_01_01_00_00_00.1, which does not exist"),
            "{text}"
        );
    }

    #[test]
    fn symlink_loop_is_unreadable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        std::os::unix::fs::symlink("a", &a).expect("symlink");
        let err = Source::Path(a.clone()).read().expect_err("a loop");
        assert_eq!(err.reason(), "unreadable");
        assert_eq!(err.path, a);
    }

    #[test]
    fn empty_and_random_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        write(&empty, b"");
        let err = Source::Path(empty.clone()).read().expect_err("empty");
        assert_eq!(err.reason(), "empty");
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let random = dir.path().join("random.bin");
        write(&random, &[0x9c, 0x01, 0xff, 0x42, 0x00, 0x13]);
        let err = Source::Path(random).read().expect_err("random");
        assert_eq!(err.reason(), "not_certificate");
    }

    #[test]
    fn oversize_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.pem");
        let file = File::create(&big).expect("create");
        file.set_len(MAX_FILE_SIZE + 1).expect("sparse file");
        let err = Source::Path(big).read().expect_err("too large");
        assert!(
            matches!(err.kind, SourceErrorKind::TooLarge { size } if size == MAX_FILE_SIZE + 1)
        );
    }

    #[test]
    fn directory_skips_dot_dot_names_and_subdirectories() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("..hidden"), b"garbage");
        fs::create_dir(dir.path().join("sub")).expect("mkdir");
        write(
            &dir.path().join("key.pem"),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let files = Source::Path(dir.path().to_path_buf()).read().expect("read");
        assert_eq!(files.len(), 1);
        assert!(files[0].blocks.is_empty());
    }

    #[test]
    fn kubelet_volume_is_read_through_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let generation = dir.path().join("..2026_11_22_10_00_00.1");
        fs::create_dir(&generation).expect("mkdir");
        write(
            &generation.join("ca.crt"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", dir.path().join("..data"))
            .expect("symlink");
        // A stale visible name that kubelet has not removed yet, and a new
        // key whose visible link does not exist yet: neither may count.
        std::os::unix::fs::symlink("..data/old.crt", dir.path().join("old.crt")).expect("symlink");
        let files = Source::Path(dir.path().to_path_buf()).read().expect("read");
        assert_eq!(files.len(), 1);
        assert_eq!(*files[0].path, *dir.path().join("ca.crt"));
    }

    /// A projected volume's item with a path in a subdirectory
    /// (`signers/a.pem`) is in the generation: read, named as kubelet's
    /// visible link shows it. A plain directory's subdirectory is not a
    /// source file.
    #[test]
    fn a_kubelet_generation_is_read_with_its_subdirectories() {
        let block = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let dir = tempfile::tempdir().expect("tempdir");
        let generation = dir.path().join("..2026_11_22_10_00_00.1");
        fs::create_dir_all(generation.join("signers/deep")).expect("mkdir");
        write(&generation.join("top.pem"), block);
        write(&generation.join("signers/deep/a.pem"), block);
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", dir.path().join("..data"))
            .expect("symlink");
        let files = Source::Path(dir.path().to_path_buf()).read().expect("read");
        let names: Vec<&Path> = files.iter().map(|f| &*f.path).collect();
        assert_eq!(
            names,
            [
                dir.path().join("signers/deep/a.pem"),
                dir.path().join("top.pem")
            ]
        );

        let plain = tempfile::tempdir().expect("tempdir");
        fs::create_dir(plain.path().join("sub")).expect("mkdir");
        write(&plain.path().join("top.pem"), block);
        write(&plain.path().join("sub/a.pem"), block);
        let files = Source::Path(plain.path().to_path_buf())
            .read()
            .expect("read");
        assert_eq!(files.len(), 1);
    }

    #[test]
    fn glob_does_not_match_leading_dots() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join(".x.pem"), b"garbage");
        write(
            &dir.path().join("a.pem"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let pattern = format!("{}/*.pem", dir.path().display());
        let files = Source::parse(&pattern).expect("spec").read().expect("read");
        assert_eq!(files.len(), 1);
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("ca.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        // As a file source, inside a directory, through a glob, and read
        // directly: each refuses at once (a blocking open would hang here).
        for source in [
            Source::Path(fifo.clone()),
            Source::Path(dir.path().to_path_buf()),
            Source::parse(&format!("{}/*.pem", dir.path().display())).expect("glob"),
        ] {
            let err = source.read().expect_err("a FIFO");
            assert_eq!(err.path, fifo);
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        let err = read_bounded(&fifo, &fifo).expect_err("a FIFO");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn spiffe_bundle_in_a_kubelet_volume_is_read_beside_pem() {
        use base64::Engine as _;
        let der = {
            let key = rcgen::KeyPair::generate().expect("key");
            let params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.self_signed(&key).expect("cert").der().to_vec()
        };
        let json = format!(
            r#"{{"keys": [{{"use": "x509-svid", "x5c": ["{}"]}}, {{"use": "jwt-svid", "kid": "a"}}]}}"#,
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let generation = dir.path().join("..2026_11_22_10_00_00.1");
        fs::create_dir(&generation).expect("mkdir");
        write(&generation.join("bundle.spiffe"), json.as_bytes());
        write(
            &generation.join("ca.crt"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", dir.path().join("..data"))
            .expect("symlink");
        let files = Source::Path(dir.path().to_path_buf()).read().expect("read");
        assert_eq!(files.len(), 2);
        assert_eq!(*files[0].path, *dir.path().join("bundle.spiffe"));
        assert_eq!(files[0].blocks.len(), 1);
        assert_eq!(*files[0].blocks[0].der, *der);
        assert_eq!(files[1].blocks.len(), 1);

        // A damaged one refuses the read, naming the file and the reason.
        write(
            &generation.join("bundle.spiffe"),
            br#"{"keys": [{"use": "x509-svid""#,
        );
        let err = Source::Path(dir.path().to_path_buf())
            .read()
            .expect_err("damaged");
        assert_eq!(err.reason(), "damaged");
        assert_eq!(err.path, dir.path().join("bundle.spiffe"));
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn json_that_is_not_a_spiffe_bundle_is_damaged() {
        let err = decode(b"  {\"ca\": \"-----BEGIN CERTIFICATE-----\\nAAAA\"}").expect_err("json");
        assert!(matches!(
            err,
            SourceErrorKind::DamagedSpiffe(SpiffeError::NotBundle)
        ));
    }

    #[test]
    fn der_file_is_one_certificate() {
        // A certificate's SEQUENCE opens with the SEQUENCE of its body.
        let blocks = decode(&[0x30, 0x05, 0x30, 0x03, 0x02, 0x01, 0x01]).expect("der");
        assert_eq!(blocks.len(), 1);
        // A key's with its version INTEGER: skipped.
        let blocks = decode(&[0x30, 0x03, 0x02, 0x01, 0x01]).expect("der key");
        assert!(blocks.is_empty());
    }
}

//! Atomic publication of files and directories (guarantee 1).
//!
//! - A file is written to a temporary file in the same directory, given its
//!   mode with `fchmod` (so neither the umask nor a default ACL matters),
//!   synced, and renamed over the output path. A symlink at the path is
//!   replaced, never followed. The rename also gives the output a new
//!   inode, which nginx's certificate cache needs to notice the change.
//! - A directory is built beside the output and swapped in with
//!   `renameat2(RENAME_EXCHANGE)`, so a reader sees the old set or the new
//!   one, never a mix.
//! - A directory that cannot be renamed (a mount point, such as an emptyDir
//!   shared with the app) gets kubelet's layout instead: each generation in a
//!   hidden `..anchorage_*` directory inside it, published by renaming a
//!   `..data` symlink, the visible names being symlinks through `..data`.
//! - A directory output replaces only what anchorage wrote (guarantee 11): a
//!   missing or empty directory, one holding the [`MARKER`] each generation
//!   carries, or one holding only names a directory format produces (an
//!   earlier version's output). Anything else, or a file where the directory
//!   should be, is refused before a byte is written, and nothing is deleted.
//!
//! - A key pair's `split_dir` always gets kubelet's layout, each file with
//!   its own mode ([`publish_generation`]), so a reader that opens
//!   `tls.crt` and `tls.key` through their links never pairs one
//!   generation's certificate with another's key.
//!
//! Nothing here ever writes into the live output in place.
//!
//! A writer that fails says whether the new content went live before it
//! did ([`WriteError::live`]): a step after the swap (a directory's fsync,
//! removing the old set) can fail with the output already new, and the
//! app must still be told (guarantee 12).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::Rendered;

/// The symlink that names the live generation in kubelet's layout.
const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";
/// Our generations inside a mount point; never a name kubelet uses.
const GENERATION_PREFIX: &str = "..anchorage_";
const DIR_MODE: u32 = 0o755;
/// Written into every swapped directory generation: it says the directory
/// is anchorage's to replace. Its name starts with `..`, so source
/// directories, `check` and kubelet-aware readers skip it, as shells and
/// OpenSSL's hashed lookup skip any dot-file.
pub const MARKER: &str = "..anchorage";
const MARKER_TEXT: &[u8] =
    b"This directory is written by anchorage and replaced as a whole at every change.\n";

/// A writer's failure: the error, naming the path and the step, and whether
/// the new content was live when it happened.
#[derive(Debug)]
pub struct WriteError {
    pub error: io::Error,
    /// The step that failed came after the swap: the output holds the new
    /// content, whole; only the tidying after it (an fsync, the old set's
    /// removal) is undone.
    pub live: bool,
}

impl WriteError {
    /// A failure after the new output went live.
    fn after(error: io::Error) -> Self {
        Self { error, live: true }
    }
}

/// A failure that left the previous output in place.
impl From<io::Error> for WriteError {
    fn from(error: io::Error) -> Self {
        Self { error, live: false }
    }
}

impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> Self {
        e.error
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for WriteError {}

/// Writes `rendered` at `path` unless the same bytes (and mode) are already
/// there. Returns whether the output's bytes changed on disk: a file that
/// holds them with another mode only is given the mode, and that is no
/// change (guarantee 3: a reload is sent only when the bytes changed).
pub fn publish(path: &Path, rendered: &Rendered, mode: u32) -> Result<bool, WriteError> {
    publish_comparing(path, rendered, mode, None)
}

/// [`publish`], and where it replaces a regular file (at most 16 MiB), the
/// file's old bytes in `old`: read as they are compared.
pub fn publish_keeping(
    path: &Path,
    rendered: &Rendered,
    mode: u32,
    old: &mut Option<Vec<u8>>,
) -> Result<bool, WriteError> {
    publish_comparing(path, rendered, mode, Some(old))
}

/// [`publish`]; with `old`, a replaced file's old bytes are kept there
/// (without, a file whose size differs is not read at all).
fn publish_comparing(
    path: &Path,
    rendered: &Rendered,
    mode: u32,
    old: Option<&mut Option<Vec<u8>>>,
) -> Result<bool, WriteError> {
    let bytes = match rendered {
        Rendered::Dir(files) => {
            if dir_matches(path, files, mode) {
                return Ok(false);
            }
            write(path, rendered, mode)?;
            return Ok(true);
        }
        Rendered::File(bytes) => bytes,
    };
    match compare_file(path, bytes, mode, old.is_some()) {
        Compared::Same => Ok(false),
        Compared::ModeOnly => {
            step(path, "chmod", || {
                fs::set_permissions(path, Permissions::from_mode(mode))
            })?;
            Ok(false)
        }
        Compared::Differs(on_disk) => {
            write_file(path, bytes, mode)?;
            if let Some(old) = old {
                *old = on_disk;
            }
            Ok(true)
        }
    }
}

/// A file output against the disk.
#[derive(Debug, PartialEq, Eq)]
enum Compared {
    /// The same bytes with the same mode.
    Same,
    /// The same bytes with another mode.
    ModeOnly,
    /// Other bytes, or no regular file; with the bytes it held, if asked.
    Differs(Option<Vec<u8>>),
}

/// Whether `path` already holds `rendered` (what a dry run compares): a
/// file's bytes (its mode alone is set without a change, as [`publish`]
/// does), a directory's files with `mode`.
pub fn matches(path: &Path, rendered: &Rendered, mode: u32) -> bool {
    match rendered {
        Rendered::File(bytes) => {
            !matches!(compare_file(path, bytes, mode, false), Compared::Differs(_))
        }
        Rendered::Dir(files) => dir_matches(path, files, mode),
    }
}

/// Writes `rendered` at `path`, whatever is there (no comparison).
pub fn write(path: &Path, rendered: &Rendered, mode: u32) -> Result<(), WriteError> {
    match rendered {
        Rendered::File(bytes) => write_file(path, bytes, mode),
        Rendered::Dir(files) => write_dir(path, files, mode),
    }
}

/// An I/O error that names the path and what was being done.
fn context(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

/// One step of a writer that changes the disk: `op`, its error naming
/// `path` and `what`. Every such step goes through here, so that the tests
/// can fail each in turn and check what a failure there leaves behind.
fn step<T>(path: &Path, what: &str, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    injected(what)
        .and_then(|()| op())
        .map_err(|e| context(path, what, e))
}

/// An error a test asked for at this step (never outside the tests).
#[inline]
fn injected(what: &str) -> io::Result<()> {
    #[cfg(test)]
    return tests::fault::visit(what);
    #[cfg(not(test))]
    {
        let _ = what;
        Ok(())
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A fresh name beside `path`, hidden, unique within this process and
/// across processes (the pid).
fn temp_beside(path: &Path, kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or(OsStr::new("output"));
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{kind}-{}-{n}", pid()));
    parent_of(path).join(tmp)
}

/// This process's id, asked of the kernel once.
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    step(dir, "sync directory", || File::open(dir)?.sync_all())
}

/// Creates `path` (which must not exist) with exactly `bytes` and `mode`,
/// and its directory if that is missing (made only then, not checked at
/// every write).
fn create_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    };
    let mut file = match injected("create").and_then(|()| open()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = parent_of(path);
            step(parent, "create directory", || fs::create_dir_all(parent))?;
            step(path, "create", open)?
        }
        opened => opened.map_err(|e| context(path, "create", e))?,
    };
    step(path, "write", || file.write_all(bytes))?;
    step(path, "chmod", || {
        file.set_permissions(Permissions::from_mode(mode))
    })?;
    step(path, "sync", || file.sync_all())
}

/// Publishes one file atomically.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let tmp = temp_beside(path, "tmp");
    let result = create_file(&tmp, bytes, mode)
        .and_then(|()| step(path, "rename into place", || fs::rename(&tmp, path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Renamed: the new file is live.
    sync_dir(parent_of(path)).map_err(WriteError::after)
}

/// Publishes a directory of files atomically.
pub fn write_dir(path: &Path, files: &[(String, Vec<u8>)], mode: u32) -> Result<(), WriteError> {
    let entries = with_mode(files, mode);
    // Decided before anything is written: a refusal leaves no trace.
    if place(path)? == Place::Inside {
        return write_generation(path, &entries);
    }
    let parent = parent_of(path);
    step(parent, "create directory", || fs::create_dir_all(parent))?;
    let tmp = temp_beside(path, "new");
    if let Err(e) = fill_dir(&tmp, &entries, Some(mode)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Err(e) = step(path, "rename into place", || fs::rename(&tmp, path)) {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e.into());
            }
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(context(path, "stat", e).into());
        }
        // Not through `step`: the kernel's own EBUSY decides what follows.
        Ok(_) => match injected("swap into place").and_then(|()| exchange(&tmp, path)) {
            // `tmp` now holds the previous output (our directory, or a
            // symlink someone placed there): remove it.
            Ok(()) => {
                step(&tmp, "remove old output", || remove_any(&tmp)).map_err(WriteError::after)?
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                // A mount point: publish inside it instead.
                let _ = fs::remove_dir_all(&tmp);
                return write_generation(path, &entries);
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(context(path, "swap into place", e).into());
            }
        },
    }
    // In place: the new set is live.
    sync_dir(parent).map_err(WriteError::after)
}

/// Why `rendered` would be refused at `path` (guarantee 11), found without
/// writing anything: what `render --dry-run` reports. A file output is
/// never refused here.
pub fn check_writable(path: &Path, rendered: &Rendered) -> io::Result<()> {
    let Rendered::Dir(_) = rendered else {
        // A file goes where a directory is, or into a directory that
        // cannot be made or written.
        if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(context(
                path,
                "rename into place",
                io::Error::from_raw_os_error(nix::libc::EISDIR),
            ));
        }
        return creatable(parent_of(path));
    };
    if fs::symlink_metadata(path).is_err() {
        creatable(parent_of(path))?;
    }
    check_owned(path, rendered)
}

/// Why the directory output `rendered` would be refused at `path`
/// (guarantee 11), found without writing anything. A file output is never
/// refused here.
pub fn check_owned(path: &Path, rendered: &Rendered) -> io::Result<()> {
    let Rendered::Dir(files) = rendered else {
        return Ok(());
    };
    // A directory to swap that turns out to be a mount point (the writer
    // learns it from the swap's EBUSY) is published inside too, where its
    // visible names must not be someone else's files.
    if place(path)? == Place::Swap && !crate::source::mounts::is_mount_point(path) {
        return Ok(());
    }
    match foreign_visible(path, &with_mode(files, 0))? {
        Some(visible) => Err(not_ours(&visible)),
        None => Ok(()),
    }
}

/// Why `render` could not create a file in `dir` (making `dir` first if it
/// is missing), found without writing: the nearest existing directory at
/// or above it is not a directory, or not one this process may write in.
fn creatable(dir: &Path) -> io::Result<()> {
    use nix::unistd::{AccessFlags, access};
    let mut current = dir;
    loop {
        // Followed, as `create_dir_all` follows it.
        match fs::metadata(current) {
            Ok(meta) if meta.is_dir() => {
                return access(current, AccessFlags::W_OK | AccessFlags::X_OK)
                    .map_err(|e| context(current, "create", e.into()));
            }
            Ok(_) => {
                return Err(context(
                    current,
                    "create directory",
                    io::Error::from_raw_os_error(nix::libc::ENOTDIR),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match current.parent() {
                Some(up) if !up.as_os_str().is_empty() => current = up,
                _ => return Ok(()),
            },
            Err(e) => return Err(context(current, "stat", e)),
        }
    }
}

/// What a dry run says of `files` (name, bytes, mode) published in
/// kubelet's layout inside `dir` ([`publish_generation`]): whether they
/// would change what is live there, or why they would be refused.
pub fn check_generation(dir: &Path, files: &[(&str, &[u8], u32)]) -> io::Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(context(
            dir,
            "create directory",
            io::Error::from(io::ErrorKind::AlreadyExists),
        )),
        Ok(_) => {
            creatable(dir)?;
            match foreign_visible(dir, files)? {
                Some(visible) => Err(not_ours(&visible)),
                None => Ok(!generation_matches(dir, files)),
            }
        }
        Err(_) => creatable(dir).map(|()| true),
    }
}

/// Whether a directory output may replace what is at its path.
enum Ownership {
    Ours,
    /// Not ours, and why (for the refusal).
    Foreign(String),
}

/// Whether the thing at `path` is anchorage's to replace: nothing, a
/// symlink (replaced, never followed, guarantee 1), an empty directory, or
/// one holding only regular files named as a directory format names them,
/// with or without [`MARKER`] (an earlier version wrote none). A name added
/// beside anchorage's since it wrote the directory makes it foreign.
fn ownership(path: &Path) -> io::Result<Ownership> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Ownership::Ours),
        Err(e) => return Err(context(path, "stat", e)),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Ok(Ownership::Ours);
    }
    if !kind.is_dir() {
        let what = if kind.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        return Ok(Ownership::Foreign(format!(
            "{what} is there, not a directory anchorage wrote"
        )));
    }
    // The first foreign name in order, so the message is stable.
    let mut foreign: Option<std::ffi::OsString> = None;
    let mut others = 0usize;
    for entry in fs::read_dir(path).map_err(|e| context(path, "list", e))? {
        let entry = entry.map_err(|e| context(path, "list", e))?;
        let name = entry.file_name();
        // The marker says anchorage wrote the directory, not that all it
        // holds now is anchorage's: a file someone added since is theirs.
        let ours = (name == MARKER || name.to_str().is_some_and(super::format::is_dir_output_name))
            && entry.file_type().is_ok_and(|t| t.is_file());
        if ours {
            continue;
        }
        match &foreign {
            Some(first) if *first <= name => others += 1,
            Some(_) => {
                others += 1;
                foreign = Some(name);
            }
            None => foreign = Some(name),
        }
    }
    Ok(match foreign {
        None => Ownership::Ours,
        Some(name) => Ownership::Foreign(match others {
            0 => format!("the directory holds {name:?}, which anchorage did not write"),
            n => format!(
                "the directory holds {name:?} and {n} other name(s) anchorage did not write"
            ),
        }),
    })
}

/// The error a refused directory output returns: the path, the reason, and
/// what the user can do.
fn refusal(path: &Path, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{}: refusing to replace it: {reason}; nothing was changed (remove it, or choose a \
             new or empty directory)",
            path.display()
        ),
    )
}

/// One file of a directory: its name, bytes and mode.
type Entry<'a> = (&'a str, &'a [u8], u32);

/// The files of a directory output, all with one mode.
fn with_mode(files: &[(String, Vec<u8>)], mode: u32) -> Vec<Entry<'_>> {
    files
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice(), mode))
        .collect()
}

/// Creates directory `dir` holding `files` (and [`MARKER`] with that mode,
/// if `marker`), all data synced.
fn fill_dir(dir: &Path, files: &[Entry<'_>], marker: Option<u32>) -> io::Result<()> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    step(dir, "create directory", || fs::create_dir(dir))?;
    step(dir, "chmod", || {
        fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
    })?;
    let handle = step(dir, "open", || File::open(dir))?;
    // Thousands of files: created relative to the directory (no path walk
    // each), given their mode at creation, and chmod'ed only where that
    // mode may not be what they got: the umask took bits from it, or the
    // directory inherited a default ACL, under which the kernel ignores the
    // umask and masks the mode with the ACL instead.
    let (acl, umask) = (inherits_default_acl(&handle), umask());
    let needs_chmod = |mode: u32| acl || umask.is_none_or(|mask| mode & mask != 0);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
    // Once a file failed, the others are not tried: a full disk fails them
    // all, and the directory is removed anyway.
    let failed = AtomicBool::new(false);
    let create = |&(name, bytes, mode): &Entry<'_>| -> io::Result<()> {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        // The path is spelled out only for an error.
        let fail = |what: &str, e: io::Error| {
            failed.store(true, Ordering::Relaxed);
            context(&dir.join(name), what, e)
        };
        let fd = injected("create")
            .and_then(|()| {
                Ok(openat(
                    &handle,
                    name,
                    flags,
                    Mode::from_bits_truncate(mode),
                )?)
            })
            .map_err(|e| fail("create", e))?;
        let mut file = File::from(fd);
        injected("write")
            .and_then(|()| file.write_all(bytes))
            .map_err(|e| fail("write", e))?;
        if needs_chmod(mode) {
            injected("chmod")
                .and_then(|()| file.set_permissions(Permissions::from_mode(mode)))
                .map_err(|e| fail("chmod", e))?;
        }
        Ok(())
    };
    // A hashed directory of a whole trust store is thousands of files: they
    // are created on all cores (the directory is not published yet, and
    // the kernel's lock on it covers only each name's creation, not the
    // writes). The first failure in the files' order is the one reported
    // (a file skipped after a failure is no failure of its own).
    crate::parallel::map(files, create)
        .into_iter()
        .collect::<io::Result<()>>()?;
    // The marker, when there is one, is one more file, after the others.
    if let Some(mode) = marker {
        create(&(MARKER, MARKER_TEXT, mode))?;
    }
    // One syncfs instead of a fsync per file: thousands of certificates
    // would otherwise mean thousands of journal commits.
    step(dir, "sync", || Ok(nix::unistd::syncfs(&handle)?))
}

/// Whether files created in `dir` may get their mode from a default ACL:
/// it has one, or the question has no clear answer.
fn inherits_default_acl(dir: &File) -> bool {
    match rustix::fs::fgetxattr_query(dir, "system.posix_acl_default") {
        Ok(_) => true,
        Err(e) => !matches!(e, rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP),
    }
}

/// This process's umask, from /proc (reading it with umask(2) would change
/// it for a moment under the other threads).
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let value = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(value.trim(), 8).ok()
    })
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Atomically exchanges two paths. Where the kernel or filesystem cannot, the
/// old output is moved aside first: a reader may then briefly find nothing,
/// but never a mix.
fn exchange(new: &Path, live: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        match renameat2(AT_FDCWD, new, AT_FDCWD, live, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let aside = temp_beside(live, "old");
    fs::rename(live, &aside)?;
    if let Err(e) = fs::rename(new, live) {
        let _ = fs::rename(&aside, live);
        return Err(e);
    }
    fs::rename(&aside, new)
}

/// How a directory output is published at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A new directory swapped in whole (or moved into place).
    Swap,
    /// A generation published inside it through `..data`, its other files
    /// kept: a mount point, or a directory anchorage already publishes so.
    Inside,
}

/// Where the directory output at `path` goes, or why it is refused
/// (guarantee 11), found without writing anything: the writer and the
/// checks before a write ([`check_owned`]) decide alike.
fn place(path: &Path) -> io::Result<Place> {
    match data_link(path)? {
        Some(Link::Ours) => return Ok(Place::Inside),
        Some(Link::Foreign) => return Err(refusal(path, FOREIGN_DATA)),
        None => {}
    }
    match ownership(path)? {
        Ownership::Ours => Ok(Place::Swap),
        // Its other files stay; ours go in through `..data` beside them.
        Ownership::Foreign(_) if crate::source::mounts::is_mount_point(path) => Ok(Place::Inside),
        Ownership::Foreign(reason) => Err(refusal(path, &reason)),
    }
}

/// Whether `dir` holds a generation anchorage published through `..data`.
fn published_inside(dir: &Path) -> bool {
    matches!(data_link(dir), Ok(Some(Link::Ours)))
}

/// Whose a directory's `..data` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A link to a generation anchorage published.
    Ours,
    /// Anything else: kubelet's, a user's own AtomicWriter-style layout, a
    /// file. Publishing through it would orphan their files and links.
    Foreign,
}

/// Why a directory whose `..data` is someone else's is refused.
const FOREIGN_DATA: &str = "its ..data was not written by anchorage (a kubelet volume, or a \
                            directory published the same way)";

/// `dir`'s `..data`: `None` when there is none (or `dir` is no directory).
fn data_link(dir: &Path) -> io::Result<Option<Link>> {
    let data = dir.join(DATA);
    match fs::read_link(&data) {
        Ok(target) => Ok(Some(
            if target
                .to_str()
                .is_some_and(|t| t.starts_with(GENERATION_PREFIX) && !t.contains('/'))
            {
                Link::Ours
            } else {
                Link::Foreign
            },
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => Ok(None),
        // There, and no link.
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(Some(Link::Foreign)),
        Err(e) => Err(context(&data, "read", e)),
    }
}

/// Publishes `files` (name, bytes, mode) inside `dir` in kubelet's layout,
/// creating `dir` if it is missing, unless exactly these files are already
/// live there. Returns whether anything changed on disk.
///
/// A visible name that exists and is not a link through `..data` was not
/// written here: it is refused, never replaced (guarantee 11).
pub fn publish_generation(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<bool, WriteError> {
    if generation_matches(dir, files) {
        return Ok(false);
    }
    step(dir, "create directory", || fs::create_dir_all(dir))?;
    write_generation(dir, files)?;
    Ok(true)
}

/// The first visible name of `files` in `dir` that exists and is not a
/// link through `..data`: a file anchorage did not write there.
fn foreign_visible(dir: &Path, files: &[Entry<'_>]) -> io::Result<Option<PathBuf>> {
    for (name, _, _) in files {
        let visible = dir.join(name);
        match fs::symlink_metadata(&visible) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(context(&visible, "stat", e)),
            Ok(_) if fs::read_link(&visible).is_ok_and(|t| t == Path::new(DATA).join(name)) => {}
            Ok(_) => return Ok(Some(visible)),
        }
    }
    Ok(None)
}

/// The error for a visible name that is a file anchorage did not write.
fn not_ours(visible: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{}: exists and was not written by anchorage; it is never replaced",
            visible.display()
        ),
    )
}

/// Publishes inside a directory that cannot itself be replaced, the way
/// kubelet's AtomicWriter does. Refuses (and writes nothing) where a
/// visible name is a file anchorage did not write. The new set is live once
/// `..data` names it and every visible name links through it.
fn write_generation(dir: &Path, files: &[Entry<'_>]) -> Result<(), WriteError> {
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = GENERATION.fetch_add(1, Ordering::Relaxed);
    let name = format!("{GENERATION_PREFIX}{stamp}_{}_{n}", pid());
    let generation = dir.join(&name);
    // A mount point or a split dir keeps its other files, but a visible
    // name published here must never replace a file of someone else's, nor
    // `..data` a generation of someone else's.
    let before = match data_link(dir)? {
        Some(Link::Foreign) => return Err(not_ours(&dir.join(DATA)).into()),
        Some(Link::Ours) => live_names(dir),
        None => Vec::new(),
    };
    if let Some(visible) = foreign_visible(dir, files)? {
        return Err(not_ours(&visible).into());
    }
    if let Err(e) = fill_dir(&generation, files, None) {
        let _ = fs::remove_dir_all(&generation);
        return Err(e.into());
    }
    let data_tmp = dir.join(DATA_TMP);
    let _ = fs::remove_file(&data_tmp);
    let published = step(&data_tmp, "symlink", || {
        std::os::unix::fs::symlink(&name, &data_tmp)
    })
    .and_then(|()| {
        step(dir, "publish ..data", || {
            fs::rename(&data_tmp, dir.join(DATA))
        })
    });
    if let Err(e) = published {
        // Never live: it goes, as a file output's temporary file does.
        let _ = fs::remove_file(&data_tmp);
        let _ = fs::remove_dir_all(&generation);
        return Err(e.into());
    }

    // Visible names: link the new ones, drop the ones that went.
    for (file, _, _) in files {
        let link = dir.join(file);
        let target = Path::new(DATA).join(file);
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        let tmp = temp_beside(&link, "link");
        step(&tmp, "symlink", || {
            std::os::unix::fs::symlink(&target, &tmp)
        })?;
        step(&link, "rename link into place", || fs::rename(&tmp, &link)).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    }
    // Live: what fails from here leaves the new set in place.
    tidy_generations(dir, files, &before, &name).map_err(WriteError::after)
}

/// The names of the generation `dir`'s `..data` names (one anchorage
/// published): the visible links it may own.
fn live_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join(DATA))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// After a generation named `live` went live: removes the older
/// generations and the links of names that went (those the generation
/// before held: a link someone else made through `..data` stays), and
/// syncs the directory.
fn tidy_generations(
    dir: &Path,
    files: &[Entry<'_>],
    before: &[String],
    live: &str,
) -> io::Result<()> {
    let wanted: std::collections::HashSet<&str> = files.iter().map(|(n, _, _)| *n).collect();
    for entry in step(dir, "list", || fs::read_dir(dir))? {
        let entry = entry.map_err(|e| context(dir, "list", e))?;
        let entry_name = entry.file_name();
        let Some(entry_name) = entry_name.to_str() else {
            continue;
        };
        let path = entry.path();
        if entry_name.starts_with(GENERATION_PREFIX) && entry_name != live {
            step(&path, "remove old generation", || remove_any(&path))?;
        } else if !entry_name.starts_with("..")
            && !wanted.contains(entry_name)
            && before.iter().any(|b| b == entry_name)
            && fs::read_link(&path).is_ok_and(|t| t == Path::new(DATA).join(entry_name))
        {
            step(&path, "remove stale link", || fs::remove_file(&path))?;
        }
    }
    sync_dir(dir)
}

/// Whether `path` is a regular file (not a symlink) with these bytes and mode.
fn file_matches(path: &Path, bytes: &[u8], mode: u32) -> bool {
    compare_file(path, bytes, mode, false) == Compared::Same
}

/// `path` against these bytes and mode: a regular file (not a symlink)
/// holding them, with this mode or another, or not; with `keep`, the bytes
/// it holds when they differ. It is read only when it can match, or to
/// keep (a regular file, at most 16 MiB).
fn compare_file(path: &Path, bytes: &[u8], mode: u32, keep: bool) -> Compared {
    const MAX_KEPT: u64 = 16 << 20;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Compared::Differs(None);
    };
    let sized = meta.is_file() && meta.len() == bytes.len() as u64;
    if !(sized || keep && meta.is_file() && meta.len() <= MAX_KEPT) {
        return Compared::Differs(None);
    }
    match fs::read(path) {
        Ok(on_disk) if sized && on_disk == bytes => {
            if meta.permissions().mode() & 0o7777 == mode {
                Compared::Same
            } else {
                Compared::ModeOnly
            }
        }
        Ok(on_disk) => Compared::Differs(keep.then_some(on_disk)),
        Err(_) => Compared::Differs(None),
    }
}

/// Whether the directory output at `path` holds exactly these files.
fn dir_matches(path: &Path, files: &[(String, Vec<u8>)], mode: u32) -> bool {
    let layout = published_inside(path);
    entries_match(path, &with_mode(files, mode), layout)
}

/// Whether `dir` is in kubelet's layout with exactly these files live.
fn generation_matches(dir: &Path, files: &[Entry<'_>]) -> bool {
    published_inside(dir) && entries_match(dir, files, true)
}

/// Whether the directory at `path` holds exactly these files (through
/// `..data` and its visible links when `layout`).
fn entries_match(path: &Path, files: &[Entry<'_>], layout: bool) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_dir() {
        return false;
    }
    let content = if layout {
        match fs::read_link(path.join(DATA)) {
            Ok(generation) => path.join(generation),
            Err(_) => return false,
        }
    } else {
        path.to_path_buf()
    };
    let Ok(entries) = fs::read_dir(&content) else {
        return false;
    };
    let count = entries
        .filter_map(Result::ok)
        .filter(|e| {
            if layout {
                !e.file_name().as_encoded_bytes().starts_with(b"..")
            } else {
                e.file_name() != MARKER
            }
        })
        .count();
    count == files.len()
        && files.iter().all(|&(name, bytes, mode)| {
            file_matches(&content.join(name), bytes, mode)
                && (!layout
                    || fs::read_link(path.join(name))
                        .is_ok_and(|t| t == Path::new(DATA).join(name)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_symlink(path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// Failing a writer's steps ([`step`]) one at a time.
    pub(super) mod fault {
        use std::cell::{Cell, RefCell};
        use std::io;

        thread_local! {
            /// The steps visited on this thread during [`run`], in order.
            static VISITED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
            /// The visit, counted from 0, that fails.
            static FAIL_AT: Cell<Option<usize>> = const { Cell::new(None) };
        }

        pub fn visit(what: &str) -> io::Result<()> {
            VISITED.with_borrow_mut(|visited| {
                let Some(visited) = visited else {
                    return Ok(());
                };
                visited.push(what.to_owned());
                if FAIL_AT.get() == Some(visited.len() - 1) {
                    return Err(io::Error::other("injected fault"));
                }
                Ok(())
            })
        }

        /// Runs `f` with the `at`-th step failing (none with `None`), and
        /// returns what it returned and the steps it visited.
        pub fn run<T>(at: Option<usize>, f: impl FnOnce() -> T) -> (T, Vec<String>) {
            VISITED.set(Some(Vec::new()));
            FAIL_AT.set(at);
            let result = f();
            FAIL_AT.set(None);
            (result, VISITED.take().unwrap_or_default())
        }
    }

    /// Fails each step of `publish` in turn, on a fresh `setup` each time,
    /// and checks what each failure leaves: the error names the step; the
    /// output (as `live` reads it) is whole, the previous one up to `swap`
    /// (the step that makes the new one live) and the new one after it;
    /// until the swap nothing is left beside it; and a publication without a fault then succeeds
    /// and leaves `after_retry` in the output's directory.
    fn each_step_fails_in_turn<L: PartialEq + std::fmt::Debug>(
        setup: impl Fn(&Path) -> PathBuf,
        publish: impl Fn(&Path) -> Result<bool, WriteError>,
        live: impl Fn(&Path) -> L,
        (old, new): (L, L),
        swap: &str,
        after_retry: impl Fn(&Path) -> Vec<String>,
    ) {
        let clean = tempfile::tempdir().expect("tempdir");
        let out = setup(clean.path());
        let (done, steps) = fault::run(None, || publish(&out));
        assert!(done.expect("publish"));
        assert_eq!(live(&out), new);
        let swap_at = steps.iter().position(|s| s == swap);
        let swap_at = swap_at.unwrap_or_else(|| panic!("no {swap:?} among {steps:?}"));
        for (at, what) in steps.iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = setup(dir.path());
            let parent = parent_of(&out).to_path_buf();
            // A directory made on the way lists as empty before.
            let listing = |dir: &Path| {
                if dir.exists() {
                    listing(dir)
                } else {
                    Vec::new()
                }
            };
            let before = listing(&parent);
            let (failed, _) = fault::run(Some(at), || publish(&out));
            let e = failed.expect_err(&format!("step {at} ({what}) did not fail"));
            let message = e.to_string();
            assert!(
                message.contains(&format!(": {what}: injected fault")),
                "step {at} ({what}): {message}"
            );
            // The writer knows which side of the swap it failed on.
            assert_eq!(e.live, at > swap_at, "step {at} ({what}): live");
            if at <= swap_at {
                assert_eq!(live(&out), old, "step {at} ({what}) failed before the swap");
                assert_eq!(listing(&parent), before, "step {at} ({what}) left files");
            } else {
                assert_eq!(live(&out), new, "step {at} ({what}) failed after the swap");
            }
            let (retried, _) = fault::run(None, || publish(&out));
            retried.unwrap_or_else(|e| panic!("retry after step {at} ({what}): {e}"));
            assert_eq!(live(&out), new, "retry after step {at} ({what})");
            // A failure after the swap has the new output live: the retry
            // finds it there and writes nothing, and what the failure kept
            // from going (the old set, an old generation) stays until the
            // next change.
            if at <= swap_at {
                let mut expected = after_retry(&parent);
                expected.sort();
                assert_eq!(listing(&parent), expected, "after step {at} ({what})");
            }
        }
    }

    /// A file output whose writing fails at any step is the old file or
    /// the new one, whole, and a failure before its rename leaves nothing.
    #[test]
    fn a_file_write_failing_at_any_step_leaves_one_whole_file() {
        let new = Rendered::File(b"new bytes".to_vec());
        let read = |out: &Path| fs::read(out).ok();
        // Over a previous output.
        each_step_fails_in_turn(
            |dir| {
                let out = dir.join("bundle.pem");
                fs::write(&out, b"old bytes").expect("write");
                out
            },
            |out| publish(out, &new, 0o644),
            read,
            (Some(b"old bytes".to_vec()), Some(b"new bytes".to_vec())),
            "rename into place",
            |_| vec!["bundle.pem".to_owned()],
        );
        // The first one, its directory made on the way.
        each_step_fails_in_turn(
            |dir| dir.join("made/bundle.pem"),
            |out| publish(out, &new, 0o644),
            read,
            (None, Some(b"new bytes".to_vec())),
            "rename into place",
            |_| vec!["bundle.pem".to_owned()],
        );
    }

    /// A directory output whose writing fails at any step is the old set or
    /// the new one, whole: a failure before the swap leaves nothing beside
    /// it. (One after, removing the old set, leaves the old set beside it,
    /// under the name the error gives.)
    #[test]
    fn a_directory_write_failing_at_any_step_leaves_one_whole_set() {
        let old = files(&[("aaaaaaaa.0", "old a"), ("bbbbbbbb.0", "old b")]);
        let new = files(&[("aaaaaaaa.0", "new a"), ("cccccccc.0", "new c")]);
        let rendered = Rendered::Dir(new.clone());
        each_step_fails_in_turn(
            |dir| {
                let out = dir.join("certs");
                write_dir(&out, &old, 0o644).expect("previous output");
                out
            },
            |out| publish(out, &rendered, 0o644),
            read_all,
            (old.clone(), new.clone()),
            "swap into place",
            |_| vec!["certs".to_owned()],
        );
    }

    /// A split pair whose writing fails at any step shows the old pair or
    /// the new one through its links, never one file of each; what a
    /// failure left is gone after the next publication.
    #[test]
    fn a_split_pair_failing_at_any_step_is_never_mixed() {
        let pair = |n: &str| -> [(String, Vec<u8>, u32); 2] {
            [
                ("tls.crt".into(), format!("chain {n}").into_bytes(), 0o644),
                ("tls.key".into(), format!("key {n}").into_bytes(), 0o600),
            ]
        };
        let entries = |p: &[(String, Vec<u8>, u32); 2]| -> Vec<(String, Vec<u8>)> {
            p.iter().map(|(n, b, _)| (n.clone(), b.clone())).collect()
        };
        let (old, new) = (pair("1"), pair("2"));
        let publish_pair = |out: &Path, p: &[(String, Vec<u8>, u32); 2]| {
            let borrowed: Vec<(&str, &[u8], u32)> = p
                .iter()
                .map(|(n, b, m)| (n.as_str(), b.as_slice(), *m))
                .collect();
            publish_generation(out, &borrowed)
        };
        each_step_fails_in_turn(
            |dir| {
                let out = dir.join("tls");
                publish_pair(&out, &old).expect("previous pair");
                out.join("tls.crt")
            },
            |crt| publish_pair(parent_of(crt), &new),
            |crt| read_all(parent_of(crt)),
            (entries(&old), entries(&new)),
            "publish ..data",
            |dir| {
                let generation = listing(dir)
                    .into_iter()
                    .find(|n| n.starts_with(GENERATION_PREFIX))
                    .expect("a generation");
                vec![
                    DATA.to_owned(),
                    generation,
                    "tls.crt".to_owned(),
                    "tls.key".to_owned(),
                ]
            },
        );
    }

    fn files(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, b)| (n.to_string(), b.as_bytes().to_vec()))
            .collect()
    }

    fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry"))
            .filter(|e| !e.file_name().to_string_lossy().starts_with(".."))
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, fs::read(e.path()).expect("read"))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn file_is_written_with_exact_mode_and_skipped_when_equal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("sub/bundle.pem");
        let rendered = Rendered::File(b"one".to_vec());
        assert!(publish(&out, &rendered, 0o640).expect("publish"));
        assert_eq!(fs::read(&out).expect("read"), b"one");
        assert_eq!(
            fs::metadata(&out).expect("stat").permissions().mode() & 0o7777,
            0o640
        );
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&out).expect("stat"));
        assert!(!publish(&out, &rendered, 0o640).expect("publish"));
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&out).expect("stat")),
            inode
        );
        // A mode change alone is set in place: no change of the bytes, the
        // same file (guarantee 3: no reload).
        assert!(!publish(&out, &rendered, 0o644).expect("publish"));
        assert_eq!(
            fs::metadata(&out).expect("stat").permissions().mode() & 0o7777,
            0o644
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&out).expect("stat")),
            inode
        );
        // No temporary file is left behind.
        assert_eq!(
            fs::read_dir(out.parent().expect("parent"))
                .expect("list")
                .count(),
            1
        );
    }

    /// The old bytes of a replaced file come back; none when nothing was
    /// replaced (the same bytes, no file, a directory in the way).
    #[test]
    fn publish_keeping_returns_what_it_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("bundle.pem");
        let publish_kept = |bytes: &[u8], mode| {
            let mut old = None;
            let changed = publish_keeping(&out, &Rendered::File(bytes.to_vec()), mode, &mut old)
                .expect("publish");
            (changed, old)
        };
        assert_eq!(publish_kept(b"one", 0o644), (true, None));
        assert_eq!(publish_kept(b"one", 0o644), (false, None));
        // Other bytes of another length; the same bytes in another mode are
        // no change (the mode is set in place).
        assert_eq!(
            publish_kept(b"second", 0o644),
            (true, Some(b"one".to_vec()))
        );
        assert_eq!(publish_kept(b"second", 0o600), (false, None));
        assert_eq!(
            publish_kept(b"third!", 0o600),
            (true, Some(b"second".to_vec()))
        );
        fs::remove_file(&out).expect("rm");
        fs::create_dir(&out).expect("mkdir");
        let mut old = None;
        assert!(publish_keeping(&out, &Rendered::File(b"x".to_vec()), 0o644, &mut old).is_err());
        assert_eq!(old, None);
    }

    #[test]
    fn symlink_at_output_is_replaced_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").expect("write");
        let out = dir.path().join("bundle.pem");
        std::os::unix::fs::symlink(&victim, &out).expect("symlink");
        assert!(publish(&out, &Rendered::File(b"new".to_vec()), 0o644).expect("publish"));
        assert_eq!(fs::read(&victim).expect("read"), b"keep me");
        assert!(!is_symlink(&out));
        assert_eq!(fs::read(&out).expect("read"), b"new");
    }

    #[test]
    fn directory_is_swapped_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let first = files(&[("aaaaaaaa.0", "A"), ("bbbbbbbb.0", "B")]);
        assert!(publish(&out, &Rendered::Dir(first.clone()), 0o644).expect("publish"));
        assert_eq!(read_all(&out), first);
        assert!(!publish(&out, &Rendered::Dir(first), 0o644).expect("publish"));
        let second = files(&[("bbbbbbbb.0", "B2"), ("cccccccc.0", "C")]);
        assert!(publish(&out, &Rendered::Dir(second.clone()), 0o600).expect("publish"));
        assert_eq!(read_all(&out), second);
        assert_eq!(
            fs::metadata(out.join("cccccccc.0"))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777,
            0o600
        );
        // Only the output itself is left in its parent.
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    /// More files than one thread creates (see `parallel`'s batch).
    fn many(n: usize, tag: &str) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| (format!("{i:08x}.0"), format!("{tag} {i}").into_bytes()))
            .collect()
    }

    /// Publishes 1,500 files as a new directory output with `mode`, and
    /// checks it holds them: the output, and its files, sorted.
    fn large_output(dir: &Path, mode: u32) -> (PathBuf, Vec<(String, Vec<u8>)>) {
        let out = dir.join("certs");
        let mut files = many(1500, "first");
        assert!(publish(&out, &Rendered::Dir(files.clone()), mode).expect("publish"));
        files.sort();
        assert_eq!(read_all(&out), files);
        (out, files)
    }

    #[test]
    fn a_large_directory_is_written_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (out, files) = large_output(dir.path(), 0o640);
        for (name, _) in &files {
            let mode = fs::metadata(out.join(name))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o640, "{name}");
        }
        assert!(!publish(&out, &Rendered::Dir(files), 0o640).expect("publish"));
    }

    #[test]
    fn a_file_that_cannot_be_created_fails_a_large_directory_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (out, first) = large_output(dir.path(), 0o644);
        // A name the kernel cannot create, far into the list: the files
        // around it are created by other threads.
        let mut second = many(1500, "second");
        second[1200].0 = "missing/1200.0".into();
        let err = publish(&out, &Rendered::Dir(second), 0o644).expect_err("a file failed");
        assert!(err.to_string().contains("missing/1200.0"), "{err}");
        // The output is the first one, whole; nothing else is left.
        assert_eq!(read_all(&out), first);
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn symlink_at_directory_output_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).expect("mkdir");
        let out = dir.path().join("certs");
        std::os::unix::fs::symlink(&elsewhere, &out).expect("symlink");
        let set = files(&[("aaaaaaaa.0", "A")]);
        assert!(publish(&out, &Rendered::Dir(set.clone()), 0o644).expect("publish"));
        assert!(!is_symlink(&out));
        assert_eq!(read_all(&out), set);
        assert_eq!(fs::read_dir(&elsewhere).expect("list").count(), 0);
    }

    #[test]
    fn a_split_pair_is_published_with_a_mode_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("tls");
        let mode = |name: &str| {
            fs::metadata(out.join(name))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };
        let first: [(&str, &[u8], u32); 2] =
            [("tls.crt", b"chain 1", 0o644), ("tls.key", b"key 1", 0o600)];
        assert!(publish_generation(&out, &first).expect("publish"));
        assert_eq!(
            read_all(&out),
            files(&[("tls.crt", "chain 1"), ("tls.key", "key 1")])
        );
        assert!(is_symlink(&out.join("tls.key")));
        assert_eq!((mode("tls.crt"), mode("tls.key")), (0o644, 0o600));
        // The same files: nothing is written.
        let data = fs::read_link(out.join(DATA)).expect("..data");
        assert!(!publish_generation(&out, &first).expect("publish"));
        assert_eq!(fs::read_link(out.join(DATA)).expect("..data"), data);
        // A new pair, another key mode: a new generation, the old one gone.
        let second: [(&str, &[u8], u32); 2] =
            [("tls.crt", b"chain 2", 0o644), ("tls.key", b"key 2", 0o640)];
        assert!(publish_generation(&out, &second).expect("publish"));
        assert_eq!(
            read_all(&out),
            files(&[("tls.crt", "chain 2"), ("tls.key", "key 2")])
        );
        assert_eq!(mode("tls.key"), 0o640);
        let hidden: Vec<_> = fs::read_dir(&out)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".."))
            .collect();
        assert_eq!(hidden.len(), 2, "{hidden:?}");
    }

    #[test]
    fn a_split_pair_never_replaces_a_file_it_did_not_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("tls.key"), b"someone else's key").expect("write");
        let pair: [(&str, &[u8], u32); 2] =
            [("tls.crt", b"chain", 0o644), ("tls.key", b"key", 0o600)];
        let err = publish_generation(dir.path(), &pair).expect_err("refused");
        assert!(
            err.to_string().contains("not written by anchorage"),
            "{err}"
        );
        assert_eq!(
            fs::read(dir.path().join("tls.key")).expect("read"),
            b"someone else's key"
        );
        assert!(!dir.path().join(DATA).exists());
    }

    #[test]
    fn generation_layout_publishes_through_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path();
        let first = files(&[("aaaaaaaa.0", "A"), ("bbbbbbbb.0", "B")]);
        write_generation(out, &with_mode(&first, 0o644)).expect("publish");
        assert_eq!(read_all(out), first);
        assert!(is_symlink(&out.join("aaaaaaaa.0")));
        assert!(dir_matches(out, &first, 0o644));
        // Later writes keep the layout (the `..data` link exists).
        let second = files(&[("bbbbbbbb.0", "B2"), ("cccccccc.0", "C")]);
        assert!(publish(out, &Rendered::Dir(second.clone()), 0o644).expect("publish"));
        assert_eq!(read_all(out), second);
        let generations = fs::read_dir(out)
            .expect("list")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with(GENERATION_PREFIX)
            })
            .count();
        assert_eq!(generations, 1);
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn foreign_directory_is_refused_and_left_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        fs::create_dir_all(out.join("sub")).expect("mkdir");
        fs::write(out.join("sub/deep"), b"deep").expect("write");
        fs::write(out.join("4042bcee.0"), b"theirs").expect("write");
        fs::write(out.join("notes.txt"), b"notes").expect("write");
        let err = publish(&out, &Rendered::Dir(files(&[("aaaaaaaa.0", "A")])), 0o644)
            .expect_err("a foreign directory");
        let text = err.to_string();
        assert!(text.contains(&*out.to_string_lossy()), "{text}");
        assert!(text.contains("notes.txt"), "{text}");
        assert_eq!(listing(&out), ["4042bcee.0", "notes.txt", "sub"]);
        assert_eq!(fs::read(out.join("sub/deep")).expect("read"), b"deep");
        assert_eq!(fs::read(out.join("4042bcee.0")).expect("read"), b"theirs");
        // Refused before anything was built beside it.
        assert_eq!(listing(dir.path()), ["certs"]);
    }

    #[test]
    fn file_where_a_directory_output_goes_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        fs::write(&out, b"a file").expect("write");
        let err = write(&out, &Rendered::Dir(files(&[("aaaaaaaa.0", "A")])), 0o644)
            .expect_err("a regular file");
        assert!(err.to_string().contains("regular file"), "{err}");
        assert_eq!(fs::read(&out).expect("read"), b"a file");
        assert_eq!(listing(dir.path()), ["certs"]);
    }

    #[test]
    fn own_output_carries_the_marker_and_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        publish(&out, &Rendered::Dir(files(&[("aaaaaaaa.0", "A")])), 0o644).expect("publish");
        assert_eq!(listing(&out), [MARKER, "aaaaaaaa.0"]);
        // The marker is not part of the comparison.
        assert!(dir_matches(&out, &files(&[("aaaaaaaa.0", "A")]), 0o644));
        publish(&out, &Rendered::Dir(files(&[("bbbbbbbb.0", "B")])), 0o644).expect("publish");
        assert_eq!(listing(&out), [MARKER, "bbbbbbbb.0"]);
        // A file someone put in it since is theirs: the directory is
        // refused and nothing in it goes (guarantee 11).
        fs::write(out.join("notes.txt"), b"mine").expect("write");
        fs::create_dir(out.join("sub")).expect("mkdir");
        let err = publish(&out, &Rendered::Dir(files(&[("cccccccc.0", "C")])), 0o644)
            .expect_err("a foreign file beside anchorage's");
        assert!(err.to_string().contains("\"notes.txt\""), "{err}");
        assert_eq!(listing(&out), [MARKER, "bbbbbbbb.0", "notes.txt", "sub"]);
        // Taken away: the directory is anchorage's again.
        fs::remove_file(out.join("notes.txt")).expect("rm");
        fs::remove_dir(out.join("sub")).expect("rmdir");
        publish(&out, &Rendered::Dir(files(&[("cccccccc.0", "C")])), 0o644).expect("publish");
        assert_eq!(listing(&out), [MARKER, "cccccccc.0"]);
    }

    #[test]
    fn empty_and_earlier_version_directories_are_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        publish(&empty, &Rendered::Dir(files(&[("aaaaaaaa.0", "A")])), 0o644).expect("empty");
        let old = dir.path().join("old");
        fs::create_dir(&old).expect("mkdir");
        fs::write(old.join("0a1b2c3d.0"), b"old").expect("write");
        fs::write(old.join("ca-certificates.crt"), b"old").expect("write");
        publish(&old, &Rendered::Dir(files(&[("aaaaaaaa.0", "A")])), 0o644)
            .expect("earlier output");
        assert_eq!(listing(&old), [MARKER, "aaaaaaaa.0"]);
        // The same names as symlinks were not written by anchorage.
        let linked = dir.path().join("linked");
        fs::create_dir(&linked).expect("mkdir");
        std::os::unix::fs::symlink("elsewhere", linked.join("0a1b2c3d.0")).expect("symlink");
        publish(
            &linked,
            &Rendered::Dir(files(&[("aaaaaaaa.0", "A")])),
            0o644,
        )
        .expect_err("a symlink anchorage did not write");
        assert_eq!(listing(&linked), ["0a1b2c3d.0"]);
    }

    #[test]
    fn generation_never_replaces_a_foreign_visible_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path();
        fs::write(out.join("aaaaaaaa.0"), b"theirs").expect("write");
        fs::write(out.join("keep"), b"keep").expect("write");
        let err = write_generation(out, &with_mode(&files(&[("aaaaaaaa.0", "A")]), 0o644))
            .expect_err("collision");
        assert!(err.to_string().contains("aaaaaaaa.0"), "{err}");
        assert_eq!(listing(out), ["aaaaaaaa.0", "keep"]);
        fs::remove_file(out.join("aaaaaaaa.0")).expect("rm");
        write_generation(out, &with_mode(&files(&[("aaaaaaaa.0", "A")]), 0o644)).expect("publish");
        assert_eq!(fs::read(out.join("keep")).expect("read"), b"keep");
        assert_eq!(fs::read(out.join("aaaaaaaa.0")).expect("read"), b"A");
    }
}

//! Watching: which directories to watch for each bundle, the inotify
//! instance that watches them, and the routes from a directory's events to
//! the sources they concern.
//!
//! Directories are watched, never files: kubelet replaces a volume by
//! renaming a `..data` symlink, editors write and rename, and a watch on a
//! file would follow it to an inode that is never modified again
//! (ARCHITECTURE.md, "Kubernetes volumes"). An event only says "something
//! here changed"; the daemon re-reads and compares content, so event kinds
//! do not matter. Opens and reads (kubelet's periodic sync) are not asked
//! for at all, and in a source directory the entries named `..*` other than
//! `..data` (kubelet's generations and `..data_tmp`) are never read, so
//! their events concern nobody: a kubelet swap is one event that counts,
//! the rename of `..data`.
//!
//! inotify is driven directly: [`Watch::set`] adds and removes watches
//! with one system call each (it runs on the blocking pool: resolving a
//! path may hang on a stuck filesystem), and [`Events`] reads the queue on
//! the event loop without blocking, so a swap reaches the loop with no
//! thread in between. The kernel's queue is the buffer; its overflow means
//! "re-read everything". This module must never block in [`Events`] and
//! never watch a file.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tracing::{debug, error, warn};

use crate::source::{KUBELET_DATA, Source};

/// What the watcher reports to the event loop.
#[derive(Debug)]
pub enum Change {
    /// Events in watched directories.
    Events(Vec<Event>),
    /// Events were lost: re-read everything.
    Rescan,
}

/// One inotify event: the watch it came from, and the entry it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    wd: WatchDescriptor,
    name: Option<OsString>,
    mask: AddWatchFlags,
}

/// What a watched directory reports: changes of its entries (created,
/// deleted, renamed, written, chmod) and of itself. Never opens or reads.
fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        // A file swapped in for the directory after the stat is not watched.
        | AddWatchFlags::IN_ONLYDIR
}

/// A directory to watch on behalf of a source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchPoint {
    /// Which source of its bundle (or key pair) this point serves.
    pub source: usize,
    pub dir: PathBuf,
    pub recursive: bool,
    /// Only this entry of `dir` matters (the source itself, seen from its
    /// parent); `None`: everything in it.
    pub only: Option<OsString>,
    /// `dir` is read as a source directory: its entries named `..*` are
    /// never read, except `..data` (through which a kubelet volume is).
    pub dot_dot_unread: bool,
}

impl WatchPoint {
    /// `path` alone, seen from its directory (which sees it replaced,
    /// deleted or created); a bare relative name (`ca.pem`) lies in the
    /// working directory.
    pub fn entry(source: usize, path: &Path) -> Option<Self> {
        let (parent, name) = (path.parent()?, path.file_name()?);
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        Some(Self {
            source,
            dir: parent.to_path_buf(),
            recursive: false,
            only: Some(name.to_os_string()),
            dot_dot_unread: false,
        })
    }
}

/// The directories whose changes can change what `source` reads: the path
/// itself (when it is a directory) and its parent, which sees it replaced,
/// deleted or created (and nothing else of the parent counts); for a glob,
/// its fixed prefix and that prefix's parent.
pub fn watch_points(index: usize, source: &Source) -> Vec<WatchPoint> {
    let (dir, recursive, dot_dot_unread) = match source {
        Source::Path(path) => (path.clone(), false, true),
        Source::Glob(pattern) => {
            let (prefix, rest) = glob_prefix(pattern);
            // A wildcard in a directory component: watch the whole subtree.
            (prefix, rest > 1, false)
        }
    };
    let mut points = Vec::with_capacity(2);
    points.extend(WatchPoint::entry(index, &dir));
    points.insert(
        0,
        WatchPoint {
            source: index,
            dir,
            recursive,
            only: None,
            dot_dot_unread,
        },
    );
    points
}

/// The leading components of a glob without metacharacters, and how many
/// components follow.
fn glob_prefix(pattern: &str) -> (PathBuf, usize) {
    let path = Path::new(pattern);
    let mut prefix = PathBuf::new();
    let mut rest = 0;
    for component in path.components() {
        let text = component.as_os_str().to_string_lossy();
        if rest > 0 || text.contains(['*', '?', '[']) {
            rest += 1;
        } else {
            prefix.push(component);
        }
    }
    if prefix.as_os_str().is_empty() {
        prefix.push(".");
    }
    (prefix, rest)
}

/// One copy of each watched directory's path, shared by every map that
/// names it: the watches, the routes, and the directories of each watch
/// descriptor. A thousand volumes held four copies of each path before.
#[derive(Default)]
struct Paths(HashSet<Arc<Path>>);

impl Paths {
    /// The shared copy of `path`.
    fn share(&mut self, path: PathBuf) -> Arc<Path> {
        if let Some(known) = self.0.get(path.as_path()) {
            return known.clone();
        }
        let shared: Arc<Path> = path.into();
        self.0.insert(shared.clone());
        shared
    }
}

/// Resolves directories to their canonical path (one watch per directory,
/// whatever symlinks name it) and their identity, memoised for one
/// refresh: a thousand volumes under one parent cost one lookup each, not
/// a `realpath` walk (a readlink per component) each.
struct Resolver<'a> {
    known: HashMap<PathBuf, Option<Resolved>>,
    paths: &'a mut Paths,
}

/// A directory's identity: device and inode.
type DirId = (u64, u64);

/// A directory's canonical path and identity.
type Resolved = (Arc<Path>, DirId);

impl<'a> Resolver<'a> {
    fn new(paths: &'a mut Paths) -> Self {
        Self {
            known: HashMap::new(),
            paths,
        }
    }

    /// `dir`'s canonical path and (device, inode), if it is a directory.
    fn directory(&mut self, dir: &Path) -> Option<Resolved> {
        if let Some(known) = self.known.get(dir) {
            return known.clone();
        }
        let found = self.lookup(dir);
        self.known.insert(dir.to_path_buf(), found.clone());
        found
    }

    fn lookup(&mut self, dir: &Path) -> Option<Resolved> {
        let meta = std::fs::symlink_metadata(dir).ok()?;
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        let canonical = match (meta.file_type().is_symlink(), parent, dir.file_name()) {
            (false, Some(parent), Some(name)) if meta.is_dir() => {
                self.directory(parent)?.0.join(name)
            }
            (false, _, _) if !meta.is_dir() => return None,
            // A symlink, the root, a relative or `..` path: ask the kernel.
            _ => std::fs::canonicalize(dir).ok()?,
        };
        let meta = if meta.file_type().is_symlink() {
            std::fs::metadata(dir).ok()?
        } else {
            meta
        };
        meta.is_dir()
            .then(|| (self.paths.share(canonical), (meta.dev(), meta.ino())))
    }

    /// The nearest existing directory at or above `dir`: the path as given,
    /// its canonical form, and its identity. Above a relative path (`sub`
    /// of `sub/ca.pem`) is the working directory, `.`.
    fn existing_ancestor(&mut self, dir: &Path) -> Option<(PathBuf, Arc<Path>, DirId)> {
        let mut current = Some(dir);
        while let Some(d) = current {
            if let Some((canonical, id)) = self.directory(d) {
                return Some((d.to_path_buf(), canonical, id));
            }
            current = match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => Some(p),
                Some(_) if d != Path::new(".") => Some(Path::new(".")),
                _ => None,
            };
        }
        None
    }
}

/// Who an event in a watched directory concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    bundle: usize,
    source: usize,
    only: Option<OsString>,
    recursive: bool,
    dot_dot_unread: bool,
}

/// A live watch: its descriptor, the directory's identity when it was
/// added, and the directory whose routes its events follow (itself, or
/// the top of a recursive watch).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    wd: WatchDescriptor,
    id: DirId,
    routed_at: Arc<Path>,
}

/// The live inotify watches, kept in step with the sources.
pub struct Watch {
    inotify: Arc<Inotify>,
    /// Watched directory (as its events are reported) -> its watch.
    watched: HashMap<Arc<Path>, Watched>,
    /// Who each directory's events concern, and which directory each
    /// watch descriptor stands for.
    routes: Routes,
    /// Watches the kernel dropped, as the queue reported them.
    dead: Arc<Mutex<Dead>>,
}

fn lock(dead: &Mutex<Dead>) -> std::sync::MutexGuard<'_, Dead> {
    dead.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Watches the kernel dropped (`IN_IGNORED`: the directory was removed),
/// recorded by [`Events`] for the next refresh. A directory created again
/// may get the inode number of the one removed (ext4, XFS do), so its
/// identity alone does not tell that its watch went with the old one.
#[derive(Debug, Default)]
struct Dead {
    wds: HashSet<WatchDescriptor>,
    /// The queue overflowed: which watches went is unknown; every one is
    /// added again (the kernel hands back the live ones unchanged).
    all: bool,
}

/// Why watching could not start or continue, naming the directory.
#[derive(Debug)]
pub enum WatchError {
    /// `fs.inotify.max_user_watches` is exhausted.
    WatchLimit { dir: PathBuf },
    /// `fs.inotify.max_user_instances` is exhausted.
    InstanceLimit { dir: PathBuf },
    /// Any other failure to watch `dir`.
    Failed { dir: PathBuf, reason: String },
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WatchLimit { dir } => write!(
                f,
                "{}: the inotify watch limit is exhausted: raise fs.inotify.max_user_watches \
                 (sysctl) or run with --poll",
                dir.display()
            ),
            Self::InstanceLimit { dir } => write!(
                f,
                "{}: the inotify instance limit is exhausted: raise fs.inotify.max_user_instances \
                 (sysctl) or run with --poll",
                dir.display()
            ),
            Self::Failed { dir, reason } => write!(f, "{}: cannot watch: {reason}", dir.display()),
        }
    }
}

impl std::error::Error for WatchError {}

fn describe(path: &Path, e: Errno) -> WatchError {
    let dir = path.to_path_buf();
    match e {
        Errno::ENOSPC => WatchError::WatchLimit { dir },
        Errno::EMFILE => WatchError::InstanceLimit { dir },
        _ => WatchError::Failed {
            dir,
            reason: io::Error::from(e).to_string(),
        },
    }
}

impl Watch {
    /// Opens an inotify instance: the watch set, and the [`Events`] that
    /// read it (on the event loop: call from within the tokio runtime).
    pub fn new() -> Result<(Self, Events), WatchError> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(|e| describe(Path::new("inotify"), e))?;
        let inotify = Arc::new(inotify);
        // Deprecated because a safe function can be handed a raw fd it does
        // not own; the queue owns its fd (a share of the instance), so the
        // fd outlives the registration.
        #[allow(deprecated)]
        let fd = AsyncFd::new(Queue(inotify.clone())).map_err(|e| WatchError::Failed {
            dir: PathBuf::from("inotify"),
            reason: format!("cannot poll: {e}"),
        })?;
        let dead = Arc::new(Mutex::new(Dead::default()));
        let watch = Self {
            inotify,
            watched: HashMap::new(),
            routes: Routes::default(),
            dead: dead.clone(),
        };
        Ok((watch, Events { fd, dead }))
    }

    /// Brings the watches in line with the filesystem: a directory that was
    /// deleted and created again, or that now exists, is watched afresh; a
    /// missing one is stood in for by its nearest existing ancestor, so its
    /// creation is seen. Only an exhausted watch limit is an error.
    ///
    /// Returns the bundles that gained a watch: what changed in those
    /// directories before the watch existed was not seen (nor are events of
    /// a new watch that reach the loop before these routes do), so they must
    /// be read again.
    ///
    /// `wanted` is what each bundle wants watched, by bundle index; the
    /// loop works it out from the configuration at every refresh, so it is
    /// not kept here.
    pub fn set(&mut self, wanted: &[Vec<WatchPoint>]) -> Result<HashSet<usize>, WatchError> {
        // The paths already watched keep their copy.
        let mut paths = Paths(self.watched.keys().cloned().collect());
        // Directory -> (identity, the directory whose routes it follows).
        let mut desired: HashMap<Arc<Path>, (DirId, Arc<Path>)> = HashMap::new();
        let mut routes: HashMap<Arc<Path>, Vec<Route>> = HashMap::new();
        let mut subtrees: Vec<(Arc<Path>, DirId)> = Vec::new();
        let mut resolver = Resolver::new(&mut paths);
        for (bundle, points) in wanted.iter().enumerate() {
            for point in points {
                let Some((dir, canonical, id)) = resolver.existing_ancestor(&point.dir) else {
                    continue;
                };
                let exact = dir == point.dir;
                let recursive = point.recursive && exact;
                // Standing in for a missing directory: only the entry on the
                // way to it matters.
                let only = if exact {
                    point.only.clone()
                } else {
                    point
                        .dir
                        .strip_prefix(&dir)
                        .ok()
                        .or_else(|| (dir == Path::new(".")).then_some(point.dir.as_path()))
                        .and_then(|rest| rest.components().next())
                        .map(|c| c.as_os_str().to_os_string())
                };
                let dir = canonical;
                desired.insert(dir.clone(), (id, dir.clone()));
                if recursive {
                    subtrees.push((dir.clone(), id));
                }
                let route = Route {
                    bundle,
                    source: point.source,
                    only,
                    recursive,
                    dot_dot_unread: point.dot_dot_unread && exact,
                };
                let list = routes.entry(dir).or_default();
                if !list.contains(&route) {
                    list.push(route);
                }
            }
        }
        for (top, id) in subtrees {
            subdirectories(&top, id, &mut desired, &mut paths);
        }
        let dead = std::mem::take(&mut *lock(&self.dead));
        if dead.all {
            self.watched.clear();
        } else if !dead.wds.is_empty() {
            self.watched.retain(|_, w| !dead.wds.contains(&w.wd));
        }
        let stale: Vec<Arc<Path>> = self
            .watched
            .iter()
            .filter(|(dir, w)| {
                desired
                    .get(&***dir)
                    .is_none_or(|(id, at)| *id != w.id || *at != w.routed_at)
            })
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in stale {
            if let Some(gone) = self.watched.remove(&dir)
                && !self.watched.values().any(|w| w.wd == gone.wd)
            {
                // The directory may already be gone, taking its watch with it.
                let _ = self.inotify.rm_watch(gone.wd);
            }
        }
        let mut result = Ok(());
        let mut gained = HashSet::new();
        for (dir, (id, routed_at)) in desired {
            if self.watched.contains_key(&dir) {
                continue;
            }
            match self.inotify.add_watch(&*dir, watch_mask()) {
                Ok(wd) => {
                    debug!(dir = %dir.display(), "watching");
                    gained.extend(
                        routes
                            .get(&routed_at)
                            .into_iter()
                            .flatten()
                            .map(|r| r.bundle),
                    );
                    self.watched.insert(dir, Watched { wd, id, routed_at });
                }
                Err(e @ Errno::ENOSPC) => {
                    let error = describe(&dir, e);
                    error!("{error}");
                    result = Err(error);
                }
                // Removed (or replaced by a file) between the stat and the
                // watch: the next refresh watches its ancestor.
                Err(e) => debug!(error = %describe(&dir, e), "watch skipped"),
            }
        }
        let mut dirs: HashMap<WatchDescriptor, Vec<Arc<Path>>> =
            HashMap::with_capacity(self.watched.len());
        for (dir, w) in &self.watched {
            // One directory under two names (a bind mount, a symlink in a
            // recursive watch) has one watch: its events concern both.
            dirs.entry(w.wd).or_default().push(dir.clone());
        }
        // Kept until the next refresh, one list per directory: most hold
        // one item, and a push leaves room for four.
        routes.values_mut().for_each(Vec::shrink_to_fit);
        dirs.values_mut().for_each(Vec::shrink_to_fit);
        self.routes = Routes(Arc::new(RouteTable { routes, dirs }));
        result.map(|()| gained)
    }

    /// Who each watched directory's events concern, as of the last refresh:
    /// a snapshot the event loop keeps while a refresh runs elsewhere.
    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    /// How many directories are watched.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

/// Adds every directory under `top` (symlinks followed, each directory
/// once) to `desired`, routed at `top`: a recursive watch is one watch per
/// directory of the subtree.
fn subdirectories(
    top: &Arc<Path>,
    id: DirId,
    desired: &mut HashMap<Arc<Path>, (DirId, Arc<Path>)>,
    paths: &mut Paths,
) {
    let mut seen = HashSet::from([id]);
    let mut todo = vec![top.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let is_dir = match entry.file_type() {
                Ok(t) if t.is_dir() => true,
                Ok(t) if t.is_symlink() => true,
                _ => false,
            };
            if !is_dir {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() && seen.insert((meta.dev(), meta.ino())) {
                desired
                    .entry(paths.share(path.clone()))
                    .or_insert(((meta.dev(), meta.ino()), top.clone()));
                todo.push(path);
            }
        }
    }
}

/// The inotify instance, as the event loop polls it.
struct Queue(Arc<Inotify>);

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Reads inotify's queue on the event loop.
pub struct Events {
    fd: AsyncFd<Queue>,
    dead: Arc<Mutex<Dead>>,
}

/// At most this many events are taken in one wake: the loop goes on with
/// what it has and reads the rest next time.
const EVENTS_PER_WAKE: usize = 4096;

impl Events {
    /// The next events: everything queued when it wakes (never blocks).
    pub async fn recv(&mut self) -> Change {
        loop {
            let mut guard = match self.fd.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    error!(error = %e, "cannot poll inotify; changes are seen only at a resync");
                    return std::future::pending().await;
                }
            };
            let mut events = Vec::new();
            while events.len() < EVENTS_PER_WAKE {
                match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(batch)) => {
                        for e in batch {
                            if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                                warn!("watch events were dropped; re-reading every source");
                                lock(&self.dead).all = true;
                                return Change::Rescan;
                            }
                            if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                                lock(&self.dead).wds.insert(e.wd);
                            }
                            events.push(Event {
                                wd: e.wd,
                                name: e.name,
                                mask: e.mask,
                            });
                        }
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot read inotify; re-reading every source");
                        lock(&self.dead).all = true;
                        return Change::Rescan;
                    }
                    // Drained: readiness cleared.
                    Err(_) => break,
                }
            }
            if !events.is_empty() {
                return Change::Events(events);
            }
        }
    }
}

/// Who each watched directory's events concern.
#[derive(Debug, Default)]
struct RouteTable {
    /// Directory -> the routes of its events.
    routes: HashMap<Arc<Path>, Vec<Route>>,
    /// Watch descriptor -> the directory it watches, under each of its
    /// watched names.
    dirs: HashMap<WatchDescriptor, Vec<Arc<Path>>>,
}

/// Watched directory -> who its events concern.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<RouteTable>);

impl Routes {
    /// The sources (bundle, source index) `event` may concern, added to
    /// `out`. Returns whether it may change what must be watched: a watched
    /// directory or a watched entry itself was created, removed or
    /// renamed, or a directory appeared or went in a recursive watch.
    ///
    /// An event of a watch these routes do not know (added by a refresh
    /// still under way) concerns nobody here: the refresh reports its
    /// bundles as gained, and they are read again.
    pub fn route(&self, event: &Event, out: &mut HashSet<(usize, usize)>) -> bool {
        let Some(names) = self.0.dirs.get(&event.wd) else {
            return false;
        };
        let new_dir = event.mask.contains(AddWatchFlags::IN_ISDIR);
        // The kernel dropped this watch (its directory went): the watches
        // must be set again, even where the directory's identity looks
        // unchanged.
        let mut structural = event.mask.contains(AddWatchFlags::IN_IGNORED);
        for dir in names {
            let path = match &event.name {
                Some(name) => Cow::Owned(dir.join(name)),
                None => Cow::Borrowed(&**dir),
            };
            structural |= self.bundles_for(&path, new_dir, out);
        }
        structural
    }

    /// The sources an event at `path` may concern: routes of its directory
    /// (all of it, or this very entry), of the path itself (a watched
    /// directory that changed), and of recursive watches above it. `is_dir`:
    /// the entry is a directory.
    fn bundles_for(&self, path: &Path, is_dir: bool, out: &mut HashSet<(usize, usize)>) -> bool {
        let table = &self.0.routes;
        let mut structural = false;
        if let Some(routes) = table.get(path) {
            structural = true;
            out.extend(
                routes
                    .iter()
                    .filter(|r| r.only.is_none())
                    .map(|r| (r.bundle, r.source)),
            );
        }
        let name = path.file_name();
        let unread = name.is_some_and(|n| {
            n.as_encoded_bytes().starts_with(b"..") && n != OsStr::new(KUBELET_DATA)
        });
        let mut ancestor = path.parent();
        let mut direct = true;
        while let Some(dir) = ancestor {
            if let Some(routes) = table.get(dir) {
                for route in routes {
                    let entry = direct && route.only.is_some() && route.only.as_deref() == name;
                    // A file inside a kubelet volume changes when `..data`
                    // is renamed over, never its visible link.
                    let matches = if direct {
                        (route.only.is_none() && !(route.dot_dot_unread && unread))
                            || entry
                            || name == Some(OsStr::new(KUBELET_DATA))
                    } else {
                        route.recursive
                    };
                    structural |= entry || (route.recursive && is_dir);
                    if matches {
                        out.insert((route.bundle, route.source));
                    }
                }
            }
            direct = false;
            ancestor = dir.parent();
        }
        structural
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn glob_prefix_stops_at_the_first_wildcard() {
        assert_eq!(
            glob_prefix("/certs/extra/*.pem"),
            (PathBuf::from("/certs/extra"), 1)
        );
        assert_eq!(glob_prefix("/certs/*/ca.crt"), (PathBuf::from("/certs"), 2));
        assert_eq!(glob_prefix("*.pem"), (PathBuf::from("."), 1));
    }

    /// The sources the next events concern (waits up to 10 s for them),
    /// and whether they asked for the watches to be set again.
    async fn next(events: &mut Events, routes: &Routes) -> (HashSet<(usize, usize)>, bool) {
        let change = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an inotify event within 10 s");
        let Change::Events(events) = change else {
            panic!("the queue overflowed");
        };
        let mut hit = HashSet::new();
        let mut structural = false;
        for event in &events {
            structural |= routes.route(event, &mut hit);
        }
        (hit, structural)
    }

    /// A directory removed and made again before the watches are set again
    /// may get the same inode number (ext4 and XFS hand it out again at
    /// once), so it looks unchanged; its watch went with the old one all
    /// the same, and must be added again.
    #[tokio::test]
    async fn a_directory_made_again_is_watched_again_even_with_the_same_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = dir.path().join("extra");
        std::fs::create_dir(&extra).expect("mkdir");
        let (mut watch, mut events) = Watch::new().expect("inotify");
        let wanted = vec![watch_points(0, &Source::Path(extra.clone()))];
        watch.set(&wanted).expect("watch");
        std::fs::remove_dir(&extra).expect("rmdir");
        std::fs::create_dir(&extra).expect("mkdir");
        // Everything the removal and the creation reported, up to the
        // creation seen in the parent.
        let mut structural = false;
        loop {
            let (hit, again) = next(&mut events, &watch.routes()).await;
            structural |= again;
            if hit.contains(&(0, 0)) && structural {
                break;
            }
        }
        watch.set(&wanted).expect("watch again");
        // The rest of what the removal and the creation reported: all of it
        // was queued before `create_dir` returned.
        while let Ok(Change::Events(_)) =
            tokio::time::timeout(Duration::from_millis(50), events.recv()).await
        {}
        // Only the directory's own watch reports a file made in it.
        std::fs::write(extra.join("ca.pem"), "x").expect("write");
        loop {
            let (hit, _) = next(&mut events, &watch.routes()).await;
            if hit.contains(&(0, 0)) {
                break;
            }
        }
    }

    /// One directory reached under two names has one watch; a change in it
    /// concerns the sources under either name.
    #[tokio::test]
    async fn one_directory_under_two_names_reaches_the_sources_of_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("vol");
        let base = dir.path().join("base");
        std::fs::create_dir(&vol).expect("mkdir");
        std::fs::create_dir(&base).expect("mkdir");
        std::os::unix::fs::symlink(&vol, base.join("k")).expect("symlink");
        let glob = format!("{}/*/ca.pem", base.display());
        let (mut watch, mut events) = Watch::new().expect("inotify");
        watch
            .set(&[
                watch_points(0, &Source::Glob(glob)),
                watch_points(0, &Source::Path(vol.join("ca.pem"))),
            ])
            .expect("watch");
        std::fs::write(vol.join("ca.pem"), "x").expect("write");
        let mut hit = HashSet::new();
        while !(hit.contains(&(0, 0)) && hit.contains(&(1, 0))) {
            hit.extend(next(&mut events, &watch.routes()).await.0);
        }
    }

    /// Each watched directory's path is one allocation, shared by the
    /// watches, the routes and the descriptor's directories, and a refresh
    /// keeps the copy of a directory still watched.
    #[tokio::test]
    async fn a_watched_directory_is_named_by_one_shared_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wanted: Vec<_> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let vol = dir.path().join(name);
                std::fs::create_dir(&vol).expect("mkdir");
                watch_points(i, &Source::Path(vol))
            })
            .collect();
        let (mut watch, _events) = Watch::new().expect("inotify");
        watch.set(&wanted).expect("watch");
        let before: Vec<Arc<Path>> = watch.watched.keys().cloned().collect();
        watch.set(&wanted).expect("watch again");
        assert_eq!(watch.len(), 3, "the two volumes and their parent");
        let table = &watch.routes.0;
        for (path, watched) in &watch.watched {
            assert!(
                before.iter().any(|b| Arc::ptr_eq(b, path)),
                "{path:?} copied again"
            );
            assert!(Arc::ptr_eq(&watched.routed_at, path));
            let (routed, _) = table.routes.get_key_value(&**path).expect("routes");
            assert!(Arc::ptr_eq(routed, path));
            let names = table.dirs.get(&watched.wd).expect("descriptor");
            assert!(names.iter().all(|n| Arc::ptr_eq(n, path)));
        }
    }

    /// `--source ca.pem`: its directory is the working directory.
    #[test]
    fn a_bare_relative_name_is_watched_in_the_working_directory() {
        let points = watch_points(0, &Source::Path("ca.pem".into()));
        let parent = points
            .iter()
            .find(|p| p.only.is_some())
            .expect("a parent point");
        assert_eq!(parent.dir, Path::new("."));
        assert_eq!(parent.only.as_deref(), Some(std::ffi::OsStr::new("ca.pem")));
    }

    #[test]
    fn a_path_is_watched_with_its_parent() {
        let points = watch_points(0, &Source::Path("/certs/ca".into()));
        let dirs: Vec<_> = points.iter().map(|p| p.dir.clone()).collect();
        assert_eq!(
            dirs,
            vec![PathBuf::from("/certs/ca"), PathBuf::from("/certs")]
        );
    }
}

//! Watching: which directories to watch for each bundle, and the notify
//! (inotify) watcher that turns their events into [`Change`]s.
//!
//! Directories are watched, never files: kubelet replaces a volume by
//! renaming a `..data` symlink, editors write and rename, and a watch on a
//! file would follow it to an inode that is never modified again
//! (ARCHITECTURE.md, "Kubernetes volumes"). An event only says "something here changed"; the daemon
//! re-reads and compares content, so event kinds do not matter, except that
//! access events (kubelet opens the old generation on every sync) are
//! dropped. The notify callback never blocks: it `try_send`s, and a full
//! queue or an inotify overflow becomes "re-read everything".

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use crate::source::Source;

/// What the watcher reports to the event loop.
#[derive(Debug)]
pub enum Change {
    /// Something changed at or under these paths.
    Paths(Vec<PathBuf>),
    /// Events were lost: re-read everything.
    Rescan,
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
}

/// The directories whose changes can change what `source` reads: the path
/// itself (when it is a directory) and its parent, which sees it replaced,
/// deleted or created (and nothing else of the parent counts); for a glob,
/// its fixed prefix and that prefix's parent.
pub fn watch_points(index: usize, source: &Source) -> Vec<WatchPoint> {
    let (dir, recursive) = match source {
        Source::Path(path) => (path.clone(), false),
        Source::Glob(pattern) => {
            let (prefix, rest) = glob_prefix(pattern);
            // A wildcard in a directory component: watch the whole subtree.
            (prefix, rest > 1)
        }
    };
    let mut points = Vec::with_capacity(2);
    if let (Some(parent), Some(name)) = (
        dir.parent().filter(|p| !p.as_os_str().is_empty()),
        dir.file_name(),
    ) {
        points.push(WatchPoint {
            source: index,
            dir: parent.to_path_buf(),
            recursive: false,
            only: Some(name.to_os_string()),
        });
    }
    points.insert(
        0,
        WatchPoint {
            source: index,
            dir,
            recursive,
            only: None,
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

/// Resolves directories to the canonical path notify reports and their
/// identity, memoised for one refresh: a thousand volumes under one parent
/// cost one lookup each, not a `realpath` walk (a readlink per component)
/// each.
#[derive(Default)]
struct Resolver {
    known: HashMap<PathBuf, Option<Resolved>>,
}

/// A directory's identity: device and inode.
type DirId = (u64, u64);

/// A directory's canonical path and identity.
type Resolved = (PathBuf, DirId);

impl Resolver {
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
        meta.is_dir().then(|| (canonical, (meta.dev(), meta.ino())))
    }

    /// The nearest existing directory at or above `dir`: the path as given,
    /// its canonical form, and its identity.
    fn existing_ancestor(&mut self, dir: &Path) -> Option<(PathBuf, PathBuf, DirId)> {
        let mut current = Some(dir);
        while let Some(d) = current {
            if let Some((canonical, id)) = self.directory(d) {
                return Some((d.to_path_buf(), canonical, id));
            }
            current = d.parent().filter(|p| !p.as_os_str().is_empty());
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
}

/// The live inotify watches, kept in step with the sources.
pub struct Watch {
    watcher: notify::RecommendedWatcher,
    /// Watched directory -> (recursive, its device and inode when watched).
    watched: HashMap<PathBuf, (bool, (u64, u64))>,
    /// Watched directory -> the bundles it matters to, with the entry that
    /// matters (or all) and whether its subtree counts.
    routes: Routes,
    /// Per bundle, the points it wants.
    wanted: Vec<Vec<WatchPoint>>,
    overflow: Arc<AtomicBool>,
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

fn describe(path: &Path, e: &notify::Error) -> WatchError {
    let dir = path.to_path_buf();
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => WatchError::WatchLimit { dir },
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(nix::libc::EMFILE) => {
            WatchError::InstanceLimit { dir }
        }
        _ => WatchError::Failed {
            dir,
            reason: e.to_string(),
        },
    }
}

impl Watch {
    /// Starts the inotify watcher; its events go to `tx`.
    pub fn new(tx: mpsc::Sender<Change>) -> Result<Self, WatchError> {
        let overflow = Arc::new(AtomicBool::new(false));
        let flag = overflow.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let change = match res {
                Ok(event) if event.need_rescan() => Change::Rescan,
                // kubelet's periodic sync opens and reads the old generation:
                // access is no change. A close after writing ends an in-place
                // rewrite, and is one.
                Ok(event)
                    if matches!(event.kind, EventKind::Access(kind)
                        if kind != AccessKind::Close(AccessMode::Write)) =>
                {
                    return;
                }
                Ok(event) => Change::Paths(event.paths),
                Err(e) => {
                    warn!(error = %e, "watch error; re-reading everything");
                    Change::Rescan
                }
            };
            if tx.try_send(change).is_err() {
                // The loop is behind: it will re-read everything.
                flag.store(true, Ordering::Relaxed);
            }
        })
        .map_err(|e| describe(Path::new("inotify"), &e))?;
        Ok(Self {
            watcher,
            watched: HashMap::new(),
            routes: Routes::default(),
            wanted: Vec::new(),
            overflow,
        })
    }

    /// Sets what each bundle wants watched and starts watching it; returns
    /// the bundles that gained a watch (see [`Watch::refresh`]).
    pub fn set(&mut self, wanted: Vec<Vec<WatchPoint>>) -> Result<HashSet<usize>, WatchError> {
        self.wanted = wanted;
        self.refresh()
    }

    /// Whether events were dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::Relaxed)
    }

    /// Brings the watches in line with the filesystem: a directory that was
    /// deleted and created again, or that now exists, is watched afresh; a
    /// missing one is stood in for by its nearest existing ancestor, so its
    /// creation is seen. Only an exhausted watch limit is an error.
    ///
    /// Returns the bundles that gained a watch: what changed in those
    /// directories before the watch existed was not seen, so they must be
    /// read again.
    pub fn refresh(&mut self) -> Result<HashSet<usize>, WatchError> {
        let mut desired: HashMap<PathBuf, (bool, (u64, u64))> = HashMap::new();
        let mut routes: HashMap<PathBuf, Vec<Route>> = HashMap::new();
        let mut resolver = Resolver::default();
        for (bundle, points) in self.wanted.iter().enumerate() {
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
                        .and_then(|rest| rest.components().next())
                        .map(|c| c.as_os_str().to_os_string())
                };
                // notify reports events under the canonical path it watches.
                let dir = canonical;
                let entry = desired.entry(dir.clone()).or_insert((recursive, id));
                entry.0 |= recursive;
                let route = Route {
                    bundle,
                    source: point.source,
                    only,
                    recursive,
                };
                let list = routes.entry(dir).or_default();
                if !list.contains(&route) {
                    list.push(route);
                }
            }
        }
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(dir, state)| desired.get(*dir) != Some(state))
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in stale {
            // The directory may already be gone, taking its watch with it.
            let _ = self.watcher.unwatch(&dir);
            self.watched.remove(&dir);
        }
        let mut result = Ok(());
        let mut gained = HashSet::new();
        for (dir, state) in desired {
            if self.watched.contains_key(&dir) {
                continue;
            }
            let mode = if state.0 {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match self.watcher.watch(&dir, mode) {
                Ok(()) => {
                    debug!(dir = %dir.display(), recursive = state.0, "watching");
                    gained.extend(routes.get(&dir).into_iter().flatten().map(|r| r.bundle));
                    self.watched.insert(dir, state);
                }
                Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                    let error = describe(&dir, &e);
                    error!("{error}");
                    result = Err(error);
                }
                // Removed between the stat and the watch: the next refresh
                // watches its ancestor.
                Err(e) => debug!(error = %describe(&dir, &e), "watch skipped"),
            }
        }
        self.routes = Routes(Arc::new(routes));
        result.map(|()| gained)
    }

    /// Who each watched directory's events concern, as of the last refresh:
    /// a snapshot the event loop keeps while a refresh runs elsewhere.
    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    /// Set when events were dropped (a full queue, an inotify overflow).
    pub fn overflow_flag(&self) -> Arc<AtomicBool> {
        self.overflow.clone()
    }

    /// How many directories are watched.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

/// Watched directory -> who its events concern.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<HashMap<PathBuf, Vec<Route>>>);

impl Routes {
    /// The bundles an event at `path` may concern: routes of its directory
    /// (all of it, or this very entry), of the path itself (a watched
    /// directory that changed), and of recursive watches above it.
    ///
    /// Returns whether the event may change what must be watched: a watched
    /// directory or a watched entry itself was created, removed or renamed.
    /// The sources (bundle, source index) an event at `path` may concern:
    /// see above.
    pub fn bundles_for(&self, path: &Path, out: &mut HashSet<(usize, usize)>) -> bool {
        let mut structural = false;
        if let Some(routes) = self.0.get(path) {
            structural = true;
            out.extend(
                routes
                    .iter()
                    .filter(|r| r.only.is_none())
                    .map(|r| (r.bundle, r.source)),
            );
        }
        let name = path.file_name();
        let mut ancestor = path.parent();
        let mut direct = true;
        while let Some(dir) = ancestor {
            if let Some(routes) = self.0.get(dir) {
                for route in routes {
                    let entry = direct && route.only.is_some() && route.only.as_deref() == name;
                    // A file inside a kubelet volume changes when `..data`
                    // is renamed over, never its visible link.
                    let matches = if direct {
                        route.only.is_none()
                            || entry
                            || name == Some(std::ffi::OsStr::new(crate::source::KUBELET_DATA))
                    } else {
                        route.recursive
                    };
                    structural |= entry || (route.recursive && !direct);
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

    #[test]
    fn glob_prefix_stops_at_the_first_wildcard() {
        assert_eq!(
            glob_prefix("/certs/extra/*.pem"),
            (PathBuf::from("/certs/extra"), 1)
        );
        assert_eq!(glob_prefix("/certs/*/ca.crt"), (PathBuf::from("/certs"), 2));
        assert_eq!(glob_prefix("*.pem"), (PathBuf::from("."), 1));
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

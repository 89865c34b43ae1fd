//! One render of a bundle: read its sources, assemble, publish its outputs.
//! This is the only render path: `anchorage render` runs it once per
//! bundle, the daemon runs it on every change, off its event loop (it reads
//! and writes files, and may block on a stuck filesystem).
//!
//! [`BundleState`] is what a bundle carries from one render to the next:
//! each source's last read (so an event re-reads only what it concerned),
//! the parsed certificates, the bytes last published at each output, the
//! CAs retained after they vanished, and the outputs changed since the last
//! complete publication, whose reload is still owed. A render never
//! reloads: it says when a reload is due (every output holds the new
//! content, guarantee 12), and its caller requests it.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::bundle::retain::Retention;
use crate::bundle::{self, Assembly, Bundle, DigestSet, Dropped, ParseCache, Refusal, verify};
use crate::check::rfc3339;
use crate::config::BundleConfig;
use crate::output::{self, Format, Rendered, atomic};
use crate::source::{SourceError, SourceFile};

/// Past this many certificates, a render's log line counts the added and
/// removed ones instead of listing them.
const LISTED: usize = 36;
/// How many a summarised list shows.
const SHOWN: usize = 5;

/// Whether a render writes its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Write,
    /// Compare with the disk, write nothing (`render --dry-run`).
    DryRun,
}

/// What a bundle carries from one render to the next.
#[derive(Debug)]
pub struct BundleState {
    pub config: Arc<BundleConfig>,
    /// The last bundle accepted.
    pub last: Option<Arc<Bundle>>,
    /// What was last published at each output, one per entry of
    /// `config.outputs` and in its order; an output with `None` here is
    /// compared with the disk before it is written.
    published: Vec<Option<Published>>,
    /// CAs removed from the sources but still within `retain_removed`.
    pub retention: Retention,
    /// Each source's last read (`None`: to be read).
    cache: Vec<Option<Vec<SourceFile>>>,
    parsed: ParseCache,
    /// Outputs changed since the last complete publication: their reload
    /// is owed until every output holds the new content.
    owed: BTreeSet<PathBuf>,
}

/// What was last published at one output.
#[derive(Debug, Clone)]
struct Published {
    /// The bundle it was rendered from. An output's bytes are a function of
    /// its bundle's certificates and its spec alone (`output/format.rs`), so
    /// the same certificates are the same bytes, without rendering them.
    from: Arc<Bundle>,
    /// The bytes, kept for a PEM file of more than [`KEEP_PEM_ABOVE`]
    /// certificates only: the next render copies the blocks of the
    /// certificates it still holds instead of encoding them again.
    /// Kept for every output, they were a bundle's largest part at a
    /// thousand bundles of one CA, and 11 MiB for a hashed directory of
    /// 10,000.
    bytes: Option<Rendered>,
}

/// Above this many certificates, a PEM output's bytes are kept (see
/// [`Published::bytes`]); below, encoding them again costs microseconds.
const KEEP_PEM_ABOVE: usize = 16;

/// One render's outcome.
#[derive(Debug)]
pub struct Report {
    pub bundle: Arc<Bundle>,
    /// What it replaced.
    pub previous: Option<Arc<Bundle>>,
    /// Without `previous` (the first render of a daemon, or `render`), what
    /// the first PEM output held on disk before it was replaced: the log's
    /// added and removed are reckoned against it (a restart that drops a
    /// CA says so).
    pub on_disk: Option<Bundle>,
    /// Outputs written in this render (or, dry, that would be).
    pub changed: Vec<PathBuf>,
    /// Outputs that could not be written, and why; they are retried.
    pub failed: Vec<(PathBuf, io::Error)>,
    /// Every output holds the new content and some changed since the last
    /// reload: the outputs to name in the reload.
    pub reload: Option<BTreeSet<PathBuf>>,
    /// The next instant (unix seconds) the bundle changes by itself: an
    /// expiry, a not-before, the end of a retention.
    pub next_change: Option<i64>,
    /// The files read through a symlink out of their source's directory,
    /// by source: their directories are to be watched too.
    pub links: Vec<(usize, Box<Path>)>,
}

impl BundleState {
    pub fn new(config: Arc<BundleConfig>, state_dir: Option<&Path>) -> Self {
        Self {
            retention: Retention::load(state_dir, &config.name),
            published: vec![None; config.outputs.len()],
            config,
            last: None,
            cache: Vec::new(),
            parsed: ParseCache::default(),
            owed: BTreeSet::new(),
        }
    }

    /// Takes a new configuration of the same bundle (SIGHUP): what was
    /// published at a path that is still an output stays known, so the same
    /// bytes are not written or reloaded again; every source is read again.
    pub fn reconfigure(&mut self, config: Arc<BundleConfig>) {
        let outputs: HashSet<&PathBuf> = config.outputs.iter().map(|o| &o.path).collect();
        // Known only if the output is the same: its format or mode changed,
        // the bytes there are not what it would write now.
        let mut before = std::mem::take(&mut self.published);
        self.published = config
            .outputs
            .iter()
            .map(|o| {
                let was = self.config.outputs.iter().position(|old| old == o)?;
                before[was].take()
            })
            .collect();
        self.owed.retain(|path| outputs.contains(path));
        self.cache.clear();
        self.config = config;
    }

    /// Forgets what was published, so the next render compares with the
    /// disk again (a resync repairs an output changed behind our back).
    pub fn recheck_disk(&mut self) {
        self.published.fill(None);
    }

    /// Reads the sources in `only` (all with `None`) afresh and the others
    /// from their last read, assembles the bundle at `now` (unix seconds)
    /// and publishes it as `mode` says.
    pub fn render(
        &mut self,
        only: Option<&HashSet<usize>>,
        now: i64,
        mode: Mode,
    ) -> Result<Report, Refusal> {
        self.read(only)?;
        // What the first PEM output held, only for the log line that names
        // what changed (a first render has no `previous`). A file output
        // being written is read as it is compared; a hashed directory's
        // bundle file, which goes with its directory, before; in a dry run,
        // which replaces nothing, only once something would change.
        let first_render = self.last.is_none() && tracing::enabled!(tracing::Level::INFO);
        let first_pem = if first_render {
            self.first_pem_output()
        } else {
            None
        };
        let mut held = match &first_pem {
            Some((path, false)) if mode == Mode::Write => {
                crate::source::read_bounded(path, path).ok().flatten()
            }
            _ => None,
        };
        let keep = match &first_pem {
            Some((path, true)) if mode == Mode::Write => Some(path.as_path()),
            _ => None,
        };
        // A dry run writes nothing, the retention's state file included:
        // it works on a copy that is not tied to the file.
        let mut detached;
        let retention = match mode {
            Mode::Write => &mut self.retention,
            Mode::DryRun => {
                detached = self.retention.detached();
                &mut detached
            }
        };
        // Every source's last read, borrowed: nothing is copied.
        let files = self.cache.iter().flatten().flatten();
        let assembly = assemble(
            &self.config,
            files,
            Some(retention),
            Some(&mut self.parsed),
            now,
        )
        .map_err(|mut refusal| {
            if let Refusal::TooFew { empty, .. } = &mut refusal {
                empty.extend(
                    self.config
                        .sources
                        .iter()
                        .zip(&self.cache)
                        .filter(|(_, read)| read.as_ref().is_some_and(Vec::is_empty))
                        .map(|(source, _)| source.display()),
                );
            }
            refusal
        })?;
        let retention_ends = self
            .config
            .retain_removed
            .and_then(|grace| self.retention.next_change(grace));
        let next_change = assembly
            .next_change(self.config.policy.allow_expired)
            .into_iter()
            .chain(retention_ends)
            .filter(|t| *t > now)
            .min();
        let bundle = Arc::new(assembly.bundle);
        let (changed, failed) = self.publish(&bundle, mode, keep, &mut held);
        // `last` is what the outputs hold: it moves on only once every
        // output was written.
        let previous = self.last.clone();
        if failed.is_empty() && mode == Mode::Write {
            self.last = Some(bundle.clone());
        }
        let reload = if failed.is_empty() && !self.owed.is_empty() && mode == Mode::Write {
            Some(std::mem::take(&mut self.owed))
        } else {
            None
        };
        let on_disk = match &first_pem {
            Some((path, _)) if previous.is_none() && !changed.is_empty() => {
                if mode == Mode::DryRun {
                    held = crate::source::read_bounded(path, path).ok().flatten();
                }
                held.map(|bytes| held_bundle(path, &bytes))
            }
            _ => None,
        };
        Ok(Report {
            bundle,
            previous,
            on_disk,
            changed,
            failed,
            reload,
            next_change,
            links: self.links(),
        })
    }

    /// The first output that holds the bundle as PEM: a PEM file (`true`),
    /// or a hashed directory's `ca-certificates.crt`.
    fn first_pem_output(&self) -> Option<(PathBuf, bool)> {
        self.config
            .outputs
            .iter()
            .find_map(|spec| match spec.format {
                Format::Pem => Some((spec.path.clone(), true)),
                Format::OpensslDir => Some((spec.path.join(output::OPENSSL_DIR_BUNDLE), false)),
                _ => None,
            })
    }

    /// Every file of the last read that is a symlink out of its source's
    /// directory, by source, in order.
    fn links(&self) -> Vec<(usize, Box<Path>)> {
        let mut links: Vec<(usize, Box<Path>)> = self
            .cache
            .iter()
            .enumerate()
            .flat_map(|(i, files)| files.iter().flatten().map(move |f| (i, f)))
            .filter_map(|(i, f)| Some((i, f.link.clone()?)))
            .collect();
        links.sort();
        links.dedup();
        links
    }

    /// Reads the stale sources; the first unusable one refuses the bundle.
    fn read(&mut self, only: Option<&HashSet<usize>>) -> Result<(), Refusal> {
        let sources = &self.config.sources;
        self.cache.resize(sources.len(), None);
        let stale: Vec<usize> = (0..sources.len())
            .filter(|s| self.cache[*s].is_none() || only.is_none_or(|o| o.contains(s)))
            .collect();
        // Hundreds of sources (one volume each) are read on all cores; the
        // first unusable one, in the configured order, is the one reported.
        let read = crate::parallel::map(&stale, |s| sources[*s].read());
        let mut failure = None;
        for (s, result) in stale.into_iter().zip(read) {
            // A file of the last read that is a directory now is unreadable,
            // not absent: a half-done replacement must not shrink the trust
            // set. The last read stays, so the refusal holds until it is a
            // file again.
            let replaced = self.cache[s]
                .iter()
                .flatten()
                .find(|f| std::fs::metadata(&f.path).is_ok_and(|m| m.is_dir()));
            if let Some(file) = replaced {
                failure.get_or_insert(SourceError::directory_where_a_file_was(&file.path));
                continue;
            }
            match result {
                Ok(files) => self.cache[s] = Some(files),
                Err(e) => {
                    // Read again next time; the first failure is reported.
                    self.cache[s] = None;
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(Refusal::Source(e)),
            None => Ok(()),
        }
    }

    /// Writes each output that does not hold `bundle` yet: all are tried,
    /// whatever one of them does, unless a directory output would be
    /// refused (guarantee 11), which refuses them all before any is
    /// written. The file output at `keep`, if it is replaced, leaves its
    /// old bytes in `held`.
    fn publish(
        &mut self,
        bundle: &Arc<Bundle>,
        mode: Mode,
        keep: Option<&Path>,
        held: &mut Option<Vec<u8>>,
    ) -> (Vec<PathBuf>, Vec<(PathBuf, io::Error)>) {
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        let mut due = Vec::with_capacity(self.config.outputs.len());
        for (i, (spec, published)) in self
            .config
            .outputs
            .iter()
            .zip(&mut self.published)
            .enumerate()
        {
            if let Some(known) = published
                .as_mut()
                .filter(|p| p.from.same_certificates(bundle))
            {
                // The bytes there already: nothing to render or write. The
                // new bundle is kept, so that the old one can go.
                if mode == Mode::Write {
                    known.from = bundle.clone();
                }
                continue;
            }
            let before = published
                .as_ref()
                .and_then(|p| Some((&*p.from, p.bytes.as_ref()?)));
            due.push((i, output::render_after(bundle, &spec.format, before)));
        }
        // One output alone is checked by its writer, before it writes.
        if due.len() > 1 {
            for (i, rendered) in &due {
                let path = &self.config.outputs[*i].path;
                if let Err(e) = atomic::check_owned(path, rendered) {
                    failed.push((path.clone(), e));
                    return (changed, failed);
                }
            }
        }
        for (i, rendered) in due {
            let (spec, published) = (&self.config.outputs[i], &mut self.published[i]);
            let result = match (published.is_some(), mode) {
                (_, Mode::DryRun) => atomic::check_writable(&spec.path, &rendered)
                    .map(|()| !atomic::matches(&spec.path, &rendered, spec.mode))
                    .map_err(atomic::WriteError::from),
                // Other certificates than those published there, so other
                // bytes: written without comparing with the disk.
                (true, Mode::Write) => {
                    atomic::write(&spec.path, &rendered, spec.mode).map(|()| true)
                }
                (false, Mode::Write) if keep == Some(spec.path.as_path()) => {
                    atomic::publish_keeping(&spec.path, &rendered, spec.mode, held)
                }
                (false, Mode::Write) => atomic::publish(&spec.path, &rendered, spec.mode),
            };
            match result {
                Ok(did_change) => {
                    if did_change {
                        changed.push(spec.path.clone());
                        if mode == Mode::Write {
                            self.owed.insert(spec.path.clone());
                        }
                    }
                    if mode == Mode::Write {
                        let keep =
                            matches!(spec.format, Format::Pem) && bundle.len() > KEEP_PEM_ABOVE;
                        *published = Some(Published {
                            from: bundle.clone(),
                            bytes: keep.then_some(rendered),
                        });
                    }
                }
                Err(e) => {
                    // A step after the swap failed (a directory's fsync,
                    // removing the old generation): the new content is live
                    // already. Its reload is owed, or the retry, finding it
                    // there, would see no change and the app would never be
                    // told (guarantee 12).
                    if mode == Mode::Write && e.live {
                        self.owed.insert(spec.path.clone());
                    }
                    *published = None;
                    failed.push((spec.path.clone(), e.error));
                }
            }
        }
        (changed, failed)
    }
}

/// Validates files already read at `now` (unix seconds): the policy, the
/// CAs retained after they vanished (with `retention`), `min_certs`, and the
/// `verify` certificates, read afresh. Logs what the policy dropped or kept
/// early.
pub fn assemble<'a>(
    bundle: &BundleConfig,
    files: impl IntoIterator<Item = &'a SourceFile>,
    mut retention: Option<&mut Retention>,
    cache: Option<&mut ParseCache>,
    now: i64,
) -> Result<Assembly, Refusal> {
    let mut assembly = bundle::collect_cached(files, &bundle.policy, now, cache)?;
    log_policy(&bundle.name, &assembly);
    let changed = match (retention.as_deref_mut(), bundle.retain_removed) {
        (Some(retention), Some(grace)) => retention.apply(
            &bundle.name,
            &mut assembly,
            grace,
            now,
            bundle.policy.allow_expired,
        ),
        _ => false,
    };
    bundle::check_min(&assembly, &bundle.policy)?;
    verify_all(bundle, &assembly, now)?;
    // The last-good record (in the state directory, when there is one),
    // with or without CAs retained.
    if let Some(retention) = retention {
        retention.accepted(&assembly.bundle, now, changed);
    }
    Ok(assembly)
}

/// Every `verify` certificate must chain to the new bundle.
fn verify_all(bundle: &BundleConfig, assembly: &Assembly, now: i64) -> Result<(), Refusal> {
    for path in &bundle.verify {
        let chain = verify::read_chain(path).map_err(Refusal::Verify)?;
        match chain {
            Some(chain) => verify::check(&chain, &assembly.bundle, now).map_err(Refusal::Verify)?,
            None => warn!(bundle = %bundle.name, file = %path.display(),
                "verify certificate does not exist yet; nothing to check"),
        }
    }
    Ok(())
}

fn log_policy(name: &str, assembly: &Assembly) {
    for dropped in &assembly.dropped {
        match dropped {
            Dropped::Expired(a) => info!(
                bundle = name, file = %a.origin.display(), subject = %a.subject,
                sha256 = %a.fingerprint(), not_after = %rfc3339(a.not_after),
                "dropped an expired certificate"
            ),
            Dropped::NotCa(a) => info!(
                bundle = name, file = %a.origin.display(), subject = %a.subject,
                sha256 = %a.fingerprint(),
                "dropped a certificate that is not a CA"
            ),
        }
    }
    for a in &assembly.pending {
        info!(
            bundle = name, file = %a.origin.display(), subject = %a.subject,
            sha256 = %a.fingerprint(), not_before = %rfc3339(a.not_before),
            "kept a CA that is not valid yet"
        );
    }
}

/// One line per render: the certificates added and removed, which outputs
/// changed and which could not be written. A render that changed nothing
/// (or a dry run that would change nothing) is no news (a poll or resync
/// tick): DEBUG.
pub fn log_report(name: &str, report: &Report, mode: Mode) {
    let certificates = report.bundle.len();
    if report.changed.is_empty() && report.failed.is_empty() {
        let outcome = match mode {
            Mode::Write => "unchanged",
            Mode::DryRun => "would not change",
        };
        debug!(bundle = name, certificates, outcome, "rendered");
        return;
    }
    // What came and went is worked out only for a line that is written.
    if tracing::enabled!(tracing::Level::INFO) {
        log_changes(name, report, mode);
    }
    for (path, e) in &report.failed {
        warn!(bundle = name, output = %path.display(), error = %e,
            "cannot write output; it keeps its previous content, the write is retried, no reload until every output is written");
    }
}

/// The certificates of an output's old bytes, as far as they parse.
fn held_bundle(path: &Path, bytes: &[u8]) -> Bundle {
    let origin: Arc<Path> = path.into();
    let anchors = crate::source::decode(bytes)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, block)| bundle::Anchor::parse(block, origin.clone(), i).ok())
        .collect();
    Bundle::new(anchors)
}

fn log_changes(name: &str, report: &Report, mode: Mode) {
    let previous = report.previous.as_deref().or(report.on_disk.as_ref());
    let before: DigestSet = previous
        .iter()
        .flat_map(|b| b.anchors().iter().map(|a| a.sha256))
        .collect();
    let after: DigestSet = report.bundle.anchors().iter().map(|a| a.sha256).collect();
    // Past LISTED, only the first few are written: only they are formatted.
    let describe = |b: &Bundle, keep: &dyn Fn(&[u8; 32]) -> bool| -> (Vec<String>, usize) {
        let total = b.anchors().iter().filter(|a| keep(&a.sha256)).count();
        let shown = if total <= LISTED { total } else { SHOWN };
        let items = b
            .anchors()
            .iter()
            .filter(|a| keep(&a.sha256))
            .take(shown)
            .map(|a| format!("{} ({})", a.subject, a.fingerprint()))
            .collect();
        (items, total)
    };
    let added = summarise(describe(&report.bundle, &|h| !before.contains(h)));
    let removed = summarise(
        previous
            .map(|p| describe(p, &|h| !after.contains(h)))
            .unwrap_or((Vec::new(), 0)),
    );
    let changed: Vec<String> = report
        .changed
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    // An output that could not be written is no unchanged one: the bundle
    // is not live there (the warning below says why), and is tried again.
    let outcome = match (mode, report.changed.is_empty(), report.failed.is_empty()) {
        (Mode::DryRun, true, _) => "would not change",
        (Mode::DryRun, false, _) => "would change",
        (Mode::Write, true, true) => "unchanged",
        (Mode::Write, false, true) => "changed",
        (Mode::Write, true, false) => "not written",
        (Mode::Write, false, false) => "partly written",
    };
    info!(
        bundle = name,
        certificates = report.bundle.len(),
        added = %added,
        removed = %removed,
        outputs_changed = ?changed,
        outcome,
        "rendered"
    );
}

/// `[a, b]`, or past [`LISTED`] entries the first few and a count: `items`
/// are the first entries of `total`.
fn summarise((items, total): (Vec<String>, usize)) -> String {
    if total <= LISTED {
        return format!("{items:?}");
    }
    let shown: Vec<&String> = items.iter().take(SHOWN).collect();
    format!(
        "{shown:?} and {} more ({total} in all)",
        total - shown.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Past a few dozen certificates" the lists are counted: three dozen
    /// are listed whole, one more is summarised.
    #[test]
    fn a_few_dozen_are_listed_and_more_are_counted() {
        let list = |n: usize| ((0..n).map(|i| format!("CA {i}")).collect(), n);
        let whole = summarise(list(36));
        assert!(
            whole.contains("\"CA 35\"") && !whole.contains("more"),
            "{whole}"
        );
        assert!(summarise(list(37)).ends_with("and 32 more (37 in all)"));
    }

    /// The one bundle `flags` configure.
    fn bundle_of(flags: &crate::cli::Flags) -> Arc<BundleConfig> {
        let mut config =
            crate::config::Config::load(flags, crate::config::Child::Absent).expect("config");
        config.bundles.remove(0)
    }

    /// A new self-signed CA named `name`, as PEM.
    fn ca_pem(name: &str) -> Vec<u8> {
        let mut pem = Vec::new();
        let der = crate::bundle::tests::ca_block(name).der;
        crate::source::pem::encode("CERTIFICATE", &der, &mut pem);
        pem
    }

    /// What a SIGHUP changed about an output (here its mode) is applied
    /// at the next render, though the bytes are the same: the bytes last
    /// published there are forgotten, so they are compared with the disk.
    #[test]
    fn an_output_changed_by_sighup_is_not_taken_as_published() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = ca_pem("Mode");
        let source = dir.path().join("ca.pem");
        std::fs::write(&source, &pem).expect("write");
        let output = dir.path().join("out.pem");
        let flags = crate::cli::Flags {
            sources: vec![source.display().to_string()],
            outputs: vec![output.clone()],
            ..crate::cli::Flags::default()
        };
        let config = bundle_of(&flags);
        let now = 1_800_000_000;
        let mut state = BundleState::new(config.clone(), None);
        state.render(None, now, Mode::Write).expect("render");
        assert_eq!(std::fs::read(&output).expect("output"), pem);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_ne!(mode(&output), 0o600);

        let mut fresh = (*config).clone();
        fresh.outputs[0].mode = 0o600;
        state.reconfigure(Arc::new(fresh));
        state.render(None, now, Mode::Write).expect("render");
        assert_eq!(mode(&output), 0o600);
        assert_eq!(std::fs::read(&output).expect("output"), pem);
    }

    /// A write that fails after its swap (here the old directory cannot be
    /// removed: one of its files is immutable) leaves the new content live;
    /// the retry finds it there, and the reload it is owed still goes.
    #[test]
    fn a_write_that_fails_after_its_swap_still_owes_its_reload() {
        struct Mutable<'a>(&'a Path);
        impl Drop for Mutable<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("chattr")
                    .args(["-R", "-i"])
                    .arg(self.0)
                    .status();
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let _mutable = Mutable(dir.path());
        let sources = dir.path().join("sources");
        std::fs::create_dir(&sources).expect("mkdir");
        std::fs::write(sources.join("a.pem"), ca_pem("Before")).expect("write");
        let hashed = dir.path().join("out").join("certs");
        let flags = crate::cli::Flags {
            sources: vec![sources.display().to_string()],
            hashed_dirs: vec![hashed.clone()],
            ..crate::cli::Flags::default()
        };
        let mut state = BundleState::new(bundle_of(&flags), None);
        let now = 1_800_000_000;
        state.render(None, now, Mode::Write).expect("render");
        let pinned = hashed.join("ca-certificates.crt");
        let immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&pinned)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            eprintln!("skipped: chattr +i needs root and a filesystem that has the flag");
            return;
        }

        std::fs::write(sources.join("b.pem"), ca_pem("After")).expect("write");
        let failed = state.render(None, now, Mode::Write).expect("render");
        assert_eq!(failed.failed.len(), 1, "{:?}", failed.failed);
        assert!(failed.reload.is_none());
        // The new set is live: two CAs and the bundle file.
        let hashes = || {
            std::fs::read_dir(&hashed)
                .expect("read_dir")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".0"))
                })
                .count()
        };
        assert_eq!(hashes(), 2);

        drop(_mutable);
        let retried = state.render(None, now, Mode::Write).expect("render");
        assert!(retried.failed.is_empty(), "{:?}", retried.failed);
        assert_eq!(
            retried.reload,
            Some([hashed.clone()].into_iter().collect()),
            "the reload owed since the swap"
        );
    }

    /// `render --dry-run` writes nothing: not the retention's state file
    /// either, which a daemon sharing the state directory reads.
    #[test]
    fn a_dry_run_leaves_the_retention_state_file_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = ca_pem("Dry");
        let source = dir.path().join("ca.pem");
        std::fs::write(&source, &pem).expect("write");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        let flags = crate::cli::Flags {
            sources: vec![source.display().to_string()],
            outputs: vec![dir.path().join("out.pem")],
            retain_removed: Some(std::time::Duration::from_secs(3600)),
            ..crate::cli::Flags::default()
        };
        let config = bundle_of(&flags);
        let now = 1_800_000_000;
        let mut dry = BundleState::new(config.clone(), Some(&state));
        let report = dry.render(None, now, Mode::DryRun).expect("render");
        assert_eq!(report.bundle.len(), 1);
        let files = || std::fs::read_dir(&state).expect("read_dir").count();
        assert_eq!(files(), 0, "a dry run wrote the state directory");
        assert!(!dir.path().join("out.pem").exists());

        // The same render for real records the bundle there.
        let mut real = BundleState::new(config, Some(&state));
        real.render(None, now, Mode::Write).expect("render");
        assert_eq!(files(), 1);
    }

    /// An output's bytes are kept only where the next render reuses them,
    /// a PEM file of many certificates. Either way, a render of the same
    /// certificates renders and writes nothing, and a render of others
    /// writes what a first render of them writes.
    #[test]
    fn published_bytes_are_kept_only_for_a_large_pem_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = 1_800_000_000;
        for count in [1, KEEP_PEM_ABOVE + 1] {
            let sources = dir.path().join(format!("sources-{count}"));
            std::fs::create_dir(&sources).expect("mkdir");
            for i in 0..count {
                let file = sources.join(format!("ca-{i:02}.pem"));
                std::fs::write(file, ca_pem(&format!("CA {i} of {count}"))).expect("write");
            }
            let file = dir.path().join(format!("bundle-{count}.pem"));
            let hashed = dir.path().join(format!("certs-{count}"));
            let flags = crate::cli::Flags {
                sources: vec![sources.display().to_string()],
                outputs: vec![file.clone()],
                hashed_dirs: vec![hashed.clone()],
                ..crate::cli::Flags::default()
            };
            let mut state = BundleState::new(bundle_of(&flags), None);
            let first = state.render(None, now, Mode::Write).expect("render");
            assert_eq!(first.changed.len(), 2, "{count}: {:?}", first.changed);
            let kept: Vec<bool> = state
                .published
                .iter()
                .map(|p| p.as_ref().expect("published").bytes.is_some())
                .collect();
            assert_eq!(kept, [count > KEEP_PEM_ABOVE, false], "{count}");

            // The same certificates: nothing is written, not even over a
            // file changed behind the daemon's back (a resync repairs it).
            std::fs::write(&file, b"changed behind its back").expect("write");
            let again = state.render(None, now, Mode::Write).expect("render");
            assert!(again.changed.is_empty(), "{count}: {:?}", again.changed);
            assert_eq!(
                std::fs::read(&file).expect("read"),
                b"changed behind its back"
            );
            assert!(Arc::ptr_eq(
                &state.published[0].as_ref().expect("published").from,
                &again.bundle
            ));

            // Another certificate: both outputs hold what a first render of
            // the new set writes.
            std::fs::write(
                sources.join("ca-new.pem"),
                ca_pem(&format!("New CA of {count}")),
            )
            .expect("write");
            let changed = state.render(None, now, Mode::Write).expect("render");
            assert_eq!(changed.changed.len(), 2, "{count}: {:?}", changed.changed);
            let fresh = dir.path().join(format!("fresh-{count}"));
            let mut spec = bundle_of(&flags);
            let outputs = &mut Arc::make_mut(&mut spec).outputs;
            outputs[0].path = fresh.join("bundle.pem");
            outputs[1].path = fresh.join("certs");
            std::fs::create_dir(&fresh).expect("mkdir");
            BundleState::new(spec, None)
                .render(None, now, Mode::Write)
                .expect("render");
            assert_eq!(
                std::fs::read(&file).expect("read"),
                std::fs::read(fresh.join("bundle.pem")).expect("read")
            );
            let listing = |dir: &Path| {
                let mut files: Vec<(std::ffi::OsString, Vec<u8>)> = std::fs::read_dir(dir)
                    .expect("read_dir")
                    .map(|e| {
                        let e = e.expect("entry");
                        (e.file_name(), std::fs::read(e.path()).expect("read"))
                    })
                    .collect();
                files.sort();
                files
            };
            assert_eq!(listing(&hashed), listing(&fresh.join("certs")));
            let hashes = listing(&hashed)
                .iter()
                .filter(|(name, _)| name.to_string_lossy().ends_with(".0"))
                .count();
            assert_eq!(hashes, count + 1, "{count}");
        }
    }

    #[test]
    fn long_lists_are_summarised_with_a_count() {
        let items: Vec<String> = (0..SHOWN).map(|i| format!("CA {i}")).collect();
        let line = summarise((items, 1000));
        assert!(line.contains("995 more (1000 in all)"), "{line}");
        assert!(line.len() < 200, "{line}");
        assert_eq!(summarise((vec!["a".into()], 1)), "[\"a\"]");
    }
}

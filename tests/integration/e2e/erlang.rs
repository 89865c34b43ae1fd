//! End-to-end: Erlang/OTP, reloaded by anchorage through a whole CA
//! rotation written kubelet-style: an `ssl` listener (story A) and a cluster
//! with TLS distribution (story B, the seed's case).
//!
//! What OTP does with the files its TLS options name (OTP 25.2.3, read from
//! the installed ssl-10.8.7 beams' debug info and lib/ssl/src on GitHub):
//!
//! - Two caches per side. `ssl_pem_cache` (a gen_server owning a named ets
//!   table of the same name, ssl_pem_cache.erl) maps a path to its decoded
//!   PEM entries: `certfile`, `keyfile` and CA files are read through it
//!   (`ssl_manager:cache_pem_file/2`), by path, and are not re-read while
//!   their entry is there. The trusted-certificate db of `ssl_manager`
//!   (ssl_pkix_db.erl: `ssl_otp_cacertificate_db` plus file-to-ref and
//!   ref-count tables) holds the CAs of each `cacertfile` in use.
//! - `ssl_config:init/2` runs for every new connection
//!   (`ssl_gen_statem:init`), calling `ssl_manager:connection_init/3`:
//!   `ssl_pkix_db:add_trusted_certs/3` reuses the CAs of a `cacertfile` that
//!   is already in the db (and bumps its ref count) or reads the file from
//!   disk (`new_trusted_cert_entry/2`). A connection that ends drops its ref
//!   (`ssl_gen_statem:handle_trusted_certs_db/1`) and 500 ms after the count
//!   reaches 0 the entry is removed (`ssl_manager:clean_cert_db`). So a
//!   changed `cacertfile` is seen by the next handshake only once no
//!   connection that uses it is left; while one lives (a long-lived client,
//!   any distribution link) new handshakes keep the old CAs. A reissued
//!   `certfile`/`keyfile` is not seen until a clear (or the validator).
//! - `ssl:clear_pem_cache()` -> `ssl_pem_cache:clear/0`: a
//!   `gen_server:call(ssl_pem_cache, {unconditionally_clear_pem_cache,
//!   self()})` that empties the PEM table and then
//!   `ssl_manager:refresh_trusted_db/1` re-reads every `cacertfile` still in
//!   use and updates its CAs in place (`ssl_pkix_db:refresh_trusted_certs`:
//!   added CAs inserted, removed ones deleted). Live connections are kept;
//!   new handshakes use the new files.
//! - Each cache runs a validator every `ssl_pem_cache_clean` ms (default
//!   120 000) that drops the files whose mtime is not older than its
//!   previous run and re-reads them as CA files (`pem_cache_validate/2`,
//!   `invalidate_pem/1`): left alone, OTP takes new files within about two
//!   minutes; the reload makes that about a second.
//! - TLS distribution (`-proto_dist inet_tls`, inet_tls_dist.erl) reads the
//!   options file once (`ssl_dist_sup:consult/1` into the `ssl_dist_opts`
//!   table), but its connections set `erl_dist` and so use a second pair,
//!   `ssl_pem_cache_dist` and `ssl_manager_dist` (ssl_dist_admin_sup.erl,
//!   under kernel's net_sup; `ssl_config:init_manager_name(true)`).
//!   `ssl:clear_pem_cache()` only ever names the normal cache ("Not supported
//!   for distribution at the moment"), so the reload sends the same internal
//!   request, `{unconditionally_clear_pem_cache, Pid}` (the pid is ignored),
//!   to `ssl_pem_cache_dist`: it clears that table and refreshes
//!   `ssl_manager_dist`'s CAs. Distribution defaults to TLS 1.2 only
//!   (`inet_tls_dist:dist_defaults/1`) and a client checks the server's name
//!   against the host part of the node name (`server_name_indication`).
//! - A TLS-distribution node is reachable only over TLS, so `erl_call` cannot
//!   reload it: `scripts/erlang-reload` starts a hidden VM with the node's own
//!   `-ssl_dist_optfile`, joins, and clears every PEM cache the node runs.
//!
//! Story A keeps one client connection open throughout, so that a passing
//! test proves the reload (without it, the next handshake after the last
//! connection closed would read the new `cacertfile` anyway), and shows on a
//! control listener that a replaced file is not seen until the reload.
//! Story B drives the checks from inside the cluster: every round each
//! member drops its link to each other member, connects again (a new
//! handshake, as the TLS client) and exchanges messages with the peer's echo
//! server. Members run with `-connect_all false` and
//! `prevent_overlapping_partitions false`, so that only the driver opens and
//! closes links (global would otherwise tear down the third link whenever
//! the driver drops one on purpose).

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::ClientConnection;
use rustls::pki_types::ServerName;

use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::{Ca, Leaf};
use crate::support::tls::{Connection, Identity, client_config};
use crate::support::{pem_certs, s, write};

/// The reload command shipped for Erlang nodes.
const RELOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/erlang-reload");

/// Generous: a loaded two-core machine starts an Erlang VM in seconds.
const DEADLINE: Duration = Duration::from_secs(60);

/// The two stories each start several VMs: one at a time.
static ERLANG: Mutex<()> = Mutex::new(());

/// The test fixture the nodes run, compiled at run time.
const MODULE: &str = r#"
-module(anchorage_e2e).
-export([listen/1, member/1, newcomer/1, ping_exchange/2, rejoin/2]).

-define(ECHO, anchorage_e2e_echo).
-define(MESSAGES, 20).

%% Story A. -run anchorage_e2e listen READY CERT KEY CACERTFILE...
%% One mutual-TLS listener per CA file; each answers "ok\n" to every line.
listen([Ready, Cert, Key | CaFiles]) ->
    {ok, _} = application:ensure_all_started(ssl),
    Ports = [listener(Cert, Key, Ca) || Ca <- CaFiles],
    ready(Ready, [os:getpid() | [integer_to_list(P) || P <- Ports]]).

listener(Cert, Key, Ca) ->
    Parent = self(),
    spawn(fun() ->
        {ok, L} = ssl:listen(0, [binary, {active, false}, {packet, line},
                                 {reuseaddr, true}, {ip, {127, 0, 0, 1}},
                                 {verify, verify_peer}, {fail_if_no_peer_cert, true},
                                 {cacertfile, Ca}, {certfile, Cert}, {keyfile, Key}]),
        {ok, {_, Port}} = ssl:sockname(L),
        Parent ! {port, self(), Port},
        acceptor(L),
        receive stop -> ok end
    end),
    receive {port, _, Port} -> Port end.

acceptor(L) ->
    spawn(fun() ->
        case ssl:transport_accept(L) of
            {ok, T} ->
                acceptor(L),
                case ssl:handshake(T, 15000) of
                    {ok, S} -> serve(S);
                    {error, _} -> ok
                end;
            {error, _} ->
                ok
        end
    end).

serve(S) ->
    case ssl:recv(S, 0) of
        {ok, _Line} ->
            case ssl:send(S, <<"ok\n">>) of
                ok -> serve(S);
                {error, _} -> ssl:close(S)
            end;
        {error, _} ->
            ssl:close(S)
    end.

%% Story B. -run anchorage_e2e member READY [LOG PEER...]
%% A cluster member: the ssl application (an app that also speaks TLS has
%% it) and an echo server. With LOG and PEERs it also drives the checks.
member([Ready | Driver]) ->
    {ok, _} = application:ensure_all_started(ssl),
    true = register(?ECHO, spawn(fun echo/0)),
    case Driver of
        [] -> ok;
        [Log | Peers] ->
            Members = [node() | [list_to_atom(P) || P <- Peers]],
            spawn(fun() -> driver(Log, Members) end)
    end,
    ready(Ready, [os:getpid()]).

echo() ->
    receive
        {From, Ref, Seq} -> From ! {Ref, Seq, node()};
        _ -> ok
    end,
    echo().

ready(File, Words) ->
    ok = file:write_file(File ++ ".tmp", [lists:join(" ", Words), "\n"]),
    ok = file:rename(File ++ ".tmp", File).

now_ms() -> erlang:system_time(millisecond).

log(Log, Fmt, Args) ->
    ok = file:write_file(Log, io_lib:format(Fmt ++ "~n", Args), [append]).

%% Rounds one after the other, so that no message is in flight while a link
%% is dropped on purpose: "round N START END ok|FAIL SENT RECEIVED [WHY]".
driver(Log, Members) ->
    Pairs = [{A, B} || A <- Members, B <- Members, A =/= B],
    warm_up(Log, Pairs, now_ms() + 60000),
    rounds(Log, Pairs, 1).

warm_up(Log, Pairs, Deadline) ->
    case [R || {A, B} <- Pairs, R <- [check(A, B)], element(1, R) =/= ok] of
        [] -> log(Log, "ready ~b", [now_ms()]);
        Bad ->
            case now_ms() > Deadline of
                true -> log(Log, "never ready ~0p", [Bad]);
                false -> timer:sleep(200), warm_up(Log, Pairs, Deadline)
            end
    end.

rounds(Log, Pairs, N) ->
    Start = now_ms(),
    Results = [{A, B, check(A, B)} || {A, B} <- Pairs],
    Sent = length(Pairs) * ?MESSAGES,
    Received = lists:sum([Got || {_, _, {_, Got}} <- Results, is_integer(Got)]),
    case [R || {_, _, V} = R <- Results, element(1, V) =/= ok] of
        [] -> log(Log, "round ~b ~b ~b ok ~b ~b", [N, Start, now_ms(), Sent, Received]);
        Bad -> log(Log, "round ~b ~b ~b FAIL ~b ~b ~0p",
                   [N, Start, now_ms(), Sent, Received, Bad])
    end,
    timer:sleep(50),
    rounds(Log, Pairs, N + 1).

%% A drops its link to B, connects again and exchanges messages with B.
check(A, B) ->
    Me = node(),
    try
        if
            A =:= Me ->
                drop(B),
                ping_exchange(B, ?MESSAGES);
            B =:= Me ->
                %% Through the third member, so that A opens the new link.
                drop(A),
                [Relay | _] = [N || N <- nodes(), N =/= A],
                unwrap(rpc:call(Relay, rpc, call,
                                [A, ?MODULE, rejoin, [B, ?MESSAGES], 20000], 25000));
            true ->
                unwrap(rpc:call(A, erlang, disconnect_node, [B], 20000)),
                unwrap(rpc:call(A, ?MODULE, ping_exchange, [B, ?MESSAGES], 20000))
        end
    catch
        Class:Reason -> {error, {Class, Reason}}
    end.

unwrap({badrpc, _} = E) -> {error, E};
unwrap(V) -> V.

drop(N) ->
    erlang:disconnect_node(N),
    wait_gone(N, 100).

wait_gone(_, 0) -> ok;
wait_gone(N, K) ->
    case lists:member(N, nodes(connected)) of
        true -> timer:sleep(10), wait_gone(N, K - 1);
        false -> ok
    end.

%% Once this node has seen B drop the link: connect and exchange.
rejoin(B, Count) ->
    wait_gone(B, 500),
    ping_exchange(B, Count).

%% Connects to B (a new handshake when not connected) and sends its echo
%% server Count messages; {ok, Count} when every reply came back.
ping_exchange(B, Count) ->
    case net_adm:ping(B) of
        pang -> {pang, 0};
        pong ->
            Ref = make_ref(),
            [{?ECHO, B} ! {self(), Ref, Seq} || Seq <- lists:seq(1, Count)],
            case collect(Ref, Count, 0) of
                Count -> {ok, Count};
                Got -> {lost, Got}
            end
    end.

collect(_, 0, Got) -> Got;
collect(Ref, Left, Got) ->
    receive {Ref, _, _} -> collect(Ref, Left - 1, Got + 1)
    after 10000 -> Got
    end.

%% -run anchorage_e2e newcomer READY LOG MEMBER...: a hidden node with a
%% certificate of the new CA that keeps knocking: a new connection to each
%% member every 100 ms, each attempt logged as "TIME NODE pong|pang".
newcomer([Ready, Log | Members]) ->
    {ok, _} = application:ensure_all_started(ssl),
    Nodes = [list_to_atom(M) || M <- Members],
    spawn(fun() -> knock(Log, Nodes) end),
    ready(Ready, [os:getpid()]).

knock(Log, Nodes) ->
    lists:foreach(fun(N) ->
        drop(N),
        R = net_adm:ping(N),
        log(Log, "~b ~s ~s", [now_ms(), N, R])
    end, Nodes),
    timer:sleep(100),
    knock(Log, Nodes).
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("random");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A short node name no other run uses.
fn unique(story: &str) -> String {
    format!("anchorage_{story}_{}_{}", std::process::id(), random_hex(3))
}

fn require_erlang() {
    let found = Command::new("erl")
        .args(["-noinput", "-eval", "halt()."])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    assert!(
        found,
        "Erlang/OTP is needed (erl, erlc, epmd): run scripts/install-test-deps"
    );
}

/// Writes and compiles the fixture module into `dir`.
fn compile_module(dir: &Path) {
    let src = write(dir, "anchorage_e2e.erl", MODULE);
    let out = Command::new("erlc")
        .arg("-o")
        .arg(dir)
        .arg(&src)
        .output()
        .expect("run erlc");
    assert!(
        out.status.success(),
        "erlc: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cookie_file(dir: &Path, cookie: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = write(dir, "cookie", cookie);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod cookie");
    path
}

/// A running Erlang VM, killed when dropped.
struct Node {
    name: String,
    child: Child,
    log: PathBuf,
    ready: PathBuf,
}

impl Node {
    /// `erl -noinput -sname NAME@localhost -setcookie COOKIE ARGS`, with its
    /// output in `dir/NAME.log`; `ready` is the file the node writes once up.
    fn start(dir: &Path, short: &str, cookie: &str, args: &[&str], ready: &Path) -> Self {
        let name = format!("{short}@localhost");
        let log = dir.join(format!("{short}.log"));
        let file = fs::File::create(&log).expect("node log");
        let child = Command::new("erl")
            .args(["-noinput", "-sname", &name, "-setcookie", cookie])
            .args(args)
            .env("ERL_CRASH_DUMP_SECONDS", "0")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start erl");
        Self {
            name,
            child,
            log,
            ready: ready.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the ready file; returns its words (the OS pid first).
    #[track_caller]
    fn wait_ready(&mut self) -> Vec<String> {
        eventually(DEADLINE, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            match fs::read_to_string(&self.ready) {
                Ok(text) => Ok(text.split_whitespace().map(str::to_owned).collect()),
                Err(_) => Err(format!("{} not ready:\n{}", self.name, self.log())),
            }
        })
    }

    /// The same OS process as at the start, still running.
    #[track_caller]
    fn assert_kept_running(&mut self, os_pid: &str) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "{} exited:\n{}",
            self.name,
            self.log()
        );
        assert_eq!(
            os_pid,
            self.child.id().to_string(),
            "{} is not the process started",
            self.name
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a daemon's log says about one bundle or key pair, `name`: the
/// lines where it changed (a render that rewrote its outputs, or a key pair
/// accepted with new bytes) and the successful reloads that name it. Read
/// from the log so that the checks hold however the reloads coalesce
/// (guarantee 4): a reload may name several targets, and a change that
/// arrives while one runs is covered by exactly one more run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Change,
    Reload,
}

fn is_change(line: &str, name: &str) -> bool {
    line.contains("outcome=\"changed\"")
        && ((line.contains(" rendered ") && line.contains(&format!("bundle=\"{name}\"")))
            || (line.contains(" key pair checked ") && line.contains(&format!("keypair={name} "))))
}

/// The names a successful reload line runs for: `bundles=["dist", "peers"]`.
fn reloaded_names(line: &str) -> Option<Vec<String>> {
    if !line.contains(" reloaded ") || !line.contains("outcome=\"success\"") {
        return None;
    }
    let list = line.split_once("bundles=[")?.1.split_once(']')?.0;
    Some(
        list.split(',')
            .map(|n| n.trim().trim_matches('"').to_owned())
            .filter(|n| !n.is_empty())
            .collect(),
    )
}

/// The changes of `name` and the successful reloads naming it in `log`, in
/// order; panics on a failed reload (none is expected in these stories).
fn history(log: &str, name: &str) -> Vec<Seen> {
    assert!(!log.contains("reload failed"), "a reload failed:\n{log}");
    log.lines()
        .filter_map(|l| {
            if is_change(l, name) {
                Some(Seen::Change)
            } else if reloaded_names(l).is_some_and(|n| n.iter().any(|n| n == name)) {
                Some(Seen::Reload)
            } else {
                None
            }
        })
        .collect()
}

/// Where a daemon's log ends now: what it writes next is after a change the
/// test is about to make.
fn mark(daemon: &Daemon) -> usize {
    daemon.log().len()
}

/// Waits until, after `mark`, `name` changed (its new output is written, or
/// its new key pair accepted) and a reload naming it succeeded after that
/// line: the node was reloaded after the change, however runs coalesced.
#[track_caller]
fn wait_reloaded_after(daemon: &Daemon, mark: usize, name: &str) {
    eventually(DEADLINE, || {
        let log = daemon.log();
        let since = history(log.get(mark..).unwrap_or_default(), name);
        match since.iter().position(|s| *s == Seen::Change) {
            Some(first) if since[first..].contains(&Seen::Reload) => Ok(()),
            Some(_) => Err(format!("{name} changed, no reload since\n{log}")),
            None => Err(format!("{name} has not changed yet\n{log}")),
        }
    });
}

/// What must hold whatever the timing, over a daemon's whole log: `name`
/// changed exactly `changes` times (guarantee 3: only real changes count),
/// at no point had more reloads than changes (guarantee 4: nothing piled
/// up) and was reloaded after its last change (nothing lost).
#[track_caller]
fn assert_each_change_reloaded(daemon: &Daemon, name: &str, changes: usize) {
    let log = daemon.log();
    let seen = history(&log, name);
    let (mut changed, mut reloaded) = (0, 0);
    for s in &seen {
        match s {
            Seen::Change => changed += 1,
            Seen::Reload => reloaded += 1,
        }
        assert!(
            reloaded <= changed,
            "{name}: a reload with no change left to cover ({seen:?})\n{log}"
        );
    }
    assert_eq!(changed, changes, "{name}: changes ({seen:?})\n{log}");
    assert_eq!(
        seen.last(),
        Some(&Seen::Reload),
        "{name}: its last change was not reloaded\n{log}"
    );
}

/// The INFO and WARN lines of a daemon's log, for a failure message.
fn info(daemon: &Daemon) -> String {
    daemon
        .log()
        .lines()
        .filter(|l| !l.contains(" DEBUG "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[track_caller]
fn wait_bundle(path: &Path, want: &[&Ca]) {
    let mut want: Vec<Vec<u8>> = want.iter().map(|c| c.der()).collect();
    want.sort();
    eventually(DEADLINE, || {
        let mut got = pem_certs(&fs::read(path).unwrap_or_default());
        got.sort();
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "{} holds {} certificates, not the expected set",
                path.display(),
                got.len()
            ))
        }
    });
}

fn mkdir(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    fs::create_dir_all(&path).expect("mkdir");
    path
}

fn pems(cas: &[&Ca]) -> String {
    cas.iter().map(|c| c.pem()).collect()
}

/// Files for a TLS client: its leaf and key, and the CAs it trusts.
fn identity(dir: &Path, name: &str, leaf: &Leaf, trust: &[&Ca]) -> Identity {
    Identity {
        cert: write(dir, &format!("{name}.crt"), leaf.cert.pem()),
        key: write(dir, &format!("{name}.key"), leaf.key.serialize_pem()),
        trust: write(dir, &format!("{name}-trust.pem"), pems(trust)),
    }
}

/// A client connection to an `ssl` listener of story A as `id`: it
/// handshakes and exchanges one line.
fn open(port: u16, id: &Identity) -> Result<Connection, String> {
    Connection::open(port, "localhost", client_config(id))
}

#[track_caller]
fn accepted(port: u16, id: &Identity, what: &str) -> Connection {
    open(port, id).unwrap_or_else(|e| panic!("{what}: refused: {e}"))
}

#[track_caller]
fn refused(port: u16, id: &Identity, what: &str) {
    if open(port, id).is_ok() {
        panic!("{what}: accepted");
    }
}

/// Retries until a connection as `id` is accepted; returns when.
#[track_caller]
fn first_accepted(port: u16, id: &Identity) -> Instant {
    eventually(DEADLINE, || match open(port, id) {
        Ok(_) => Ok(Instant::now()),
        Err(e) => {
            std::thread::sleep(Duration::from_millis(30));
            Err(e)
        }
    })
}

/// Story A: an `ssl` listener that verifies its clients against anchorage's
/// output, reloaded with `ssl:clear_pem_cache()` through
/// `scripts/erlang-reload`.
#[test]
fn erlang_ssl_listener_trusts_the_rotated_bundle_after_clear_pem_cache() {
    let _one = ERLANG.lock().unwrap_or_else(|e| e.into_inner());
    require_erlang();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    compile_module(dir);
    let (old, new, server_ca) = (
        Ca::new("Erlang Clients Old"),
        Ca::new("Erlang Clients New"),
        Ca::new("Erlang Server"),
    );
    let server = server_ca.leaf("localhost");
    let cert = write(dir, "server.crt", server.cert.pem());
    let key = write(dir, "server.key", server.key.serialize_pem());
    let client_old = identity(
        dir,
        "client-old",
        &old.leaf("client-old.test"),
        &[&server_ca],
    );
    let client_new = identity(
        dir,
        "client-new",
        &new.leaf("client-new.test"),
        &[&server_ca],
    );

    let short = unique("ssl");
    let node_name = format!("{short}@localhost");
    let cookie = random_hex(16);
    let cookie_path = cookie_file(dir, &cookie);
    // The volume's parent is watched too (it sees the volume replaced):
    // keep the test's busy files out of it.
    let mut secret = Volume::new(&dir.join("volumes").join("secret"));
    secret.write(&[("ca.crt", old.pem().as_bytes())]);
    let output = mkdir(dir, "out").join("trust.pem");
    let exec = format!("{RELOAD} --cookie-file {} {node_name}", s(&cookie_path));
    let daemon = Daemon::start(
        &mkdir(dir, "logs"),
        &[
            "--source",
            s(&secret.dir),
            "--output",
            s(&output),
            "--exec",
            &exec,
            "--debounce",
            "0",
        ],
    );
    // The first render reloads; the node is not running yet, which the
    // script says with exit 75 (EX_TEMPFAIL): skipped, not retried.
    wait_bundle(&output, &[&old]);
    daemon.wait_log("does not exist yet; skipped", 1);
    assert!(daemon.log().contains("is not running"), "{}", daemon.log());

    // A control listener whose CA file only the test replaces.
    let control = write(dir, "control.pem", old.pem());
    let ready = dir.join("ssl.ready");
    let mut node = Node::start(
        dir,
        &short,
        &cookie,
        &[
            "-pa",
            s(dir),
            "-run",
            "anchorage_e2e",
            "listen",
            s(&ready),
            s(&cert),
            s(&key),
            s(&output),
            s(&control),
        ],
        &ready,
    );
    let words = node.wait_ready();
    let os_pid = words[0].clone();
    let port: u16 = words[1].parse().expect("port");
    let control_port: u16 = words[2].parse().expect("control port");

    // Phase 1: the Secret holds CA-old.
    let mut long_lived = accepted(port, &client_old, "phase 1: CA-old client");
    refused(port, &client_new, "phase 1: CA-new client");

    // Control: a replaced CA file is not seen while a connection that uses
    // it lives, until the reload script runs. The rename is complete before
    // the next handshake, so that handshake either reads the new file or
    // uses the cached CAs: nothing to wait for. (OTP drops the cached CAs
    // on its own only 500 ms after no connection uses the file, which the
    // live control connection prevents, or at its validator's run, every
    // 120 s.)
    let mut control_conn = accepted(control_port, &client_old, "control: CA-old client");
    let staged = write(dir, "control.pem.tmp", pems(&[&old, &new]));
    fs::rename(&staged, &control).expect("replace control.pem");
    control_conn
        .ping()
        .expect("control connection alive after the file was replaced");
    refused(
        control_port,
        &client_new,
        "control: CA-new client before the reload (OTP should still use its cached CAs)",
    );
    let out = Command::new(RELOAD)
        .args(["--cookie-file", s(&cookie_path), &node_name])
        .output()
        .expect("run erlang-reload");
    assert!(
        out.status.success(),
        "erlang-reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("cleared ssl_pem_cache"), "{said}");
    accepted(
        control_port,
        &client_new,
        "control: CA-new client after the reload",
    );
    control_conn
        .ping()
        .expect("control connection kept across the reload");

    // Phase 2: the Secret becomes CA-old + CA-new.
    let before = mark(&daemon);
    let swap = Instant::now();
    secret.write(&[("ca.crt", pems(&[&old, &new]).as_bytes())]);
    let first = first_accepted(port, &client_new);
    println!(
        "erlang ssl: swap -> first CA-new connection accepted: {} ms",
        first.duration_since(swap).as_millis()
    );
    wait_bundle(&output, &[&old, &new]);
    wait_reloaded_after(&daemon, before, "default");
    accepted(port, &client_old, "phase 2: CA-old client");
    accepted(port, &client_new, "phase 2: CA-new client");
    long_lived
        .ping()
        .expect("phase 2: the long-lived connection");

    // Phase 3: the Secret drops CA-old.
    let before = mark(&daemon);
    secret.write(&[("ca.crt", new.pem().as_bytes())]);
    wait_bundle(&output, &[&new]);
    wait_reloaded_after(&daemon, before, "default");
    refused(port, &client_old, "phase 3: CA-old client after the reload");
    accepted(port, &client_new, "phase 3: CA-new client");
    // A handshake is verified once: the established connection stays.
    long_lived
        .ping()
        .expect("phase 3: the long-lived connection is kept");

    node.assert_kept_running(&os_pid);
    assert_each_change_reloaded(&daemon, "default", 3);
}

/// Files of one cluster member: its leaf (a kubelet volume of its own), the
/// output anchorage renders for it, its distribution options and its
/// anchorage config.
struct Member {
    short: String,
    name: String,
    tls: Volume,
    output: PathBuf,
    optfile: PathBuf,
    config: PathBuf,
}

fn dist_options(cacertfile: &Path, certfile: &Path, keyfile: &Path) -> String {
    let side = |extra: &str| {
        format!(
            "[{{cacertfile, {:?}}}, {{certfile, {:?}}}, {{keyfile, {:?}}}, {{verify, verify_peer}}{extra}, {{secure_renegotiate, true}}]",
            s(cacertfile),
            s(certfile),
            s(keyfile)
        )
    };
    format!(
        "[{{server, {}}},\n {{client, {}}}].\n",
        side(", {fail_if_no_peer_cert, true}"),
        side("")
    )
}

impl Member {
    fn new(dir: &Path, short: String, leaf: &Leaf, secret: &Path, cookie: &Path) -> Self {
        let home = dir.join(&short);
        let mut tls = Volume::new(&home.join("tls"));
        let (crt, key) = tls.write_pair(leaf);
        let output = mkdir(&home, "out").join("trust.pem");
        let optfile = write(&home, "dist.conf", dist_options(&output, &crt, &key));
        let name = format!("{short}@localhost");
        let exec = format!(
            "[{:?}, \"--cookie-file\", {:?}, \"--ssl-dist-optfile\", {:?}, {:?}]",
            RELOAD,
            s(cookie),
            s(&optfile),
            name
        );
        let config = write(
            &home,
            "anchorage.toml",
            format!(
                r#"[daemon]
debounce = "0"

[[bundle]]
name = "peers"
sources = [{secret:?}]

  [[bundle.output]]
  path = {output:?}

  [[bundle.reload]]
  exec = {exec}
  timeout = "60s"

[[keypair]]
name = "dist"
cert = {crt:?}
key = {key:?}
chain_to = "peers"

  [[keypair.reload]]
  exec = {exec}
  timeout = "60s"
"#,
                secret = s(secret),
                output = s(&output),
                crt = s(&crt),
                key = s(&key),
            ),
        );
        Self {
            short,
            name,
            tls,
            output,
            optfile,
            config,
        }
    }

    fn node_args<'a>(&'a self, dir: &'a Path) -> Vec<&'a str> {
        vec![
            "-connect_all",
            "false",
            "-kernel",
            "prevent_overlapping_partitions",
            "false",
            "-proto_dist",
            "inet_tls",
            "-ssl_dist_optfile",
            s(&self.optfile),
            "-pa",
            s(dir),
        ]
    }
}

/// The distribution port epmd has for a node.
fn dist_port(short: &str) -> u16 {
    let out = Command::new("epmd")
        .arg("-names")
        .output()
        .expect("epmd -names");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("name {short} at port ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{short} is not registered with epmd:\n{text}"))
}

/// A TLS handshake with a node's distribution listener as `id` (as a
/// member's dist client would: TLS 1.2, name "localhost"); returns the leaf
/// the node served. The connection is dropped before the distribution
/// handshake.
fn dist_handshake(port: u16, id: &Identity) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut conn = ClientConnection::new(client_config(id), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut stream)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec())
        .ok_or_else(|| "no certificate served".into())
}

#[track_caller]
fn serves(port: u16, id: &Identity, leaf: &Leaf, what: &str) {
    // The reload has run; a loaded machine may take a moment more before
    // the node's next handshake reads the cleared cache.
    eventually(DEADLINE, || {
        let served = dist_handshake(port, id).map_err(|e| format!("{what}: {e}"))?;
        if served == leaf.cert.der().to_vec() {
            Ok(())
        } else {
            Err(format!("{what}: the node serves another certificate"))
        }
    });
}

/// Runs `rpc:call(NODE, M, F, [])` from a hidden VM that joins over TLS
/// distribution with `optfile`; returns what it printed.
fn tls_rpc(optfile: &Path, cookie: &str, node: &str, module: &str, function: &str) -> String {
    let eval = format!(
        "io:format(\"~p~n\", [rpc:call('{node}', {module}, {function}, [], 20000)]), halt()."
    );
    let me = format!("{}@localhost", unique("rpc"));
    let out = Command::new("erl")
        .args(["-noinput", "-hidden", "-sname", &me, "-setcookie", cookie])
        .args(["-proto_dist", "inet_tls", "-ssl_dist_optfile", s(optfile)])
        .args(["-eval", &eval])
        .env("ERL_CRASH_DUMP_SECONDS", "0")
        .output()
        .expect("run erl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A line of the driver's log: "round N START END ok|FAIL SENT RECEIVED".
struct Round {
    start: u64,
    ok: bool,
    sent: u64,
    received: u64,
    line: String,
}

fn rounds(log: &Path) -> Vec<Round> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() < 7 || w[0] != "round" {
                return None;
            }
            Some(Round {
                start: w[2].parse().ok()?,
                ok: w[4] == "ok",
                sent: w[5].parse().ok()?,
                received: w[6].parse().ok()?,
                line: line.to_owned(),
            })
        })
        .collect()
}

/// Waits until a whole round started after `since` (ms since the epoch) and
/// panics if any round so far failed.
#[track_caller]
fn wait_round_after(log: &Path, since: u64, phase: &str) {
    eventually(DEADLINE, || {
        let all = rounds(log);
        if let Some(bad) = all.iter().find(|r| !r.ok) {
            panic!("{phase}: a round failed: {}", bad.line);
        }
        if all.iter().any(|r| r.start >= since) {
            Ok(())
        } else {
            Err(format!(
                "{phase}: no round since the change yet ({} rounds)",
                all.len()
            ))
        }
    });
}

/// The newcomer's attempts: (time, node short name, accepted).
fn knocks(log: &Path) -> Vec<(u64, String, bool)> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() != 3 {
                return None;
            }
            let short = w[1].split('@').next()?.to_owned();
            Some((w[0].parse().ok()?, short, w[2] == "pong"))
        })
        .collect()
}

/// Story B, the seed's case: a three-node cluster with TLS distribution
/// whose CA is rotated (Secret old, old+new, leaves reissued one node at a
/// time, Secret new), each node with its own anchorage that reloads it
/// through `scripts/erlang-reload --ssl-dist-optfile`.
#[test]
fn erlang_tls_distribution_cluster_survives_a_ca_rotation() {
    let _one = ERLANG.lock().unwrap_or_else(|e| e.into_inner());
    require_erlang();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    compile_module(dir);
    let (old, new) = (Ca::new("Erlang Dist Old"), Ca::new("Erlang Dist New"));
    let cookie = random_hex(16);
    let cookie_path = cookie_file(dir, &cookie);
    // The volume's parent is watched too (it sees the volume replaced):
    // keep the test's busy files out of it.
    let mut secret = Volume::new(&dir.join("volumes").join("secret"));
    secret.write(&[("ca.crt", old.pem().as_bytes())]);

    let tag = unique("dist");
    let old_leaves: Vec<Leaf> = (0..3).map(|_| old.leaf("localhost")).collect();
    let new_leaves: Vec<Leaf> = (0..3).map(|_| new.leaf("localhost")).collect();
    let mut members: Vec<Member> = old_leaves
        .iter()
        .enumerate()
        .map(|(i, leaf)| {
            Member::new(
                dir,
                format!("{tag}_{}", i + 1),
                leaf,
                &secret.dir,
                &cookie_path,
            )
        })
        .collect();

    // One anchorage per node, as one sidecar per pod. Each renders at start
    // and runs its reload, which finds no node yet (exit 75): skipped.
    let logs = mkdir(dir, "logs");
    let daemons: Vec<Daemon> = members
        .iter()
        .map(|m| Daemon::start(&logs, &["--config", s(&m.config)]))
        .collect();
    for (m, d) in members.iter().zip(&daemons) {
        wait_bundle(&m.output, &[&old]);
        d.wait_log("does not exist yet; skipped", 1);
    }

    // Phase 1: all trust CA-old, all leaves from CA-old.
    let driver_log = dir.join("driver.log");
    let mut nodes: Vec<Node> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let ready = dir.join(format!("{}.ready", m.short));
        let mut args = m.node_args(dir);
        args.extend(["-run", "anchorage_e2e", "member", s(&ready)]);
        if i == 0 {
            args.push(s(&driver_log));
            args.extend(members[1..].iter().map(|p| p.name.as_str()));
        }
        nodes.push(Node::start(dir, &m.short, &cookie, &args, &ready));
    }
    let os_pids: Vec<String> = nodes
        .iter_mut()
        .map(|n| n.wait_ready()[0].clone())
        .collect();
    eventually(DEADLINE, || {
        let text = fs::read_to_string(&driver_log).unwrap_or_default();
        if text.contains("never ready") {
            panic!("the cluster never formed: {text}\n{}", nodes[0].log());
        }
        if text.starts_with("ready") {
            Ok(())
        } else {
            Err("the cluster has not formed yet".to_owned())
        }
    });
    wait_round_after(&driver_log, 0, "phase 1");

    // Probe identities for the distribution listeners.
    let probe_old = identity(dir, "probe-old", &old.leaf("probe-old.test"), &[&old, &new]);
    let probe_new = identity(dir, "probe-new", &new.leaf("probe-new.test"), &[&old, &new]);

    // A newcomer with a leaf of CA-new (its own sidecar already sees the new
    // Secret) keeps knocking at every member.
    let newcomer_short = format!("{tag}_newcomer");
    let newcomer_leaves = [new.leaf("localhost"), new.leaf("localhost")];
    let mut newcomer_tls = Volume::new(&dir.join("newcomer").join("tls"));
    newcomer_tls.write(&[
        ("tls.crt", newcomer_leaves[0].cert.pem().as_bytes()),
        ("tls.key", newcomer_leaves[0].key.serialize_pem().as_bytes()),
    ]);
    let newcomer_trust = write(&dir.join("newcomer"), "trust.pem", pems(&[&old, &new]));
    let newcomer_opt = write(
        &dir.join("newcomer"),
        "dist.conf",
        dist_options(
            &newcomer_trust,
            &newcomer_tls.dir.join("tls.crt"),
            &newcomer_tls.dir.join("tls.key"),
        ),
    );
    let knock_log = dir.join("newcomer.log");
    let newcomer_ready = dir.join("newcomer.ready");
    let mut newcomer_args = vec![
        "-hidden",
        "-proto_dist",
        "inet_tls",
        "-ssl_dist_optfile",
        s(&newcomer_opt),
        "-pa",
        s(dir),
        "-run",
        "anchorage_e2e",
        "newcomer",
        s(&newcomer_ready),
        s(&knock_log),
    ];
    newcomer_args.extend(members.iter().map(|m| m.name.as_str()));
    let mut newcomer = Node::start(
        dir,
        &newcomer_short,
        &cookie,
        &newcomer_args,
        &newcomer_ready,
    );
    let newcomer_name = newcomer.name.clone();

    // Control, on the newcomer (its files are the test's): a reissued leaf
    // is served by distribution only once ssl_pem_cache_dist is cleared;
    // ssl:clear_pem_cache() does not reach it.
    let newcomer_pid = newcomer.wait_ready()[0].clone();
    let newcomer_port = dist_port(&newcomer_short);
    serves(
        newcomer_port,
        &probe_old,
        &newcomer_leaves[0],
        "control: the newcomer's first leaf",
    );
    newcomer_tls.write(&[
        ("tls.crt", newcomer_leaves[1].cert.pem().as_bytes()),
        ("tls.key", newcomer_leaves[1].key.serialize_pem().as_bytes()),
    ]);
    let said = tls_rpc(
        &newcomer_opt,
        &cookie,
        &newcomer_name,
        "ssl",
        "clear_pem_cache",
    );
    assert_eq!(said, "ok", "ssl:clear_pem_cache() on the newcomer");
    serves(
        newcomer_port,
        &probe_old,
        &newcomer_leaves[0],
        "control: after ssl:clear_pem_cache() distribution still serves the cached leaf",
    );
    let out = Command::new(RELOAD)
        .args([
            "--cookie-file",
            s(&cookie_path),
            "--ssl-dist-optfile",
            s(&newcomer_opt),
            &newcomer_name,
        ])
        .output()
        .expect("run erlang-reload");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "erlang-reload: {said}");
    assert!(said.contains("ssl_pem_cache_dist"), "{said}");
    serves(
        newcomer_port,
        &probe_old,
        &newcomer_leaves[1],
        "control: after erlang-reload the reissued leaf",
    );

    // Before the swap every member refuses the newcomer.
    eventually(DEADLINE, || {
        let k = knocks(&knock_log);
        if let Some(hit) = k.iter().find(|(_, _, ok)| *ok) {
            panic!("phase 1: {} accepted a CA-new newcomer", hit.1);
        }
        let all_tried = members
            .iter()
            .all(|m| k.iter().filter(|(_, n, _)| *n == m.short).count() >= 2);
        if all_tried {
            Ok(())
        } else {
            Err(format!("the newcomer has knocked {} times", k.len()))
        }
    });
    refused_dist(&members, &probe_new, "phase 1: a CA-new client");

    // Phase 2: the Secret becomes CA-old + CA-new; every node reloads.
    let marks: Vec<usize> = daemons.iter().map(mark).collect();
    let swap = now_ms();
    secret.write(&[("ca.crt", pems(&[&old, &new]).as_bytes())]);
    for ((m, d), before) in members.iter().zip(&daemons).zip(&marks) {
        wait_bundle(&m.output, &[&old, &new]);
        wait_reloaded_after(d, *before, "peers");
    }
    let firsts: Vec<u64> = eventually(DEADLINE, || {
        let k = knocks(&knock_log);
        members
            .iter()
            .map(|m| {
                k.iter()
                    .find(|(t, n, ok)| *ok && *n == m.short && *t >= swap)
                    .map(|(t, _, _)| *t)
                    .ok_or_else(|| format!("{} has not accepted the newcomer yet", m.name))
            })
            .collect()
    });
    let (first, last) = (
        firsts.iter().min().expect("members") - swap,
        firsts.iter().max().expect("members") - swap,
    );
    println!("erlang dist: swap -> first CA-new connection accepted: {first} ms");
    println!("erlang dist: swap -> every node accepts CA-new: {last} ms");
    for (m, leaf) in members.iter().zip(&old_leaves) {
        serves(
            dist_port(&m.short),
            &probe_new,
            leaf,
            &format!("phase 2: {} to a CA-new client", m.name),
        );
    }
    wait_round_after(&driver_log, now_ms(), "phase 2");

    // Phase 3: the leaves are reissued by CA-new, one node at a time; the
    // node's key pair watch reloads it.
    for (i, leaf) in new_leaves.iter().enumerate() {
        let before = mark(&daemons[i]);
        let changed = Instant::now();
        members[i].tls.write_pair(leaf);
        wait_reloaded_after(&daemons[i], before, "dist");
        println!(
            "erlang dist: leaf of {} reissued -> node reloaded: {} ms",
            members[i].short,
            changed.elapsed().as_millis()
        );
        serves(
            dist_port(&members[i].short),
            &probe_old,
            leaf,
            &format!(
                "phase 3: {} after its leaf was reissued\n{}",
                members[i].name,
                info(&daemons[i])
            ),
        );
        wait_round_after(
            &driver_log,
            now_ms(),
            &format!("phase 3, {}", members[i].name),
        );
    }

    // Phase 4: the Secret drops CA-old.
    let marks: Vec<usize> = daemons.iter().map(mark).collect();
    secret.write(&[("ca.crt", new.pem().as_bytes())]);
    for ((m, d), before) in members.iter().zip(&daemons).zip(&marks) {
        wait_bundle(&m.output, &[&new]);
        wait_reloaded_after(d, *before, "peers");
    }
    let reloaded = now_ms();
    for (m, leaf) in members.iter().zip(&new_leaves) {
        let port = dist_port(&m.short);
        serves(
            port,
            &probe_new,
            leaf,
            &format!("phase 4: {} to a CA-new client", m.name),
        );
        // The reload has run; as with `serves`, the node's next handshakes
        // may need a moment more on a loaded machine.
        eventually(DEADLINE, || match dist_handshake(port, &probe_old) {
            Err(_) => Ok(()),
            Ok(_) => Err(format!("phase 4: {} still accepts a CA-old client", m.name)),
        });
    }
    wait_round_after(&driver_log, reloaded, "phase 4");

    // Nothing failed, nothing was lost, nobody restarted.
    let all = rounds(&driver_log);
    let (sent, received) = all
        .iter()
        .fold((0, 0), |(s, r), x| (s + x.sent, r + x.received));
    assert!(all.iter().all(|r| r.ok));
    assert_eq!(sent, received, "messages lost");
    println!(
        "erlang dist: {} rounds of 6 new connections each, {sent} messages sent, {received} answered",
        all.len()
    );
    let k = knocks(&knock_log);
    for (m, first) in members.iter().zip(&firsts) {
        assert!(
            !k.iter()
                .any(|(t, n, ok)| !*ok && *n == m.short && t > first),
            "{} refused the newcomer after accepting it",
            m.name
        );
    }
    // Each node was reloaded after each change (checked phase by phase
    // above); over the whole run, each bundle and key pair changed exactly
    // as often as the test changed it and no reload piled up. How many runs
    // that took depends on how reloads coalesced: not checked.
    for ((n, pid), d) in nodes.iter_mut().zip(&os_pids).zip(&daemons) {
        n.assert_kept_running(pid);
        // The start, CA-new added, CA-old dropped.
        assert_each_change_reloaded(d, "peers", 3);
        // The reissued leaf (the pair loaded at start is no change).
        assert_each_change_reloaded(d, "dist", 1);
    }
    newcomer.assert_kept_running(&newcomer_pid);
}

#[track_caller]
fn refused_dist(members: &[Member], id: &Identity, what: &str) {
    for m in members {
        assert!(
            dist_handshake(dist_port(&m.short), id).is_err(),
            "{what}: accepted by {}",
            m.name
        );
    }
}

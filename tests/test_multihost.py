"""Several processes on one machine (2 processes x 3 host CPU devices, gloo collectives),
started by scripts/launch/local.sh: the leader serves the demo over gRPC with the same
greedy tokens as transformers, followers exit 0 when the leader stops, a lost follower
makes the leader go NOT_SERVING, fail requests with UNAVAILABLE and exit non-zero, and
bad coordinates or configs are one-line errors."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from jaxserve.engine.request import SamplingParams
from jaxserve.server.client import Client
from sharding.distributed import DistributedConfig, _cluster_launched, initialize

REPO = pathlib.Path(__file__).resolve().parent.parent
LOCAL = REPO / "scripts" / "launch" / "local.sh"
GOLDEN = json.loads((REPO / "tests" / "fixtures" / "smollm2_golden.json").read_text())["cases"]
JAXSERVE = str(pathlib.Path(sys.executable).parent / "jaxserve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**e, "JAXSERVE": JAXSERVE, "DEVICES_PER_PROCESS": "3", **extra}


@pytest.fixture(scope="module")
def config_file(demo_config, demo_model, tmp_path_factory):
    """The demo on pipeline 2 x tensor 3 (two processes of three devices)."""
    text = (REPO / "configs" / "smollm2-135m-cpu.yaml").read_text()
    cache = demo_config.checkpoint.cache_dir
    for old, new in (("  source: demo", f"  source: demo\n  cache_dir: {cache}"),
                     ("pipeline: 1", "pipeline: 2"), ("tensor: 1", "tensor: 3"),
                     ("kv_cache_memory: 268435456", "kv_cache_memory: 16777216"),
                     ("max_model_len: 2048", "max_model_len: 256"),
                     ("token_buckets: [1, 4, 16, 64, 128, 256, 512, 1024, 2048]",
                      "token_buckets: [16, 64]"),
                     ("seq_buckets: [1, 4, 16]", "seq_buckets: [4, 16]"),
                     ("max_num_batched_tokens: 2048", "max_num_batched_tokens: 64"),
                     ("metrics_port: 9400", "metrics_port: null"),
                     ("layer_arrays: true", "layer_arrays: false"),  # stages split stacks
                     ("layer_loop: true", "layer_loop: false"),
                     ("transposed_weights: true", "transposed_weights: false")):
        assert old in text, old
        text = text.replace(old, new)
    text += "distributed:\n  init_timeout_s: 20\n  step_timeout_s: 10\n"
    path = tmp_path_factory.mktemp("multihost") / "pp2-tp3.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def patient_config(config_file):
    """The same group with a 60 s step watchdog. On a slow 2-core machine a step of the two
    processes has passed 10 s (seen once in a full run); only the lost-follower test needs
    the watchdog short."""
    path = config_file.with_name("pp2-tp3-patient.yaml")
    text = config_file.read_text()
    assert "step_timeout_s: 10" in text
    path.write_text(text.replace("step_timeout_s: 10", "step_timeout_s: 60"))
    return path


def start_group(config_file, port: int) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(LOCAL), "2", str(config_file), "--port", str(port)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_serving(proc: subprocess.Popen, port: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with Client("127.0.0.1", port) as c:
                if c.health(timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError("the leader did not report SERVING")


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@contextlib.contextmanager
def serving_group(config_file):
    """(local.sh process, gRPC port) of two processes serving; killed if still up after."""
    port = free_port()
    group = start_group(config_file, port)
    try:
        wait_serving(group, port)
        yield group, port
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)


def first_greedy_tokens(port: int) -> list[list[int]]:
    """The first (up to) 10 greedy tokens of each golden prompt, four requests at a time."""
    with Client("127.0.0.1", port) as client:
        def ids(case):
            params = SamplingParams(max_tokens=min(10, len(case["greedy_ids"])),
                                    temperature=0.0)
            return [t for c in client.generate(case["prompt_ids"], params, timeout=120)
                    for t in c.token_ids]
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(ids, GOLDEN))


@pytest.mark.slow
def test_two_processes_serve_the_transformers_tokens_and_stop_together(patient_config):
    with serving_group(patient_config) as (group, port):
        assert first_greedy_tokens(port) == [case["greedy_ids"][:10] for case in GOLDEN]
        group.send_signal(signal.SIGTERM)  # local.sh hands it to the leader
        code, out = finish(group)
    assert code == 0, out
    assert "local.sh: process 0 exited with 0" in out and \
        "local.sh: process 1 exited with 0" in out, out


@pytest.fixture(scope="module")
def multi_step_config(patient_config):
    """Data 2 x tensor 3 over the two processes, with 4 decode steps per call: the follower
    runs the multi-step programs the leader names."""
    path = patient_config.with_name("dp2-tp3-multi-step.yaml")
    text = patient_config.read_text()
    for old, new in (("pipeline: 2", "pipeline: 1"), ("data: 1", "data: 2"),
                     ("  max_num_batched_tokens: 64\n",
                      "  max_num_batched_tokens: 64\n  decode_steps: 4\n")):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.mark.slow
def test_two_processes_decode_four_steps_per_call_with_the_transformers_tokens(
        multi_step_config):
    with serving_group(multi_step_config) as (group, port):
        assert first_greedy_tokens(port) == [case["greedy_ids"][:10] for case in GOLDEN]
        group.send_signal(signal.SIGTERM)
        code, out = finish(group)
    assert code == 0, out


def _cmdline(pid: str) -> bytes:
    """A process's command line; empty once it has exited (local.sh's short-lived children
    can end between pgrep and the read)."""
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def kill_follower(group: subprocess.Popen) -> None:
    """SIGKILL the group's process 1 (a child of local.sh)."""
    children = subprocess.run(["pgrep", "-P", str(group.pid)], capture_output=True,
                              text=True).stdout.split()
    follower = [int(c) for c in children if b"--process-id\x001\x00" in _cmdline(c)]
    assert len(follower) == 1, children
    os.kill(follower[0], signal.SIGKILL)


@pytest.mark.slow
def test_a_lost_follower_makes_the_leader_unavailable_and_exit(config_file):
    with serving_group(config_file) as (group, port):
        kill_follower(group)
        lost = time.monotonic()
        seen = []
        with Client("127.0.0.1", port) as client:
            while time.monotonic() - lost < 30:
                try:
                    seen.append(client.health(timeout=1))
                    list(client.generate([1, 2, 3], SamplingParams(max_tokens=2), timeout=25))
                except grpc.RpcError as e:
                    seen.append(e.code())
                    break
                time.sleep(0.05)
        assert seen[-1] == grpc.StatusCode.UNAVAILABLE, seen
        code, out = finish(group)
    assert code == 3, out  # the leader's EXIT_PEER_LOST: the orchestrator restarts the group
    assert time.monotonic() - lost < 30
    assert "local.sh: process 0 exited with 3" in out, out


@pytest.mark.slow
def test_a_follower_lost_during_warm_up_ends_the_leader_at_once(config_file):
    """No step runs during warm-up, so the step watchdog has nothing to time (a cold compile
    can outlast it); the closed step channel tells the leader instead, long before JAX's
    heartbeat timeout would abort it (exit 134)."""
    group = start_group(config_file, free_port())
    try:
        while "warming up" not in (line := group.stdout.readline()):
            assert line, "the group ended before warming up"
        kill_follower(group)
        lost = time.monotonic()
        code, out = finish(group, timeout=60)
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
    assert code == 3, out
    assert "process(es) [1] closed the step channel: they stopped; exiting" in out, out
    assert time.monotonic() - lost < 20


def test_a_follower_with_a_wrong_coordinator_says_so_in_one_line(config_file, tmp_path):
    short = tmp_path / "short-wait.yaml"  # nobody answers: waiting 20 s proves nothing more
    short.write_text(config_file.read_text().replace("init_timeout_s: 20", "init_timeout_s: 3"))
    r = subprocess.run([JAXSERVE, "serve", "--config", str(short),
                        "--coordinator-address", f"127.0.0.1:{free_port()}",
                        "--num-processes", "2", "--process-id", "1"],
                       env=env(XLA_FLAGS="--xla_force_host_platform_device_count=3"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "jaxserve serve: error: cannot reach the coordinator 127.0.0.1:")


def test_a_process_id_out_of_range_is_refused(config_file):
    r = subprocess.run([JAXSERVE, "serve", "--config", str(config_file),
                        "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                        "--process-id", "2"], env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"jaxserve serve: error: {config_file} with "
                                "--coordinator-address 127.0.0.1:1 --num-processes 2 "
                                "--process-id 2: distributed.process_id: 2 is outside [0, 2)")


def start_pair(configs, counts, *args):
    address = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen([JAXSERVE, "serve", "--config", str(path), "--port", "0",
                              "--coordinator-address", address, "--num-processes", str(n),
                              "--process-id", str(i), *args],
                             env=env(XLA_FLAGS="--xla_force_host_platform_device_count=3"),
                             stderr=subprocess.PIPE, text=True)
            for i, (path, n) in enumerate(zip(configs, counts, strict=True))]


def test_processes_started_with_different_configs_both_refuse(config_file, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(config_file.read_text().replace("max_num_seqs: 16", "max_num_seqs: 8"))
    for p in start_pair((config_file, other), (2, 2)):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            "jaxserve serve: error: process(es) [1] were started with a config that differs "
            "from process 0's (model, checkpoint, cache, scheduler, runner or mesh); start "
            "every process with the same config")


def test_an_unsafe_bind_is_refused_by_every_process_in_one_line(config_file):
    """Every process gets the deployment's arguments: each refuses a public bind without
    TLS and a token before joining (a follower left behind by its leader was aborted by
    JAX)."""
    for p in start_pair((config_file, config_file), (2, 2), "--host", "0.0.0.0"):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.strip().splitlines() == [
            "jaxserve serve: error: server.host='0.0.0.0' is not a loopback address and the "
            "server has no TLS (server.tls_cert and server.tls_key) and no bearer token "
            "(server.auth_token); configure them, or pass --insecure to serve without them"]


def test_a_mismatched_number_of_processes_is_refused_by_both(config_file):
    for p in start_pair((config_file, config_file), (2, 3)):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            "jaxserve serve: error: process(es) [1] were told --num-processes [3], but the "
            "deployment has 2 processes")


def test_coordinates_come_from_flags_leaderworkerset_or_nowhere():
    lws = {"LWS_LEADER_ADDRESS": "group-0.svc", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "2"}
    c = DistributedConfig().resolved(lws)
    assert (c.coordinator_address, c.num_processes, c.process_id) == ("group-0.svc:8476", 4, 2)
    explicit = DistributedConfig("h:1", 2, 0)
    assert explicit.resolved(lws) == explicit  # flags win
    assert initialize(DistributedConfig(), environ={}) is False  # one process: nothing to do
    # A `salloc -n 2` shell is one process: SLURM_NTASKS=2, but no srun step around it.
    salloc = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-2]"}
    assert initialize(DistributedConfig(), environ=salloc) is False
    srun = {**salloc, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]",
            "SLURM_STEP_NUM_TASKS": "2"}
    assert _cluster_launched(srun)  # each task of `srun -n 2`: JAX's SLURM detection applies
    assert not _cluster_launched({**srun, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"})
    assert _cluster_launched({"OMPI_COMM_WORLD_SIZE": "2"})
    # JAX_COORDINATOR_ADDRESS alone gives JAX no process count: it is the coordinator flag
    assert not _cluster_launched({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="--num-processes is missing"):
        initialize(DistributedConfig(), environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="--process-id is missing"):
        initialize(DistributedConfig(num_processes=2),
                   environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="--num-processes is missing"):
        initialize(DistributedConfig(coordinator_address="h:1", process_id=0), environ={})
    for address in ("localhost", "localhost:", ":8476", "h:port", "h:70000"):
        with pytest.raises(ValueError, match=f"coordinator_address: '{address}' is not "
                                             "HOST:PORT"):
            DistributedConfig(address, 2, 0)
    with pytest.raises(ValueError, match="cannot resolve 'bogus.invalid'"):  # the leader
        initialize(DistributedConfig("bogus.invalid:8476", 2, 0), environ={})


FAKE_NVIDIA_SMI = "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H200 (UUID: x$i)\"; done\n"
SHOW_GPUS = "#!/bin/sh\necho \"$9 CVD=${CUDA_VISIBLE_DEVICES-unset}\" >&2\n"


@pytest.mark.parametrize("n, visible, expected", [
    ("2", None, ["0 CVD=0,1", "1 CVD=2,3"]),
    ("2", "2,3", ["0 CVD=2", "1 CVD=3"]),  # only the GPUs the caller left visible
    ("3", "2,3", "2 GPUs (2 3) do not split into 3 processes evenly"),
    ("0", None, "N must be a whole number >= 1 (got '0')"),
    ("1.5", None, "N must be a whole number >= 1 (got '1.5')"),
])
def test_local_sh_splits_the_visible_gpus_and_checks_n(tmp_path, n, visible, expected):
    """A fake nvidia-smi with 4 GPUs and a fake jaxserve that prints its process id and GPUs."""
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("show", SHOW_GPUS)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    e = {**env(JAXSERVE=str(tmp_path / "show")), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        e["CUDA_VISIBLE_DEVICES"] = visible
    done = subprocess.run(["bash", str(LOCAL), n, "x.yaml"], env=e, capture_output=True,
                          text=True, timeout=60)
    if isinstance(expected, str):
        assert done.returncode == 2 and expected in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert sorted(line for line in done.stderr.splitlines() if "CVD=" in line) == expected


# A fake jaxserve: the leader ($9 is the process id) exits at once; a follower 3 s later,
# or at once on SIGTERM, with 5 either way.
LEADER_FIRST = ("#!/bin/bash\nif [ \"$9\" = 1 ]; then trap 'exit 5' TERM; sleep 3 & wait; "
                "exit 5; fi\nexit 0\n")


@pytest.mark.parametrize("group", [False, True], ids=["local.sh", "its process group"])
def test_local_sh_waits_out_a_signal_for_each_process_s_own_code(tmp_path, group):
    """SIGTERM while local.sh waits for a follower (to local.sh alone, or to its whole
    process group as systemd or a terminal sends it): each process's own code is recorded,
    once it exits (`wait` returned 143 at once, and -1 when asked again)."""
    fake = tmp_path / "fake"
    fake.write_text(LEADER_FIRST)
    fake.chmod(0o755)
    e = {**env(JAXSERVE=str(fake)), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    started = time.monotonic()
    group_ = subprocess.Popen(["bash", str(LOCAL), "2", "x.yaml"], env=e, text=True,
                              stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(1.0)
    if group:
        os.killpg(group_.pid, signal.SIGTERM)
    else:
        group_.send_signal(signal.SIGTERM)
    _, err = group_.communicate(timeout=30)
    assert group_.returncode == 5, err
    assert "local.sh: process 1 exited with 5" in err and "143" not in err
    assert group or time.monotonic() - started > 2.5


def test_an_error_only_the_leader_sees_ends_it_at_once(config_file):
    """The leader's gRPC port is taken, which only the leader checks, after the processes
    met: it says so in one line and leaves at once, without JAX's shutdown barrier (which
    waited 300 s for a follower that waits for the leader); the follower leaves too."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        address = f"127.0.0.1:{free_port()}"
        procs = [subprocess.Popen([JAXSERVE, "serve", "--config", str(config_file), "--port",
                                   str(port), "--coordinator-address", address,
                                   "--num-processes", "2", "--process-id", str(i)],
                                  env=env(XLA_FLAGS="--xla_force_host_platform_device_count=3"),
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            _, err = procs[0].communicate(timeout=120)
            assert procs[0].returncode == 2, err
            assert err.strip().splitlines()[-1].startswith(
                f"jaxserve serve: error: server.port={port}: cannot listen on 127.0.0.1")
            procs[1].communicate(timeout=120)
            assert procs[1].returncode != 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()


def test_processes_with_different_numbers_of_devices_both_refuse(config_file):
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([JAXSERVE, "serve", "--config", str(config_file), "--port", "0",
                               "--coordinator-address", address, "--num-processes", "2",
                               "--process-id", str(i)],
                              env=env(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"),
                              stderr=subprocess.PIPE, text=True)
             for i, n in enumerate((3, 2))]
    for p, n in zip(procs, (3, 2), strict=True):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            f"jaxserve serve: error: the processes hold different numbers of devices (this "
            f"one {n}, 5 in all over 2 processes); give each the same number")

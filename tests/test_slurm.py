"""The sbatch scripts of slurm/ against a real SLURM: a one-node cluster started for the test.

Skipped unless slurmctld, slurmd, sbatch and munged are installed (Debian: slurm-wlm, munge;
.ci/run installs them). The cluster lives in a temporary folder: munge with a fresh key, a
generated slurm.conf naming this machine with its CPUs and memory, state, spool, pid and log
files beside it, free ports; every daemon it starts is stopped, by pid, at the end.

From a fresh copy of the repository (the files git knows), the test submits the project's own
scripts as a user would, with a small sweep taken from the environment: a spiral phase sweep
(2 x 2 cells, 2 seeds, 3 shards) whose shard 1 is cut by its time limit and resubmitted alone,
merged by a job that depends on the array, and a run_cifar.py digits sweep (2 shards); each
merged result must equal the same sweep run unsharded, bit for bit.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")
MISSING = [d for d in DAEMONS if shutil.which(d) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"SLURM is not installed here (no {', '.join(MISSING)}): apt install slurm-wlm munge",
)
START_WAIT = 60  # seconds for the node to come up
JOB_WAIT = 600  # seconds for a job to end
POLL = 1.0  # seconds between looks at the queue
MEMORY_SHARE = 0.8  # of the machine's memory given to the node

# The spiral sweep: shard 1 runs past its time limit's warning (the script's --signal), which
# SLURM sends at its first periodic check of time limits, at most about 30 s after the start.
SPIRAL = dict(WIDTH="100", STEPS="300000", A="1,20", T="100,200", SEEDS="2", SEED_BLOCK="1",
              SHARDS="3", OUT="runs/slurm-phase")  # fmt: skip
CIFAR = dict(DATA="digits", EPOCHS="3", A="1,20", T="10", SEEDS="2", SHARDS="2", DEVICE="cpu",
             OUT="runs/slurm-cifar")  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OneNodeCluster:
    """munged, slurmctld and slurmd on this machine, configured in ``folder``."""

    def __init__(self, folder):
        self.dir = Path(folder)
        self.procs, self.munged_pid = [], None
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))

    def start(self):
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(mode=0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = d / "munge" / "socket"
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={d / 'munge' / 'pid'}", f"--log-file={d / 'munge' / 'log'}",
             f"--seed-file={d / 'munge' / 'seed'}"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self.munged_pid = int((d / "munge" / "pid").read_text())
        host = socket.gethostname().split(".")[0]
        memory = int(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * MEMORY_SHARE
        )
        conf = f"""ClusterName=dynloss-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "log" / "slurmctld.log"}
SlurmdLogFile={d / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=3600
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        (d / "slurm.conf").write_text(conf)
        for daemon in ("slurmctld", "slurmd"):
            log = open(d / "log" / f"{daemon}.out", "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(d / "slurm.conf")],
                                               stdout=log, stderr=log, env=self.env))  # fmt: skip
        deadline = time.time() + START_WAIT
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return self
            time.sleep(POLL)
        raise RuntimeError(f"the test cluster did not come up: {self.logs()}")

    def run(self, argv, check=True, **kw):
        return subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=60, **kw)  # fmt: skip

    def sbatch(self, args, cwd, env):
        r = self.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **env})
        return r.stdout.strip().split(";")[0]

    def wait(self, *jobs):
        deadline = time.time() + JOB_WAIT
        while time.time() < deadline:
            r = self.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], check=False)
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(POLL)
        raise TimeoutError(f"jobs {jobs} still queued or running: {self.logs()}")

    def states(self, job):
        """{array task (or job id): (state, exit code)} of a finished job."""
        out = self.run(["scontrol", "show", "job", "-o", job]).stdout
        found = {}
        for line in out.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            found[f.get("ArrayTaskId", f["JobId"])] = (f["JobState"], f["ExitCode"])
        return found

    def logs(self):
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.dir / "log").glob("*")))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster():
    folder = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")  # short: munge's socket path
    c = OneNodeCluster(folder)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(folder, ignore_errors=True)


def fresh_copy(dest):
    """The repository as a fresh clone holds it: the files git knows (committed or not)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def merged(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_sbatch_scripts_run_a_sweep_cut_by_a_time_limit_and_resubmitted(cluster, tmp_path):
    repo = fresh_copy(tmp_path / "clone")
    out = repo / SPIRAL["OUT"]
    script = "slurm/spiral_phase.sbatch"
    one_cpu = ["--cpus-per-task=1"]  # two tasks at once on a two-core node
    first = cluster.sbatch([*one_cpu, "--array=0,2", script], repo, SPIRAL)
    cut = cluster.sbatch([*one_cpu, "--array=1", "--time=1", script], repo, SPIRAL)
    cluster.wait(first, cut)
    assert {s for s, _ in cluster.states(first).values()} == {"COMPLETED"}, cluster.logs()
    ((state, code),) = cluster.states(cut).values()
    assert state in ("FAILED", "TIMEOUT") and code.startswith("143"), (state, code)
    log = (repo / f"dynloss-phase-{cut}_1.out").read_text()
    assert "interrupted by SIGTERM" in log and "Traceback" not in log, log
    refused = subprocess.run([sys.executable, "run_spiral.py", "merge", "--out", SPIRAL["OUT"]],
                             cwd=repo, capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "shard(s) 1 of 3" in refused.stderr, refused.stderr
    again = cluster.sbatch([*one_cpu, "--array=1", script], repo, SPIRAL)  # resubmitted alone
    merge = cluster.sbatch([f"--dependency=afterok:{again}", "--wrap",
                            f"python run_spiral.py merge --out {SPIRAL['OUT']}"], repo, {})  # fmt: skip
    cluster.wait(again, merge)
    assert {s for s, _ in cluster.states(again).values()} == {"COMPLETED"}, cluster.logs()
    assert {s for s, _ in cluster.states(merge).values()} == {"COMPLETED"}, cluster.logs()
    assert not list((out / "work").glob("batch-*"))  # the continued batch's checkpoint is gone
    whole = ["phase", "--width", SPIRAL["WIDTH"], "--A", SPIRAL["A"], "--T", SPIRAL["T"],
             "--steps", SPIRAL["STEPS"], "--seeds", SPIRAL["SEEDS"], "--seed-block",
             SPIRAL["SEED_BLOCK"], "--out", "runs/whole", "--quiet"]  # fmt: skip
    subprocess.run([sys.executable, "run_spiral.py", *whole], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip
    assert_same(merged(out / "phase.npz"), merged(repo / "runs/whole/phase.npz"))


def test_the_cifar_sbatch_script_runs_a_digits_sweep_on_cpus(cluster, tmp_path):
    repo = fresh_copy(tmp_path / "clone")
    script = "slurm/cifar_phase.sbatch"
    job = cluster.sbatch(["--array=0-1", "--gres=none", "--cpus-per-task=1", script], repo, CIFAR)
    cluster.wait(job)
    assert {s for s, _ in cluster.states(job).values()} == {"COMPLETED"}, cluster.logs()
    subprocess.run([sys.executable, "run_cifar.py", "merge", "--out", CIFAR["OUT"]], cwd=repo,
                   check=True, capture_output=True)  # fmt: skip
    whole = ["phase", "--data", "digits", "--epochs", CIFAR["EPOCHS"], "--A", CIFAR["A"], "--T",
             CIFAR["T"], "--seeds", CIFAR["SEEDS"], "--device", "cpu", "--out", "runs/whole",
             "--quiet"]  # fmt: skip
    subprocess.run([sys.executable, "run_cifar.py", *whole], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip
    assert_same(merged(repo / CIFAR["OUT"] / "phase.npz"), merged(repo / "runs/whole/phase.npz"))

#!/usr/bin/env python3
"""The job under random faults: a dVAE stage with the sample ledger on
(`run.ledger = true`), its coordinator alone on one host (`dalle launch
--nproc 0`) and a `dalle worker` on each of three others, every host a
network namespace wired to one bridge (as tests/support/hosts.rs makes
them). For DURATION seconds after the first committed checkpoint, one fault
every 8 to 16 s: a worker of the group SIGKILLed, or SIGSTOPped for 6 s
(dropped meanwhile, it comes back on its own); once, about halfway, the
coordinator SIGKILLed and started again with the same command (it takes the
job over from <run.dir>/coordinator-state.json); once, a worker host's link
cut for 6 s. This script is the node agent: a worker that exits is started
again on its host after 1 s.

Then the same job runs uninterrupted (`dalle launch --nproc 2`), and a
Markdown table comes out: per fault, the step it hit, the newest committed
checkpoint then, the step the group resumed from, the time until it
re-formed, the steps trained again and the time lost; then the totals. The
script fails (exit 1), saying why, unless after every fault training went
on from a committed checkpoint, every step as last trained had exactly the
samples of the uninterrupted run (none lost, none twice), and every
checkpoint ever seen committed is still there at the end.

Needs root for the namespaces. Without them every host is 127.0.0.1
(distinct ports) and the link cut is left out, loudly.

    scripts/bench/chaos.py DALLE DURATION [SEED] [STEPS]

SEED (default 1) drives every random choice, so that a run can be repeated.
STEPS (default: enough for DURATION at about 20 steps/s, at least 600)
must outlast the fault window, or the run fails saying so.
"""
import collections
import dataclasses
import datetime
import http.client
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional, Set, Tuple

# The job.
BATCH = 6  # global batch: 3 per worker in a group of 2, 2 in one of 3
EVERY = 20  # a checkpoint every this many steps
WORKERS = 3  # on hosts 1..3; the coordinator is on host 0
MIN_WORKERS, MAX_WORKERS = 2, 3
HEARTBEAT_SECS = 3
PROGRESS_SECS = 20
GRACE_SECS = 120  # how long workers keep trying a coordinator that is gone
# Every fault costs a re-formation: the budget must never end the job.
MAX_RESTARTS = 1000
ESTIMATED_STEPS_PER_SEC = 20  # only to size the job to the fault window

# The faults.
GAP_SECS = (8, 16)  # between two faults
PAUSE_SECS = 6  # how long a SIGSTOP or a link cut lasts: twice the heartbeat timeout
RESTART_AFTER_SECS = 1  # the agent starts an exited worker again after this

# Patience.
START_TIMEOUT = 60
FIRST_CHECKPOINT_TIMEOUT = 300
READY_TIMEOUT = 300
JOB_TIMEOUT = 30 * 60
POLL_SECS = 0.1

# Host i is SUBNET.(i + 1), as in tests/support/hosts.rs (whose tests use
# 10.201.0; each set of hosts has a bridge of its own anyway).
SUBNET = "10.202.0"
COORDINATOR_PORT, STATUS_PORT, RING_PORT = 7200, 7201, 7300

# What is read from the project's output, and where it is written:
# crates/cli/src/launch/mod.rs, `tracing::info!(..., "job started")`
JOB_STARTED = "job started"
# crates/runtime/src/coordinator/state.rs, State::take_over
TAKING_OVER = "taking over the job"
# crates/runtime/src/coordinator/state.rs, State::form
FORMED = re.compile(r"generation (\d+) formed: (\d+) worker\(s\)")
# crates/cli/src/worker.rs, `tracing::info!(rank, world, generation, backend, "joined the job")`
JOINED = "joined the job"
GENERATION_FIELD = re.compile(r"\bgeneration=(\d+)")
# crates/cli/src/stages.rs, `tracing::info!(rank, world, stage, "stage starts")`
STAGE_STARTS = "stage starts"
DVAE_FIELD = re.compile(r"\bstage=dvae\b")
# crates/train/src/checkpointing.rs,
# `tracing::info!(stage, step, url, "resuming from a checkpoint")`
RESUMING = "resuming from a checkpoint"
STEP_FIELD = re.compile(r"\bstep=(\d+)")
# crates/train/src/metrics.rs ("step {} | loss ..."), logged under the
# target dalle_train::dvae with a rank field by crates/train/src/stage_run.rs
DVAE_TARGET = "dalle_train::dvae"
LOSS_STEP = re.compile(r"\bstep (\d+) \| loss\b")
RANK_0 = re.compile(r"\brank=0\b")
# tracing-subscriber's default timestamps (UTC); failover.py reads the same.
STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# GET a URL from inside a namespace (the status page listens on host 0,
# which this script's own namespace cannot reach).
FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())")


class Failed(Exception):
    """The run cannot go on, or a check failed: the message says why."""


def say(message):
    print(f"chaos: {message}", file=sys.stderr, flush=True)


def stamp(line) -> Optional[float]:
    """A log line's time (Unix seconds), or None."""
    found = STAMP.search(line)
    if not found:
        return None
    whole = datetime.datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S")
    whole = whole.replace(tzinfo=datetime.timezone.utc).timestamp()
    return whole + float(found.group(2) or 0)


def lines(path) -> List[str]:
    """A file's lines, without colour codes (logs are plain with NO_COLOR,
    but a line forwarded from elsewhere may not be)."""
    with open(path, errors="replace") as f:
        return ANSI.sub("", f.read()).splitlines()


def free_ports(count) -> List[int]:
    """`count` distinct ports free now on loopback (all held open until all
    are chosen, so that none comes twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ip(*args):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class Hosts:
    """Hosts with addresses of their own: network namespaces, each wired by
    a veth pair to one bridge in a "switch" namespace, so that a host's
    link can be cut without closing its sockets (its peers see silence,
    never a reset). Where namespaces cannot be made, every host is
    127.0.0.1, told apart by its ports, and no link can be cut."""

    def __init__(self, count):
        tag = str(os.getpid() % 100_000)
        self.switch = f"dcsw{tag}"
        self.names = [f"dch{i}n{tag}" for i in range(count)]
        self.made: List[str] = []
        self.why_not = None
        try:
            self._build()
        except (OSError, RuntimeError) as e:
            self.why_not = str(e)
            self.delete()
        self.netns = self.why_not is None
        if self.netns:
            self.ports = (COORDINATOR_PORT, STATUS_PORT,
                          [RING_PORT + i for i in range(count)])
        else:
            coordinator, status, *ring = free_ports(count + 2)
            self.ports = (coordinator, status, ring)

    def _build(self):
        ip("netns", "add", self.switch)
        self.made.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ip("netns", "add", name)
            self.made.append(name)
            inside, outside = f"e{i}", f"p{i}"
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "add", inside, "type", "veth", "peer", "name", outside,
               "netns", self.switch)
            ip("-n", self.switch, "link", "set", outside, "master", "br0")
            ip("-n", self.switch, "link", "set", outside, "up")
            ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", inside)
            ip("-n", name, "link", "set", inside, "up")

    def delete(self):
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made = []

    def address(self, i) -> str:
        return f"{SUBNET}.{i + 1}" if self.why_not is None else "127.0.0.1"

    def command(self, i, argv) -> List[str]:
        """`argv` run on host `i`."""
        return ["ip", "netns", "exec", self.names[i], *argv] if self.netns else list(argv)

    def cut(self, i):
        """Host `i`'s switch port goes down: its packets are dropped."""
        ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def mend(self, i):
        ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def get(self, url) -> Optional[str]:
        """GET `url` from host 0; None when nothing answers."""
        if self.netns:
            try:
                done = subprocess.run(self.command(0, [sys.executable, "-c", FETCH, url]),
                                      capture_output=True, text=True, timeout=5)
            except subprocess.TimeoutExpired:
                return None
            return done.stdout if done.returncode == 0 else None
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.read().decode()
        except (OSError, http.client.HTTPException):
            return None


def job_toml(run_dir, data_dir, steps, threads) -> str:
    """The tests' tiny job (tests/support/launch.rs, tiny_job) with the dVAE
    stage alone, the ledger on and every checkpoint kept."""
    # Retention keeps them all, so that "no committed checkpoint was lost"
    # can be checked at the end.
    keep_last = max(1000, steps // EVERY + 1)
    return f'''
[run]
dir = "{run_dir}"
device = "cpu"
verify_every = 5
stages = ["dvae"]
ledger = true
# The same in both runs (launch --nproc N would otherwise split the cores
# N ways, and --nproc 0 leave every worker all of them).
threads = {threads}

[synth]
count = 256
image_size = 16
rows_per_file = 64
rows_per_group = 16

[data]
url = "{data_dir}"
decode_threads = 1

[dvae.model]
image_size = 16
n_hid = 8
n_blk_per_group = 1
vocab_size = 16
n_init = 8

[dvae.train]
steps = {steps}
batch_size = {BATCH}
log_every = 5
save_every = 0

[text]
vocab_size = 300
text_len = 24

[gpt.model]
dim = 32
depth = 1
heads = 2
attention = "dense"

[gpt.train]
steps = 10
batch_size = 8
log_every = 5
save_every = 0

[checkpoint]
every = {EVERY}
keep_last = {keep_last}
'''


def committed_steps(run_dir) -> Set[int]:
    """The steps of the run's committed dVAE checkpoints: one exists once its
    manifest.json does (README, "Checkpoints")."""
    root = os.path.join(run_dir, "checkpoints", "dvae")
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return set()
    steps = set()
    for name in names:
        if name.startswith("step-") and os.path.isfile(os.path.join(root, name, "manifest.json")):
            try:
                steps.add(int(name[len("step-"):]))
            except ValueError:
                pass
    return steps


@dataclasses.dataclass
class Status:
    """What /metrics says (crates/runtime/src/coordinator/status.rs,
    render_metrics)."""
    phase: Optional[str]
    generation: int
    step: Optional[int]  # absent until every member of the group reported one


def parse_metrics(text) -> Status:
    phase = re.search(r'^dalle_job_phase\{phase="(\w+)"\} 1(?:\.0)?$', text, re.M)
    generation = re.search(r"^dalle_generation (\S+)$", text, re.M)
    step = re.search(r"^dalle_step (\S+)$", text, re.M)
    return Status(
        phase=phase.group(1) if phase else None,
        generation=int(float(generation.group(1))) if generation else 0,
        step=int(float(step.group(1))) if step else None,
    )


def describe_exit(code) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"


class Cluster:
    """The job's processes on their hosts: the coordinator on host 0 and a
    worker on each of hosts 1..WORKERS. Like a node agent (what `dalle
    launch` does for its local workers), it starts a worker that exits
    with a failure again on its host, while the job lasts."""

    def __init__(self, dalle, hosts, config, run_dir, logs):
        self.dalle, self.hosts, self.config, self.run_dir, self.logs = (
            dalle, hosts, config, run_dir, logs)
        self.env = dict(os.environ, NO_COLOR="1", RUST_LOG="info",
                        DALLE_JOB_TOKEN=secrets.token_hex(16))
        coordinator_port, status_port, self.ring_ports = hosts.ports
        self.listen = f"{hosts.address(0)}:{coordinator_port}"
        self.status_url = f"http://{hosts.address(0)}:{status_port}"
        self.status_listen = f"{hosts.address(0)}:{status_port}"
        self.coordinator: Optional[subprocess.Popen] = None
        self.coordinator_logs: List[str] = []
        self.workers: Dict[int, subprocess.Popen] = {}
        self.gone_since: Dict[int, float] = {}
        self.worker_logs: List[str] = []
        self.agent_restarts = 0
        self.restarting = True
        # Every checkpoint step seen committed at any time during the run.
        self.seen: Set[int] = set()
        self.last_look = 0.0

    def _spawn(self, host, argv, name) -> subprocess.Popen:
        path = os.path.join(self.logs, name)
        with open(path, "w") as log:
            return subprocess.Popen(self.hosts.command(host, argv), stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env)

    def start_coordinator(self):
        argv = [self.dalle, "--config", self.config, "launch", "--nproc", "0",
                "--min-workers", str(MIN_WORKERS), "--max-workers", str(MAX_WORKERS),
                "--listen", self.listen, "--status", self.status_listen,
                "--heartbeat-timeout-secs", str(HEARTBEAT_SECS),
                "--progress-timeout-secs", str(PROGRESS_SECS),
                "--max-restarts", str(MAX_RESTARTS)]
        name = f"coordinator-{len(self.coordinator_logs) + 1}.log"
        self.coordinator = self._spawn(0, argv, name)
        self.coordinator_logs.append(os.path.join(self.logs, name))

    def start_worker(self, host):
        address = self.hosts.address(host)
        argv = [self.dalle, "--config", self.config, "worker",
                "--coordinator", f"http://{self.listen}", "--slot", "cpu:0",
                "--advertise", address, "--listen", f"{address}:{self.ring_ports[host]}",
                "--coordinator-grace-secs", str(GRACE_SECS)]
        name = f"worker-host{host}-{len(self.worker_logs) + 1}.log"
        self.workers[host] = self._spawn(host, argv, name)
        self.worker_logs.append(os.path.join(self.logs, name))
        self.gone_since.pop(host, None)

    def coordinator_running(self) -> bool:
        return self.coordinator is not None and self.coordinator.poll() is None

    def alive(self, host) -> bool:
        return host in self.workers and self.workers[host].poll() is None

    def tick(self):
        """The agent's round: a worker that failed is started again after
        RESTART_AFTER_SECS; checkpoints are looked at once a second."""
        now = time.time()
        for host, worker in list(self.workers.items()):
            code = worker.poll()
            if code is None:
                continue
            if host not in self.gone_since:
                self.gone_since[host] = now
                say(f"worker on host {host} (pid {worker.pid}) exited: {describe_exit(code)}")
            due = now - self.gone_since[host] >= RESTART_AFTER_SECS
            if self.restarting and code != 0 and due:
                self.start_worker(host)
                self.agent_restarts += 1
                say(f"started the worker on host {host} again (pid {self.workers[host].pid})")
        if now - self.last_look >= 1:
            self.look_at_checkpoints()

    def look_at_checkpoints(self) -> Set[int]:
        self.last_look = time.time()
        steps = committed_steps(self.run_dir)
        self.seen |= steps
        return steps

    def idle(self, seconds):
        """Sleeps `seconds`, doing the agent's rounds meanwhile."""
        until = time.time() + seconds
        while True:
            self.tick()
            left = until - time.time()
            if left <= 0:
                return
            time.sleep(min(POLL_SECS, left))

    def wait_for(self, what, timeout, ready):
        deadline = time.time() + timeout
        while not ready():
            if not self.coordinator_running():
                raise Failed(f"the coordinator exited ({describe_exit(self.coordinator.poll())}) "
                             f"while waiting for {what}; see {self.coordinator_logs[-1]}")
            if time.time() > deadline:
                raise Failed(f"no {what} within {timeout} s; logs under {self.logs}")
            self.idle(0.25)

    def status(self) -> Optional[Status]:
        text = self.hosts.get(f"{self.status_url}/metrics")
        return parse_metrics(text) if text else None

    def members(self) -> List[int]:
        """The hosts of the running group's active members, from the status
        page's worker table (crates/runtime/src/coordinator/status.rs,
        render_page): its state column is the fifth, and its last the data
        address, which each host's `--advertise` and `--listen` make its own."""
        page = self.hosts.get(f"{self.status_url}/") or ""
        by_address = {f"{self.hosts.address(h)}:{self.ring_ports[h]}": h
                      for h in range(1, WORKERS + 1)}
        hosts, in_table = [], False
        for line in page.splitlines():
            if line.startswith("rank "):
                in_table = True
                continue
            if in_table:
                cells = line.split()
                if not cells:
                    break
                if len(cells) >= 6 and cells[4] == "active" and cells[-1] in by_address:
                    hosts.append(by_address[cells[-1]])
        return sorted(hosts)

    def kill_everything(self):
        processes = list(self.workers.values())
        if self.coordinator is not None:
            processes.append(self.coordinator)
        for p in processes:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()


@dataclasses.dataclass
class Formation:
    """A group formed (a coordinator's "generation N formed" line) and what
    its workers' logs say of it."""
    at: float
    generation: int
    world: int
    started: bool = False  # some member started the dVAE stage
    resumes: Set[int] = dataclasses.field(default_factory=set)
    resume: Optional[int] = None  # the step it trained from


@dataclasses.dataclass
class Fault:
    kind: str  # "kill", "stop", "coordinator" or "cut"
    host: int  # the worker host hit; 0 for the coordinator
    at: float  # when it was injected (Unix seconds)
    into: float  # seconds into the fault window
    step: int  # the job's step then (/metrics)
    generation: int  # the group's generation then
    committed: int  # the newest committed checkpoint then
    # From the logs, afterwards: the first group that trained after it.
    formed: Optional[Formation] = None
    reformed_after: float = float("nan")
    redone: int = 0
    lost: float = float("nan")

    def label(self) -> str:
        return {
            "kill": f"SIGKILL worker (host {self.host})",
            "stop": f"SIGSTOP worker {PAUSE_SECS} s (host {self.host})",
            "coordinator": "SIGKILL coordinator, started again",
            "cut": f"link of host {self.host} cut {PAUSE_SECS} s",
        }[self.kind]


def wait_until_training(cluster, last) -> Optional[Tuple[Status, List[int]]]:
    """Blocks until the group runs and trains again after fault `last` (None:
    before the first), so that faults do not pile up in one rendezvous:
    phase running, a newer generation than the one `last` hit, and every
    member past the checkpoint that was newest then. Returns the status and
    the live member hosts, or None once the coordinator has exited."""
    deadline = time.time() + READY_TIMEOUT
    while time.time() < deadline:
        if not cluster.coordinator_running():
            return None
        status = cluster.status()
        if status and status.phase == "running" and status.step is not None:
            fresh = last is None or (status.generation > last.generation
                                     and status.step > last.committed)
            live = [h for h in cluster.members() if cluster.alive(h)] if fresh else []
            if live:
                return status, live
        cluster.idle(0.25)
    after = f"the {last.label()} at step {last.step}" if last else "the first checkpoint"
    raise Failed(f"the group did not train again within {READY_TIMEOUT} s after {after}; "
                 f"logs under {cluster.logs}")


def inject(cluster, fault):
    if fault.kind == "coordinator":
        cluster.coordinator.kill()
        cluster.coordinator.wait()
        # The same command on the same run: it takes the job over.
        cluster.start_coordinator()
        return
    worker = cluster.workers[fault.host]
    if fault.kind == "kill":
        worker.send_signal(signal.SIGKILL)
    elif fault.kind == "stop":
        worker.send_signal(signal.SIGSTOP)
        try:
            cluster.idle(PAUSE_SECS)
        finally:
            worker.send_signal(signal.SIGCONT)
    elif fault.kind == "cut":
        cluster.hosts.cut(fault.host)
        try:
            cluster.idle(PAUSE_SECS)
        finally:
            cluster.hosts.mend(fault.host)


def fault_window(cluster, rng, duration) -> Tuple[List[Fault], List[str]]:
    """Injects faults for `duration` s (longer if the coordinator restart or
    the link cut is still due) and returns them, with the kinds that never
    came because the job ended first."""
    start = time.time()
    # The two faults that come once, and when (seconds into the window).
    cut_at = rng.uniform(0.1, 0.9) * duration  # drawn either way: the same seed, the same draws
    due = {"coordinator": duration / 2}
    if cluster.hosts.netns:
        due["cut"] = cut_at
    faults: List[Fault] = []
    last = None
    next_at = start + rng.uniform(*GAP_SECS)
    while next_at - start < duration or due:
        cluster.idle(max(0.0, next_at - time.time()))
        ready = wait_until_training(cluster, last)
        if ready is None:
            say("the coordinator exited during the fault window")
            break
        status, live = ready
        # Drawn in the same order every time, whatever the timing.
        kind_draw, host_draw, gap = rng.random(), rng.random(), rng.uniform(*GAP_SECS)
        into = time.time() - start
        kind = next((k for k, at in sorted(due.items(), key=lambda item: item[1]) if into >= at),
                    None)
        if kind:
            del due[kind]
        else:
            kind = "kill" if kind_draw < 0.5 else "stop"
        host = 0 if kind == "coordinator" else live[int(host_draw * len(live))]
        committed = cluster.look_at_checkpoints()
        fault = Fault(kind, host, time.time(), into, status.step, status.generation,
                      max(committed, default=0))
        say(f"{into:6.1f} s: {fault.label()} at step {fault.step} "
            f"(generation {fault.generation}, newest checkpoint {fault.committed})")
        inject(cluster, fault)
        faults.append(fault)
        last = fault
        next_at = fault.at + gap
    return faults, sorted(due)


def read_formations(coordinator_logs) -> List[Formation]:
    """Every group formed, from all the coordinators' logs, in time order."""
    found = []
    for path in coordinator_logs:
        for line in lines(path):
            matched, at = FORMED.search(line), stamp(line)
            if matched and at is not None:
                found.append(Formation(at, int(matched.group(1)), int(matched.group(2))))
    return sorted(found, key=lambda f: f.at)


def formation_of(formations, generation, at) -> Optional[Formation]:
    """The formation a worker that joined generation `generation` at `at`
    belongs to: the newest of that number by then. A second's slack, as the
    Join reply goes out just before the coordinator logs the formation; a
    number may come twice if a coordinator died before saving its state."""
    matches = [f for f in formations if f.generation == generation and f.at <= at + 1.0]
    return matches[-1] if matches else None


def read_worker_logs(formations, worker_logs) -> List[Tuple[float, int]]:
    """Marks the formations that started the dVAE stage and the step each
    resumed from, from the workers' logs (a worker's "joined the job" line
    opens its part in that generation); returns every logged training step
    with its time."""
    trained_steps = []
    for path in worker_logs:
        current = None
        for line in lines(path):
            at = stamp(line)
            if JOINED in line:
                generation = GENERATION_FIELD.search(line)
                current = (formation_of(formations, int(generation.group(1)), at)
                           if generation and at is not None else None)
            elif current and STAGE_STARTS in line and DVAE_FIELD.search(line):
                current.started = True
            elif current and RESUMING in line and DVAE_FIELD.search(line):
                step = STEP_FIELD.search(line)
                if step:
                    current.resumes.add(int(step.group(1)))
            loss = LOSS_STEP.search(line) if DVAE_TARGET in line else None
            if loss and at is not None:
                trained_steps.append((at, int(loss.group(1))))
    # Without a resume line a group started from step 0 (the job's first) or
    # trained nothing: all ranks load the checkpoint rank 0 picks, and one
    # that trained logged it.
    first = True
    for f in formations:
        if f.started:
            f.resume = min(f.resumes) if f.resumes else (0 if first else None)
            first = False
    return trained_steps


def explain(fault, formations, trained_steps, rate):
    """The fault's cost, from the logs: the first group that trained after
    it, the time until it formed, the steps trained again (the newest step
    trained before it formed, the step at the fault or a later one logged
    meanwhile, minus the step it resumed from) and the time lost."""
    fault.formed = next((f for f in formations if f.at > fault.at and f.resume is not None), None)
    if fault.formed is None:
        return
    fault.reformed_after = fault.formed.at - fault.at
    newest = max([fault.step] + [s for at, s in trained_steps
                                 if fault.at <= at <= fault.formed.at])
    fault.redone = max(0, newest - fault.formed.resume)
    fault.lost = fault.reformed_after + fault.redone / rate


@dataclasses.dataclass
class Entry:
    """One ledger line (crates/train/src/feed.rs, Ledger::record)."""
    rank: int
    world: int
    generation: Optional[int]  # absent in the lines of older builds
    keys: List[str]


# Each step's lines, rank files read one after the other, each in file order
# (a re-done step comes again, later in the file).
Ledger = Dict[int, List[Entry]]


def read_ledger(run_dir) -> Tuple[Ledger, int]:
    """The run's dVAE sample ledger (<run.dir>/ledger/dvae-rank-R.jsonl),
    and how many lines could not be read."""
    ledger: Ledger = collections.defaultdict(list)
    unreadable = 0
    folder = os.path.join(run_dir, "ledger")
    if not os.path.isdir(folder):
        raise Failed(f"no sample ledger at {folder}")
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("dvae-rank-") and name.endswith(".jsonl")):
            continue
        for line in lines(os.path.join(folder, name)):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
                generation = int(v["generation"]) if "generation" in v else None
                ledger[int(v["step"])].append(Entry(int(v["rank"]), int(v["world"]), generation,
                                                    [str(k) for k in v["keys"]]))
            except (ValueError, KeyError, TypeError):
                unreadable += 1
    return ledger, unreadable


def group_keys(entries, world, generation=None) -> Optional[List[str]]:
    """A step's keys as one whole group of `world` workers trained it (of
    `generation`, when given): each rank's last line, together, sorted;
    None when a rank's line is missing."""
    keys = []
    for rank in range(world):
        mine = [e for e in entries if e.rank == rank and e.world == world
                and (generation is None or e.generation == generation)]
        if not mine:
            return None
        keys += mine[-1].keys
    return sorted(keys)


def last_group(entries, step, formations) -> Tuple[Optional[int], Optional[int], str]:
    """The group that trained `step` last: (its generation or None, its
    size or None, what went wrong). Ledger lines carry the generation of
    the group that wrote them, and per step the highest counts (feed.rs);
    a process stopped and woken up late appends an old generation's line.
    Lines without one (an older build) leave the workers' logs to say: the
    last group (in time) that resumed from before `step` trained it last,
    since the job's last group trains to the end and one that stopped
    short of `step` was followed by one resuming from before it."""
    if all(e.generation is not None for e in entries):
        generation = max(e.generation for e in entries)
        worlds = {e.world for e in entries if e.generation == generation}
        if len(worlds) != 1:
            return None, None, f"generation {generation} wrote it with sizes {sorted(worlds)}"
        return generation, worlds.pop(), ""
    before = [f for f in formations if f.resume is not None and f.resume < step]
    if not before:
        return None, None, "no group trained it, according to the workers' logs"
    return None, before[-1].world, ""


def check_ledger(ledger, reference, formations, steps) -> Tuple[int, List[str]]:
    """Whether every step, as trained last, had exactly the samples of the
    uninterrupted run: none lost, none twice. Returns how many steps did,
    and what went wrong."""
    problems = []
    # A rank's slice of a step depends on (step, rank, world) alone: a step
    # re-done by a group of the same size saw the same samples again.
    for step, entries in sorted(ledger.items()):
        slices = collections.defaultdict(list)
        for e in entries:
            slices[(e.rank, e.world)].append(e.keys)
        for (rank, world), seen in sorted(slices.items()):
            if any(keys != seen[0] for keys in seen[1:]):
                problems.append(f"step {step} was trained more than once by rank {rank} of "
                                f"{world} worker(s), with different samples")
    identical = 0
    for step in range(1, steps + 1):
        entries = ledger.get(step, [])
        if not entries:
            problems.append(f"step {step} is not in the ledger")
            continue
        generation, world, why = last_group(entries, step, formations)
        got = group_keys(entries, world, generation) if world else None
        which = f"generation {generation}, " if generation is not None else ""
        if why:
            problems.append(f"step {step}: {why}")
        elif got is None:
            problems.append(f"step {step}: the group that trained it last ({which}{world} "
                            f"workers) lacks a rank's ledger line")
        elif got != reference[step]:
            problems.append(f"step {step}: trained last ({which}{world} workers) on other "
                            f"samples than in the uninterrupted run")
        else:
            identical += 1
    # Every earlier whole-group execution of a step, undone by a fault, had
    # the uninterrupted run's samples as well.
    for step, entries in sorted(ledger.items()):
        if not 1 <= step <= steps:
            problems.append(f"the ledger has step {step}, outside 1..{steps}")
            continue
        for world, generation in sorted({(e.world, e.generation) for e in entries},
                                        key=lambda wg: (wg[0], wg[1] or 0)):
            got = group_keys(entries, world, generation)
            if got is not None and got != reference[step]:
                problems.append(f"step {step}: a group of {world} trained it on other samples "
                                f"than the uninterrupted run")
    return identical, problems


def reference_keys(run_dir, steps) -> Dict[int, List[str]]:
    """Each step's sorted keys in the uninterrupted run (two workers)."""
    ledger, unreadable = read_ledger(run_dir)
    if unreadable:
        raise Failed(f"the uninterrupted run's ledger has {unreadable} unreadable line(s)")
    keys = {}
    for step in range(1, steps + 1):
        got = group_keys(ledger.get(step, []), 2)
        if got is None:
            raise Failed(f"the uninterrupted run's ledger lacks step {step} ({run_dir}/ledger)")
        keys[step] = got
    return keys


def run_reference(dalle, config, run_dir, log_path, env) -> Tuple[float, float]:
    """The same job uninterrupted, on loopback: its wall time and its
    training rate (steps/s, between rank 0's first and last loss lines)."""
    argv = [dalle, "--config", config, "--set", f"run.dir={run_dir}", "launch", "--nproc", "2"]
    started = time.time()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=JOB_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            raise Failed(f"the uninterrupted run took over {JOB_TIMEOUT} s; see {log_path}")
    wall = time.time() - started
    if code != 0:
        raise Failed(f"the uninterrupted run failed ({describe_exit(code)}); see {log_path}")
    points = []
    for line in lines(log_path):
        loss = LOSS_STEP.search(line) if DVAE_TARGET in line and RANK_0.search(line) else None
        at = stamp(line)
        if loss and at is not None:
            points.append((at, int(loss.group(1))))
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        raise Failed(f"no training rate in the uninterrupted run's log {log_path}")
    (t0, s0), (t1, s1) = points[0], points[-1]
    return wall, (s1 - s0) / (t1 - t0)


def cpus() -> int:
    """The CPUs this process may use (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in lines("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def print_report(duration, seed, steps, threads, hosts, faults, formations, cluster,
                 wall, reference_wall, rate, identical, unreadable, redone_total,
                 lost_checkpoints):
    kinds = collections.Counter(f.kind for f in faults)
    command = f"scripts/bench/chaos.sh {duration:g}" + (f" {seed}" if seed != 1 else "")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    print(f"## Surviving random faults (`{command}`)")
    print()
    print(f"Machine: {cpus()} CPUs (nproc), {cpu_model()}; run {today}.")
    print()
    print(f"Job: the tests' tiny dVAE (16 px images, n_hid 8), {steps} steps at global batch "
          f"{BATCH}, a checkpoint every {EVERY} steps (all kept), sample ledger on, "
          f"{threads} libtorch thread(s) per worker. A coordinator alone (`launch --nproc 0 "
          f"--min-workers {MIN_WORKERS} --max-workers {MAX_WORKERS} --heartbeat-timeout-secs "
          f"{HEARTBEAT_SECS} --progress-timeout-secs {PROGRESS_SECS}`) on host 0 and "
          f"{WORKERS} workers (`--coordinator-grace-secs {GRACE_SECS}`) on hosts 1-{WORKERS}, "
          + ("each host a network namespace on one bridge; "
             if hosts.netns else "all on 127.0.0.1; ")
          + f"a worker that exits is started again after {RESTART_AFTER_SECS} s. For "
          f"{duration:g} s after the first checkpoint, a fault every {GAP_SECS[0]}-{GAP_SECS[1]} "
          f"s (seed {seed}), each once the group trains again after the one before.")
    if not hosts.netns:
        print()
        print(f"**No link cut: network namespaces could not be made ({hosts.why_not}).**")
    print()
    print("| # | t (s) | fault | at step | committed then | resumed from | re-formed after (s) "
          "| steps redone | time lost (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, f in enumerate(faults, 1):
        if f.formed:
            after = f"{f.formed.resume} | {f.reformed_after:.2f} | {f.redone} | {f.lost:.2f}"
        else:  # no group trained after it (a check below fails)
            after = "— | — | — | —"
        print(f"| {i} | {f.into:.1f} | {f.label()} | {f.step} | {f.committed} | {after} |")
    lost = sum(f.lost for f in faults if f.formed)
    last_generation = max((f.generation for f in formations), default=1)
    print()
    print("| total | |")
    print("|---|---|")
    print(f"| faults | {len(faults)} ({kinds['kill']} SIGKILL, {kinds['stop']} SIGSTOP, "
          f"{kinds['coordinator']} coordinator restart, {kinds['cut']} link cut) |")
    print(f"| re-formations | {last_generation - 1} (last generation {last_generation}) |")
    print(f"| workers started again | {cluster.agent_restarts} |")
    print(f"| time lost, summed | {lost:.1f} s (re-forming + redone steps at "
          f"{rate:.1f} steps/s, the uninterrupted rate) |")
    print(f"| steps trained more than once (ledger) | {redone_total} |")
    print(f"| wall time | {wall:.1f} s vs {reference_wall:.1f} s uninterrupted (`launch --nproc "
          f"2`): {wall / reference_wall:.2f}x |")
    print(f"| checkpoints | {len(cluster.seen)} committed, {len(lost_checkpoints)} lost |")
    unread = f" ({unreadable} line(s) unreadable)" if unreadable else ""
    print(f"| ledger | {identical} steps identical to the uninterrupted run{unread} |")
    print()
    print("Time lost ≈ re-formed after + steps redone / uninterrupted steps/s; steps redone = "
          "the newest step trained before the group re-formed (for the coordinator, workers "
          "train on until its heartbeat timeout) minus the step resumed from.")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    dalle = os.path.abspath(sys.argv[1])
    duration = float(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    default_steps = max(600, ESTIMATED_STEPS_PER_SEC * duration)
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else int(-(-default_steps // EVERY) * EVERY)
    rng = random.Random(seed)
    threads = max(1, cpus() // WORKERS)
    work = tempfile.mkdtemp(prefix="dalle-chaos-")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    say(f"working in {work}")
    # A `kill` of this script still cleans up (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    hosts = Hosts(WORKERS + 1)
    if not hosts.netns:
        banner = "!" * 72
        for line in [banner, f"NO NETWORK NAMESPACES ({hosts.why_not}).",
                     "The link-cut fault is LEFT OUT; every host is 127.0.0.1 (distinct ports).",
                     "Run as root for the full set of faults.", banner]:
            say(line)
    cluster = None
    failures = []
    try:
        run_dir, data_dir = os.path.join(work, "run"), os.path.join(work, "data")
        config = os.path.join(work, "job.toml")
        with open(config, "w") as f:
            f.write(job_toml(run_dir, data_dir, steps, threads))
        base_env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
        base_env.pop("DALLE_JOB_TOKEN", None)
        synth_log = os.path.join(logs, "synth.log")
        with open(synth_log, "w") as log:
            code = subprocess.run([dalle, "--config", config, "data", "synth"], stdout=log,
                                  stderr=subprocess.STDOUT, env=base_env).returncode
        if code != 0:
            raise Failed(f"`dalle data synth` failed ({describe_exit(code)}); see {synth_log}")

        cluster = Cluster(dalle, hosts, config, run_dir, logs)
        started = time.time()
        cluster.start_coordinator()
        cluster.wait_for("\"job started\" line", START_TIMEOUT,
                         lambda: any(JOB_STARTED in l for l in lines(cluster.coordinator_logs[0])))
        for host in range(1, WORKERS + 1):
            cluster.start_worker(host)
        cluster.wait_for("committed checkpoint", FIRST_CHECKPOINT_TIMEOUT,
                         lambda: cluster.look_at_checkpoints())
        say(f"first checkpoint after {time.time() - started:.1f} s: {duration:g} s of faults")
        faults, never = fault_window(cluster, rng, duration)
        if never:
            failures.append(f"the job ended before these faults came: {', '.join(never)}; give "
                            f"it more steps (STEPS, now {steps})")

        say("faults over; waiting for the job to finish")
        deadline = time.time() + JOB_TIMEOUT
        while cluster.coordinator_running():
            if time.time() > deadline:
                raise Failed(f"the job did not finish within {JOB_TIMEOUT} s; "
                             f"see {cluster.coordinator_logs[-1]}")
            cluster.idle(0.5)
        wall = time.time() - started
        cluster.restarting = False
        code = cluster.coordinator.poll()
        if code != 0:
            raise Failed(f"the job failed ({describe_exit(code)}); "
                         f"see {cluster.coordinator_logs[-1]}")
        final = cluster.look_at_checkpoints()
        # Workers of the last group leave before the coordinator ends; any
        # still waiting to join is of no use now.
        cluster.idle(2)
        cluster.kill_everything()

        say(f"the job finished after {wall:.1f} s; now uninterrupted, for reference")
        reference_dir = os.path.join(work, "reference")
        reference_wall, rate = run_reference(dalle, config, reference_dir,
                                             os.path.join(logs, "reference.log"), base_env)

        formations = read_formations(cluster.coordinator_logs)
        trained_steps = read_worker_logs(formations, cluster.worker_logs)
        for fault in faults:
            explain(fault, formations, trained_steps, rate)

        # After every fault, training went on from a committed checkpoint.
        for fault in faults:
            if fault.formed is None:
                failures.append(f"no group trained after the {fault.label()} at step {fault.step}")
            elif fault.formed.resume not in cluster.seen:
                failures.append(f"after the {fault.label()} at step {fault.step}, the group "
                                f"resumed from step {fault.formed.resume}, never seen committed")
            elif len(fault.formed.resumes) > 1:
                failures.append(f"the ranks of generation {fault.formed.generation} resumed from "
                                f"different steps: {sorted(fault.formed.resumes)}")
        if any(f.kind == "coordinator" for f in faults) and len(cluster.coordinator_logs) > 1:
            if not any(TAKING_OVER in l for l in lines(cluster.coordinator_logs[1])):
                failures.append("the coordinator started again did not take the job over "
                                f"(no \"{TAKING_OVER}\" in {cluster.coordinator_logs[1]})")
        # No committed checkpoint was lost.
        lost = sorted(cluster.seen - final)
        if lost:
            failures.append(f"checkpoints seen committed are gone at the end: steps {lost}")
        if steps not in final:
            failures.append(f"the stage's final checkpoint (step {steps}) is not committed")
        # Every step's samples, as last trained, are the uninterrupted run's.
        ledger, unreadable = read_ledger(run_dir)
        if unreadable:
            say(f"{unreadable} ledger line(s) could not be read (appends of two processes "
                f"interleaved?); the steps they held are checked through the others")
        identical, problems = check_ledger(ledger, reference_keys(reference_dir, steps),
                                           formations, steps)
        failures += problems[:10]
        if len(problems) > 10:
            failures.append(f"... and {len(problems) - 10} more ledger problem(s)")
        # Rank 0 is in every group: its lines beyond one per step are re-done steps.
        redone_total = sum(max(0, sum(e.rank == 0 for e in entries) - 1)
                           for entries in ledger.values())

        print_report(duration, seed, steps, threads, hosts, faults, formations, cluster,
                     wall, reference_wall, rate, identical, unreadable, redone_total, lost)
    except Failed as e:
        failures.append(str(e))
    finally:
        if cluster is not None:
            cluster.kill_everything()
        hosts.delete()
    say(f"logs and runs under {work}")
    if failures:
        print()
        for failure in failures:
            print(f"FAILED: {failure}")
            say(f"FAILED: {failure}")
        sys.exit(1)
    say("every check passed")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What losing a worker costs: the demo's dVAE stage under `dalle launch
--nproc 2`, uninterrupted, then with one worker SIGKILLed and then one
SIGSTOPped (hung) at the same step, one after the other in one session.

For each failure it prints, from the coordinator's log and the status page:
how long until the coordinator knew (detection), until the group re-formed
and until training went on, the steps trained again (those after the last
checkpoint), and the wall time of the stage against the uninterrupted run.

    scripts/bench/failover.py DALLE [STEPS] [EVERY] [KILL_AT]
"""
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

dalle = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 400
every = int(sys.argv[3]) if len(sys.argv) > 3 else 100
kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else 250
timeout_secs = 5
work = tempfile.mkdtemp()
env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")


def stamp(line):
    text = line.split()[0].rstrip("Z")[:26]
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def first(lines, pattern):
    return next((l for l in lines if re.search(pattern, l)), None)


def run(name, failure):
    common = ["--set", f"run.dir={work}/{name}", "--set", f"data.url={work}/data",
              "--set", f"dvae.train.steps={steps}", "--set", f"checkpoint.every={every}"]
    config = f"{work}/{name}.toml"
    # The demo's config, with the dVAE stage alone in the plan.
    demo = open("configs/demo.toml").read()
    with open(config, "w") as f:
        f.write(demo.replace("[run]\n", '[run]\nstages = ["dvae"]\n', 1))
    log_path = f"{work}/{name}.log"
    started = time.time()
    with open(log_path, "w") as log:
        launch = subprocess.Popen(
            [dalle, "--config", config, *common, "launch", "--nproc", "2",
             "--min-workers", "1", "--heartbeat-timeout-secs", str(timeout_secs),
             "--status", "127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    status = None
    while status is None:
        time.sleep(0.05)
        with open(log_path) as f:
            line = first(f, "job started")
        if line:
            status = re.search(r"status=Some\(([^)]+)\)", line).group(1)
    failed_at = step_at_failure = None
    if failure:
        workers = open(f"/proc/{launch.pid}/task/{launch.pid}/children").read().split()
        while True:
            time.sleep(0.02)
            metrics = urllib.request.urlopen(f"http://{status}/metrics").read().decode()
            found = re.search(r"^dalle_step (\d+)", metrics, re.M)
            if found and int(found.group(1)) >= kill_at:
                break
        os.kill(int(workers[1]), failure)
        failed_at = time.time()
        step_at_failure = int(found.group(1))
    code = launch.wait()
    wall = time.time() - started
    if failure == signal.SIGSTOP:
        try:  # dalle launch kills it after the job, unless it is gone already
            os.kill(int(workers[1]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = open(log_path).read().splitlines()
    if code != 0:
        sys.exit(f"{name}: dalle launch failed, see {log_path}")
    result = {"wall": wall}
    if failure:
        detected = first(lines, r"missed its heartbeats|collective is broken|failed at step")
        formed = first(lines, r"generation 2 formed")
        resumed = first(lines, r"resuming from a checkpoint")
        after = [l for l in lines if "dalle_train::dvae" in l and "| loss" in l
                 and stamp(l) > stamp(formed)]
        resume_step = int(re.search(r"step=(\d+)", resumed).group(1))
        result.update(
            detection=stamp(detected) - failed_at,
            reformed=stamp(formed) - failed_at,
            first_log_after=stamp(after[0]) - failed_at if after else float("nan"),
            redone=step_at_failure - resume_step,
            step_at_failure=step_at_failure,
            resume_step=resume_step,
        )
    return result


subprocess.run([dalle, "--set", f"run.dir={work}/shared", "--set", f"data.url={work}/data",
                "data", "synth"], check=True, env=env, stdout=subprocess.DEVNULL)
reference = run("uninterrupted", None)
print(f"dVAE stage, {steps} steps, checkpoint every {every}, 2 workers "
      f"(the survivor goes on alone), heartbeat timeout {timeout_secs} s")
print(f"uninterrupted: {reference['wall']:.1f} s")
for name, sig in [("killed", signal.SIGKILL), ("hung", signal.SIGSTOP)]:
    r = run(name, sig)
    print(f"{name} at step {r['step_at_failure']}: detected after {r['detection']:.3f} s, "
          f"group re-formed after {r['reformed']:.3f} s, resumed from step {r['resume_step']} "
          f"({r['redone']} steps trained again), stage wall {r['wall']:.1f} s "
          f"({r['wall'] / reference['wall']:.2f}x the uninterrupted run)")

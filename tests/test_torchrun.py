"""The audit launched as several processes, end to end: torchrun with 2 processes against one
process (median and mean, uneven shards, unreadable images, .tar shards), bad input that stops
every process alike, and a run killed halfway then resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, make_images, write_shards
from tiny_encoder import YAML
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.results.result import AuditResult

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "audits").mkdir()
    (tmp_path / "audits" / "memaudit.yaml").write_text(YAML)
    return tmp_path


def environment(**extra):
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
                         "OMP_NUM_THREADS": "1"} | extra


def pytest_args(options):
    flags = [str(part) for name, value in options.items() for part in (f"--memaudit-{name}", value)]
    return ["-m", "pytest", "audits", "-p", "no:cacheprovider", "-q", "--memaudit-model", "tiny",
            "--memaudit-html", "none", *flags]


def torchrun(workdir, processes, options, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *pytest_args(options)]
    return subprocess.Popen(command, cwd=workdir, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finished(process):
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, output


def one_process(workdir, options):
    """The same audit in this process (one process: no launch), on one thread as the launched
    processes run (a busy machine keeps a thread pool waiting on these tiny tensors)."""
    spec = load_audit_file(workdir / "audits" / "memaudit.yaml").model_spec("tiny")
    values = {key.replace("-", "_"): str(value) if isinstance(value, Path) else value
              for key, value in options.items() if key not in ("json", "state-every")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_audit(make_settings(model="tiny", **values), spec)
    finally:
        torch.set_num_threads(threads)


def assert_same_audit(one: AuditResult, two: AuditResult):
    """Identical data points; UnitMem to 1e-5 relative and argmax for 99.9% of units (forward
    passes round differently with batch composition and threads), in every subject."""
    assert two.samples == one.samples and two.skipped == one.skipped and two.labels == one.labels
    subjects = [(one.layers, two.layers)] + ([(one.control.layers, two.control.layers)] if one.control else [])
    for layers_one, layers_two in subjects:
        for a, b in zip(layers_one, layers_two):
            np.testing.assert_allclose(b.values.unitmem, a.values.unitmem, rtol=1e-5, atol=1e-7, err_msg=a.name)
            assert np.mean(b.values.max_sample == a.values.max_sample) >= 0.999, a.name
    if one.planted:
        assert [u.plant for u in two.planted.units] == [u.plant for u in one.planted.units]
        np.testing.assert_allclose([u.unitmem for u in two.planted.units], [u.unitmem for u in one.planted.units],
                                   rtol=1e-5)


def test_two_processes_audit_as_one_median_with_holdout_and_skipped_images(workdir):
    members = make_images(workdir / "members", 13, size=16, seed=1)
    for broken in ("img_002.png", "img_011.png"):  # one in each process's shard
        (members / broken).write_bytes(b"not an image")
    held = make_images(workdir / "held", 6, size=16, seed=2)
    options = {"data": members, "holdout": held, "reduce": "median", "augmentations": 2, "batch-size": 6,
               "control": "random,planted", "planted-units": 2, "permutations": 200, "json": "two.json"}
    code, output = finished(torchrun(workdir, 2, options))
    assert code == 0, output
    two = AuditResult.from_json(json.loads((workdir / "two.json").read_text()))
    one = one_process(workdir, options)
    assert_same_audit(one, two)
    assert [s["id"] for s in two.skipped] == ["img_002.png", "img_011.png"]
    # shards of 9 and 10 positions, one unreadable image in each
    assert two.distributed == {"world_size": 2, "backend": "gloo", "shards": [8, 9]}
    assert one.distributed == {"world_size": 1, "backend": None, "shards": [17]}
    assert two.membership.member_share == pytest.approx(one.membership.member_share)
    assert output.count("memaudit summary") == 1 and output.count("results written") == 1  # process 0 alone


def test_two_processes_audit_tar_shards_as_one_mean(workdir):
    keys = [f"n{i:03d}" for i in range(12)]
    shards = write_shards(workdir / "shards", {"train-0.tar": keys[:7], "train-1.tar": keys[7:]}, broken={"n009"})
    options = {"data": shards, "reduce": "mean", "augmentations": 2, "batch-size": 4, "control": "random",
               "json": "two.json"}
    code, output = finished(torchrun(workdir, 2, options))
    assert code == 0, output
    two = AuditResult.from_json(json.loads((workdir / "two.json").read_text()))
    one = one_process(workdir, options)
    assert_same_audit(one, two)
    assert two.samples[0] == "train-0.tar/n000.png" and two.skipped[0]["id"] == "train-1.tar/n009.png"
    assert two.distributed["shards"] == [6, 5] and len(two.samples) == 11


def launch_by_hand(workdir, options_per_process, **extra_env):
    """Processes started as srun starts them (rank variables set, no torchrun), each with its own options."""
    port = str(free_port())
    processes = []
    for rank, options in enumerate(options_per_process):
        env = environment(RANK=str(rank), WORLD_SIZE=str(len(options_per_process)), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(len(options_per_process)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          **extra_env)
        processes.append(subprocess.Popen([sys.executable, *pytest_args(options)], cwd=workdir, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [finished(process) for process in processes]


def test_bad_input_on_one_process_stops_every_process_with_a_usage_error(workdir):
    base = {"data": "builtin", "samples": 5, "augmentations": 0, "control": "none", "dist-timeout": 60}
    outcomes = launch_by_hand(workdir, [base, base | {"data": workdir / "nowhere"}])
    assert [code for code, _ in outcomes] == [4, 4], outcomes
    assert "nowhere does not exist" in outcomes[1][1]
    assert "process 1: data directory" in outcomes[0][1] and "nowhere does not exist" in outcomes[0][1]


def test_a_process_that_dies_midway_is_named_by_the_others(workdir):
    options = {"data": "builtin", "samples": 12, "augmentations": 0, "batch-size": 1, "control": "none",
               "dist-timeout": 60}
    started = time.monotonic()
    (code0, output0), (code1, _) = launch_by_hand(workdir, [options, options], TINY_ENCODER_CRASH="1:4")
    assert code1 == 9 and code0 == 4, output0
    assert "process 0 lost the other processes while merging" in output0 and re.search(r"[Rr]anks? 1\b", output0)
    assert time.monotonic() - started < TIMEOUT_S


def descendants(pid):
    """The processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers in /proc")
def test_killed_audit_resumes_to_the_uninterrupted_figures(workdir):
    options = {"data": "builtin", "samples": 24, "augmentations": 2, "batch-size": 2, "control": "none",
               "reduce": "median", "state": workdir / "state", "state-every": 0, "json": "resumed.json"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *pytest_args(options)]
    slow = subprocess.Popen(command, cwd=workdir, env=environment(TINY_ENCODER_SLEEP="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshots = [workdir / "state" / f"process-{rank:05d}-of-00002.pt" for rank in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    while not all(path.exists() for path in snapshots) and time.monotonic() < deadline and slow.poll() is None:
        time.sleep(0.05)
    for pid in [*descendants(slow.pid), slow.pid]:  # the launcher and both processes, mid-stream
        os.kill(pid, signal.SIGKILL)
    slow.wait()
    done = [torch.load(path, weights_only=True)["payload"]["progress"]["done"] for path in snapshots]
    assert all(0 < d < 12 for d in done), done  # each of 12 data points per process: stopped halfway

    code, output = finished(subprocess.Popen(command, cwd=workdir, env=environment(), stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True))
    assert code == 0, output
    resumed = AuditResult.from_json(json.loads((workdir / "resumed.json").read_text()))
    assert any(f"{sum(done)} of 24 data points had been streamed before" in note for note in resumed.notes), (
        done, resumed.notes)
    assert_same_audit(one_process(workdir, options | {"state": None}), resumed)

    with pytest.raises(Exception, match="run by 2 processes; this one runs 1"):
        one_process(workdir, options)  # the snapshots belong to a 2-process audit

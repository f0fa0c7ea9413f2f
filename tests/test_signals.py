"""SIGTERM during an audit unwinds like Ctrl-C: the median's temporary files are removed."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import make_images
from pytest_memaudit.pipeline.signals import terminate_as_interrupt

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="needs POSIX signals")


def _maps_a_file_in(pid, folder):
    """Whether process ``pid`` maps a file in ``folder`` (the median's spill file: one without a name)."""
    with open(f"/proc/{pid}/maps") as maps:
        return f" {folder}/" in maps.read()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the spill file's mapping in /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_median_spill_files_never_outlive_the_audit(tmp_path, signum):
    """SIGTERM unwinds; kill -9 used to leave every spill file on disk (44 per run), none cleaned on resume."""
    spill = tmp_path / "tmp"
    spill.mkdir()
    (tmp_path / "audits").mkdir()
    (tmp_path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    command = [sys.executable, "-m", "pytest", "audits", "--memaudit-model", "demo", "--memaudit-control", "none",
               "--memaudit-data", "builtin", "--memaudit-samples", "5000", "--memaudit-image-size", "32",
               "--memaudit-augmentations", "0", "--memaudit-batch-size", "1", "--memaudit-reduce", "median",
               "--memaudit-median-memory", "0", "--memaudit-html", "none", "-p", "no:cacheprovider"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "TMPDIR": str(spill)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _maps_a_file_in(proc.pid, spill):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the audit never spilled to disk"
            time.sleep(0.01)
        assert list(spill.iterdir()) == []  # mapped, yet nameless from the start
        time.sleep(0.2)  # mid-run: a few more forward passes
        assert proc.poll() is None
        proc.send_signal(signum)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    if signum == signal.SIGTERM:
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
        assert "terminated by SIGTERM" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    assert list(spill.iterdir()) == []


def test_handler_is_restored_and_one_shot():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="terminated by SIGTERM"):
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is not before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal interrupts this
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_nothing_changes():
    seen = []

    def audit_in_a_thread():
        with terminate_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=audit_in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def _children(pid):
    """The pids of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the decoding workers in /proc")
@pytest.mark.parametrize("target", ["group", "worker"])
def test_sigterm_to_the_group_with_decoding_workers_and_a_killed_worker(tmp_path, target):
    """SIGTERM to the process group (as CI runners, Slurm and torchrun send it) while DataLoader workers
    decode: a clean interrupt (exit 2), not torch's 'worker killed' traceback (exit 1). A worker killed on
    its own (the out-of-memory killer) is named, not blamed on the model's forward pass (exit 4). Nothing of
    the run is left in the temporary folder (the workers' pymp-* folders were)."""
    make_images(tmp_path / "imgs", 600, size=32)
    (tmp_path / "audits").mkdir()
    (tmp_path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    command = [sys.executable, "-m", "pytest", "audits", "--memaudit-model", "demo", "--memaudit-control", "none",
               "--memaudit-data", "imgs", "--memaudit-image-size", "32", "--memaudit-augmentations", "0",
               "--memaudit-batch-size", "1", "--memaudit-workers", "2", "--memaudit-html", "none",
               "-p", "no:cacheprovider"]
    scratch = Path(tempfile.mkdtemp(dir="/tmp"))  # short: the workers' sockets go under it (a long TMPDIR: in /tmp)
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        deadline = time.monotonic() + 300
        while len(workers := _children(proc.pid)) < 2:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the audit never started its decoding workers"
            time.sleep(0.05)
        time.sleep(0.5)  # the workers decode
        assert proc.poll() is None
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(workers[0], signal.SIGKILL)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if target == "group":
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
        assert "terminated by SIGTERM" in output
    else:
        assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output[-3000:]
        assert (f"the image-decoding worker process {workers[0]} (a DataLoader worker of --memaudit-workers) was "
                "killed by signal Killed while the audit read") in output.replace("\n", "")
        assert "forward pass of" not in output
    assert "Traceback" not in output and "INTERNALERROR" not in output
    left = list(scratch.iterdir())
    shutil.rmtree(scratch)
    assert left == []  # no pymp-* folder of a worker's, no folder of the audit's

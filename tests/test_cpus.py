"""The CPUs an audit may use (affinity mask, cgroup v1/v2 quota) and the threads it sizes from them."""

import json

import pytest
import torch

import pytest_memaudit.pipeline.setup  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from pytest_memaudit.pipeline import hardware
from pytest_memaudit.pipeline.device import intra_op_threads

pytest_plugins = ["pytester"]


def fake_cgroups(tmp_path, proc_lines, files):
    """A /sys/fs/cgroup tree under tmp_path holding ``files`` ({relative path: text}), and a
    /proc/self/cgroup with ``proc_lines``."""
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return root, proc


@pytest.fixture
def cores(monkeypatch):
    """Pretend the affinity mask holds ``count`` CPUs."""
    def set_count(count):
        monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)
    return set_count


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path, cores):
    cores(64)
    root, proc = fake_cgroups(tmp_path, ["0::/kubepods/pod1/ctr"], {
        "cpu.max": "max 100000\n",  # the root: no limit
        "kubepods/pod1/cpu.max": "250000 100000\n",  # the pod: 2.5 CPUs
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",  # the container: no limit of its own
    })
    assert hardware.cgroup_cpu_quota(root, proc) == pytest.approx(2.5)
    cpus, why = hardware.usable_cpus(root, proc)
    assert cpus == 3  # 2.5 CPUs of time: 3 threads can use it, 64 would wait
    assert why == "3 CPU(s): the cgroup's CPU quota is 2.5 CPUs (affinity mask: 64)"
    (root / "kubepods/cpu.max").write_text("50000 100000\n")  # half a CPU above the pod
    assert hardware.usable_cpus(root, proc)[0] == 1


def test_cgroup_v1_quota_inside_a_container_reads_its_own_mount(tmp_path, cores):
    """A container's /proc/self/cgroup names the host's path; its own limit sits at the mount point."""
    cores(16)
    root, proc = fake_cgroups(tmp_path, ["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc", "1:name=systemd:/"], {
        "cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert hardware.usable_cpus(root, proc)[0] == 2
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert hardware.usable_cpus(root, proc) == (16, "16 CPU(s) in this process's affinity mask, no cgroup CPU quota")


def test_affinity_below_the_quota_and_unreadable_files(tmp_path, cores):
    cores(2)  # taskset -c 0,1 inside an 8-CPU container
    root, proc = fake_cgroups(tmp_path, ["0::/"], {"cpu.max": "800000 100000\n"})
    assert hardware.usable_cpus(root, proc) == (2, "2 CPU(s) in this process's affinity mask (cgroup CPU quota 8)")
    for text in ("garbage\n", "100000\n", "100000 0\n", ""):  # no quota can be read: the affinity mask
        (root / "cpu.max").write_text(text)
        assert hardware.cgroup_cpu_quota(root, proc) is None
    assert hardware.cgroup_cpu_quota(root, tmp_path / "missing") is None  # not Linux, or no /proc


@pytest.mark.parametrize("cpus, processes, current, environment, expected", [
    (2, 1, 64, {}, 2),  # a 2-CPU quota on a 64-core host: 2 threads, not 64
    (16, 4, 16, {}, 4),  # 4 processes of a launch share the 16 CPUs
    (16, 32, 16, {}, 1),  # at least one
    (16, 1, 8, {}, 8),  # torch's own choice (physical cores) below the CPUs: kept
    (2, 1, 64, {"OMP_NUM_THREADS": "6"}, 64),  # the user's (or torchrun's) choice: kept
])
def test_intra_op_threads(cpus, processes, current, environment, expected):
    threads, why = intra_op_threads(cpus, processes, current, environment)
    assert threads == expected
    assert ("OMP_NUM_THREADS=6" in why) == bool(environment)


def test_the_run_record_says_the_threads_and_workers(pytester, var_checkpoint, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pytest_memaudit.pipeline.setup, "usable_cpus", lambda: (1, "1 CPU(s): the cgroup's CPU quota is 0.5 CPUs"))
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = pytester.runpytest(
            "audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint), "--memaudit-data",
            "builtin", "--memaudit-samples", "3", "--memaudit-image-size", "32", "--memaudit-augmentations", "0",
            "--memaudit-control", "none", "--memaudit-device", "cpu", "-k", "conv.out", "--memaudit-json", "out.json",
            "-p", "no:cacheprovider")
        assert torch.get_num_threads() == 2  # put back after the audit
    finally:
        torch.set_num_threads(threads)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*views/s); 1 CPU thread(s), 0 decode worker(s)"])
    environment = json.loads((pytester.path / "out.json").read_text())["environment"]
    assert environment["cpu_threads"] == "1"
    assert environment["cpus"] == ("1 CPU(s): the cgroup's CPU quota is 0.5 CPUs; 1 intra-op thread(s): "
                                   "1 usable CPU(s) (torch would use 2)")
    report = (pytester.path / "memaudit-report" / "report.html").read_text()
    assert "<dt>cpu_threads</dt><dd>1</dd>" in report and "<dt>decode workers</dt><dd>0</dd>" in report


def test_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not hardware.passive_openmp_waits()  # the user's choice stays
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert not hardware.passive_openmp_waits()  # torch is imported here: too late to matter, so unchanged
    assert "OMP_WAIT_POLICY" not in hardware.os.environ
    monkeypatch.delitem(hardware.sys.modules, "torch")  # as before the audit's first torch import
    assert hardware.passive_openmp_waits()
    assert hardware.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"

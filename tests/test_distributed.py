"""Several processes, one audit: the exact median selection, the collective merge of layer states
with 2 and 3 gloo processes, the launch's environment and the per-process device."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import fair_argmax, free_port
from pytest_memaudit.pipeline.device import process_device
from pytest_memaudit.pipeline.distributed import Launch, World, join, launch_from_environment
from pytest_memaudit.errors import AuditError
from pytest_memaudit.metric.selection import float_keys, grouped_order_statistics, key_floats
from pytest_memaudit.metric.unitmem import HOLDOUT, MEMBER, PLANTED, LayerState

# --- the selection ----------------------------------------------------------------------------


def test_float_keys_sort_as_the_floats_and_invert():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-45, 1e-38, 2.0, np.nextafter(np.float32(2), 3), np.inf],
                      dtype=np.float32)
    keys = float_keys(values).astype(np.int64)
    assert np.all(np.diff(keys) > 0)
    assert key_floats(keys).tobytes() == values.tobytes()


def order_statistics_by_sorting(values, groups, n_groups, ranks):
    """Each target's ranked values, by sorting the target's rows in float64."""
    out = np.empty((n_groups + 1, ranks.shape[1], values.shape[1]))
    for target in range(n_groups + 1):
        keep = np.ones(len(values), dtype=bool) if target == 0 else groups != target - 1
        out[target] = np.sort(values[keep].astype(np.float64), axis=0)[ranks[target] - 1]
    return out


def selection_case(seed=0, rows=157, units=9, n_groups=5):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, units)).astype(np.float32)
    values[:, 1] = np.round(values[:, 1] * 2) / 2  # many ties
    values[:, 2] = 0.0  # a dead unit
    values[::7, 3] = np.inf
    groups = rng.integers(0, n_groups - 1, size=rows)  # the last group holds no rows
    sizes = np.array([rows] + [rows - np.count_nonzero(groups == g) for g in range(n_groups)])
    ranks = np.stack([np.ones_like(sizes), sizes // 2, (sizes + 1) // 2, sizes], axis=1)
    return values, groups, n_groups, ranks


def test_order_statistics_are_exact():
    values, groups, n_groups, ranks = selection_case()
    found = grouped_order_statistics(values, groups, n_groups, ranks)
    np.testing.assert_array_equal(found, order_statistics_by_sorting(values, groups, n_groups, ranks))


def run_as_processes(parts, n_groups, ranks):
    """The selection as ``len(parts)`` processes run it, each a thread with its rows, over an
    all-reduce that sums (or maxes) every thread's tensor."""
    barrier = threading.Barrier(len(parts))
    posted = [None] * len(parts)
    results = [None] * len(parts)

    def process(i):
        def all_reduce(tensor, op):
            posted[i] = tensor.clone()
            barrier.wait()
            total = torch.stack(posted).sum(0) if op == "sum" else torch.stack(posted).amax(0)
            barrier.wait()
            tensor.copy_(total)

        values, groups = parts[i]
        results[i] = grouped_order_statistics(values, groups, n_groups, ranks, all_reduce)

    threads = [threading.Thread(target=process, args=(i,)) for i in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_order_statistics_do_not_depend_on_the_split():
    values, groups, n_groups, ranks = selection_case(seed=1)
    owner = np.random.default_rng(3).choice(4, size=len(values), p=[0.1, 0.5, 0.4, 0.0])  # process 3 holds none
    parts = [(values[owner == p], groups[owner == p]) for p in range(4)]
    expected = order_statistics_by_sorting(values, groups, n_groups, ranks)
    for found in run_as_processes(parts, n_groups, ranks):
        np.testing.assert_array_equal(found, expected)


# --- the collective merge, 2 and 3 gloo processes ---------------------------------------------


def merge_case(processes):
    """A matrix with ties for the maximum across processes, labels, groups and an uneven,
    interleaved owner per row."""
    rng = np.random.default_rng(processes)
    n = 151
    matrix = rng.gamma(2.0, 1.0, size=(n, 23)).astype(np.float32)
    matrix[[10, 90, 140], 4] = 50.0  # a three-way tie for the max
    matrix[:, 6] = np.round(matrix[:, 6])  # ties for the median
    matrix[:, 8] = 0.0  # a dead unit
    labels = rng.choice([MEMBER, HOLDOUT, PLANTED], size=n, p=[0.6, 0.3, 0.1])
    groups = rng.integers(0, 10, size=n)
    weights = np.linspace(1, 3, processes)
    owner = rng.choice(processes, size=n, p=weights / weights.sum())
    return matrix, labels, groups, owner


def layer_states(matrix, labels, groups, rows, reduce):
    """Two layers' states (units split 15/8) fed ``rows`` in batches, as a stream feeds them."""
    states = []
    for columns in (slice(0, 15), slice(15, 23)):
        part = matrix[:, columns]
        state = LayerState(part.shape[1], groups=10, topk=4, keep_values=reduce == "median", capacity=len(rows))
        for batch in np.array_split(rows, max(1, len(rows) // 9)):
            state.update(torch.from_numpy(part[batch]), torch.from_numpy(batch), torch.from_numpy(labels[batch]),
                         torch.from_numpy(groups[batch]))
        states.append(state)
    return states


def figures(states, reduce):
    out = {}
    for i, state in enumerate(states):
        for read in [(MEMBER,), (MEMBER, PLANTED)]:
            values, leave_out = state.unitmem(read, reduce)
            out[(i, read)] = {"unitmem": values.unitmem, "leave_out": leave_out, "mu_rest": values.mu_rest,
                              "max_sample": values.max_sample, "top_samples": values.top_samples,
                              "top_values": values.top_values, "counts": state.counts.numpy().copy()}
    return out


def merge_worker(rank, size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    world = join(timeout_s=60)
    try:
        matrix, labels, groups, owner = merge_case(size)
        results = {}
        for reduce in ("mean", "median"):
            states = layer_states(matrix, labels, groups, np.flatnonzero(owner == rank), reduce)
            world.merge_states(states)
            results[reduce] = figures(states, reduce)
        problems = {}
        try:
            world.agree(ValueError("disk full") if rank == size - 1 else None, "testing")
        except Exception as exc:  # noqa: BLE001
            problems["agree"] = (type(exc).__name__, str(exc))
        try:
            world.agree_on({"settings": {"reduce": "mean", "seed": min(rank, 1)}, "data listing": "A"}, "what to audit")
        except AuditError as exc:
            problems["agree_on"] = str(exc)
        torch.save({"results": results, "problems": problems, "shard": list(world.shard(100))},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        world.close()


def spawn(function, size, *args, deadline_s=120):
    context = mp.start_processes(function, args=(size, *args), nprocs=size, join=False, start_method="spawn")
    stop = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > stop:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{size} processes did not finish within {deadline_s} s")


@pytest.mark.parametrize("size", [2, 3])
def test_collective_merge_equals_one_state(size, tmp_path):
    spawn(merge_worker, size, free_port(), str(tmp_path))
    saved = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(size)]
    matrix, labels, groups, _ = merge_case(size)
    for reduce in ("mean", "median"):
        whole = figures(layer_states(matrix, labels, groups, np.arange(len(matrix)), reduce), reduce)
        for rank, theirs in enumerate(saved):
            for key, expected in whole.items():
                got = theirs["results"][reduce][key]
                where = f"{reduce} rank {rank} layer {key[0]} labels {key[1]}"
                np.testing.assert_allclose(got["unitmem"], expected["unitmem"], rtol=1e-12, atol=1e-12, err_msg=where)
                np.testing.assert_allclose(got["leave_out"], expected["leave_out"], rtol=1e-12, atol=1e-12, err_msg=where)
                for exact in ("max_sample", "top_samples", "top_values", "counts"):
                    np.testing.assert_array_equal(got[exact], expected[exact], err_msg=f"{where}: {exact}")
        # and against the definition, in float64 (one maximum set aside, mean or median of the rest)
        members = np.isin(labels, [MEMBER])
        column = matrix[members].astype(np.float64)
        top = np.argmax(column, axis=0)
        rest = [np.delete(column[:, u], top[u]) for u in range(column.shape[1])]
        mu_rest = np.array([r.mean() if reduce == "mean" else np.median(r) for r in rest])
        got = np.concatenate([saved[0]["results"][reduce][(i, (MEMBER,))]["mu_rest"] for i in range(2)])
        np.testing.assert_allclose(got, mu_rest, rtol=1e-9, atol=1e-12)
        got_argmax = np.concatenate([saved[0]["results"][reduce][(i, (MEMBER,))]["max_sample"] for i in range(2)])
        assert got_argmax.tolist() == [fair_argmax(column[:, u], np.flatnonzero(members)) for u in range(column.shape[1])]
    shards = [theirs["shard"] for theirs in saved]
    assert sum(shards, []) == list(range(100)) and max(map(len, shards)) - min(map(len, shards)) <= 1
    for rank, theirs in enumerate(saved):
        kind, message = theirs["problems"]["agree"]
        if rank == size - 1:
            assert (kind, message) == ("ValueError", "disk full")  # the process that met it raises it
        else:
            assert kind == "AuditError" and f"process {size - 1}: ValueError: disk full" in message
        assert ("disagree on what to audit: settings (process 0: {'seed': 0}; process 1: {'seed': 1}"
                f"{'; 1 more processes differ' if size == 3 else ''})") in theirs["problems"]["agree_on"]


# --- the launch and the devices ---------------------------------------------------------------


def test_launch_from_torchrun_srun_or_nothing():
    assert launch_from_environment({}) == Launch()
    torchrun = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    assert launch_from_environment(torchrun) == Launch(5, 16, 1, 8)
    srun = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS": "16"}
    assert launch_from_environment(srun) == Launch(9, 16, 1, 8)
    # a batch script's own process (no srun step of several tasks) runs alone
    assert launch_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}) == Launch()
    with pytest.raises(AuditError, match="inconsistent: rank 4 of 4"):
        launch_from_environment({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(AuditError, match="WORLD_SIZE='two'"):
        launch_from_environment({"WORLD_SIZE": "two"})


def test_one_process_world_is_the_identity():
    world = World()
    assert world.shard(7) == range(7) and world.backend(torch.device("cpu")) is None
    tensor = torch.arange(4)
    world.all_reduce(tensor, "sum")
    assert tensor.tolist() == [0, 1, 2, 3] and world.all_gather_object("x", "test") == ["x"]
    with pytest.raises(KeyError):
        world.agree(KeyError("mine"), "test")
    assert join(environ={}).size == 1


def test_shards_are_contiguous_and_even():
    shards = [World(Launch(rank, 3, rank, 3)).shard(11) for rank in range(3)]
    assert [list(s) for s in shards] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]


def test_each_process_of_a_machine_needs_its_own_device():
    assert process_device("cpu", 1, 4) == torch.device("cpu")
    with pytest.raises(AuditError, match="names one GPU, but 4 processes"):
        process_device("cuda:1", 1, 4)
    if not torch.cuda.is_available():
        assert process_device("auto", 2, 4) == torch.device("cpu")
        with pytest.raises(AuditError, match="CUDA is not available"):
            process_device("cuda", 0, 2)


def test_decoding_workers_share_the_machine_between_its_processes():
    import pytest_memaudit.pipeline.setup as setup
    from pytest_memaudit.data.images import ImageSet

    folder = ImageSet(["a.png"], Path("/data"), 16, 0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [setup.default_workers(folder, cpu, 10, processes, 96) for processes in (1, 8, 48, 96)] == [8, 6, 1, 1]
    assert setup.default_workers(ImageSet.builtin(2, 16, 0), cpu, 10, 1, 96) == 0  # generated images: in process
    assert [setup.default_workers(folder, cuda, 1, processes, 96) for processes in (1, 8)] == [16, 11]  # a GPU each

"""Data-parallel training: two gloo processes started by torchrun on the CPU compute what one process
computes for the same global batch, stay in sync in stage 2, and only rank 0 writes; where rank 0
fails to write, both processes stop, also without torchrun; the helpers split batches evenly and do
nothing without a process group.

This file is also the worker that torchrun starts (`python test_distributed.py OUT [--one-stage]`).

Why the comparison freezes BatchNorm and turns dropout off: both draw on the images a process holds.
BatchNorm in training mode normalises with each process's own two images (torch's SyncBatchNorm
refuses CPU tensors), and dropout masks come from each process's own torch generator, so neither can
equal one process's four-image batch. With running statistics (`frozen_batch_norm`) and no dropout the
loss is a function of the parameters and the global batch alone, and must match up to float summation
order: the gradient is averaged over processes instead of summed over one batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynseg.trainer import distributed
from dynseg.trainer.data import SyntheticScenes
from dynseg.trainer.model import InstanceConfig, ModelConfig, build_model
from dynseg.trainer.train import TrainConfig, train

STEPS = 3
GLOBAL_BATCH = 4
# measured: losses agree to 1.5e-7 relative, parameters to 1.5e-8 absolute (float32 summation order);
# weighting each process's loss by its share of non-void pixels matters: without it, 5e-3 relative
LOSS_RTOL = 1e-5
PARAMETER_ATOL = 1e-5


def _worker(out: Path) -> None:
    """One process of the run: stage 1 with frozen BatchNorm and no dropout (compared with one
    process), then, with two processes, two end-to-end stage-2 steps. Saves out/rank{r}.pt. Rank 0
    trains into out/semantic and out/instance, rank r > 0 into out/rank{r}/..., where nothing may appear."""
    torch.set_num_threads(1)
    rank, world = distributed.init_from_environment()
    stages = out if rank == 0 else out / f"rank{rank}"
    try:
        torch.manual_seed(0)
        data = SyntheticScenes(size=8, image_size=(32, 40), seed=0)
        model = build_model(ModelConfig(backbone="resnet18", class_names=tuple(data.class_names[1:]),
                                        instance=InstanceConfig(templates_per_group=2, template_size=8)))
        for module in model.modules():
            if isinstance(module, (nn.Dropout, nn.Dropout2d)):
                module.p = 0.0
        log = train(model, data, TrainConfig(stage="semantic", steps=STEPS, batch_size=GLOBAL_BATCH,
                                             learning_rate=0.01, frozen_batch_norm=True),
                    out_dir=stages / "semantic", printer=lambda *_: None)
        result = {"world": world, "semantic": [e["loss"] for e in log],
                  "semantic_parameters": {k: v.detach().clone() for k, v in model.named_parameters()}}
        if world > 1:
            log = train(model, data, TrainConfig(stage="instance", mode="end-to-end", steps=2, learning_rate=0.001),
                        out_dir=stages / "instance", printer=lambda *_: None)
            result["instance"] = [e["loss"] for e in log]
            result["instance_parameters"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def _one_stage_worker(out: Path) -> None:
    """One process of a two-step stage 1 (an epoch is a step: two images, one per process) into out."""
    torch.set_num_threads(1)
    distributed.init_from_environment()
    try:
        data = SyntheticScenes(size=2, image_size=(32, 32), seed=0)
        model = build_model(ModelConfig(backbone="resnet18", class_names=tuple(data.class_names[1:])))
        config = TrainConfig(stage="semantic", steps=2, batch_size=2, learning_rate=0.01, frozen_batch_norm=True)
        train(model, data, config, out_dir=out, printer=lambda *_: None)
    finally:
        distributed.shutdown()


def _without_torchrun_variables() -> dict[str, str]:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if k not in names} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts torchrun with two processes and one plain process side by side; (two, one, seconds)."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    env = _without_torchrun_variables()
    began = time.perf_counter()
    jobs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, str(two)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([sys.executable, __file__, str(one)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=240)
        assert job.returncode == 0, output
    return two, one, time.perf_counter() - began


def test_two_gloo_processes_give_the_losses_and_weights_of_one_process_with_the_same_global_batch(runs):
    two, one, _ = runs
    ddp, single = torch.load(two / "rank0.pt"), torch.load(one / "rank0.pt")
    assert (ddp["world"], single["world"]) == (2, 1)
    np.testing.assert_allclose(ddp["semantic"], single["semantic"], rtol=LOSS_RTOL)
    assert len(set(single["semantic"])) == STEPS  # the weights moved between steps
    for name, value in single["semantic_parameters"].items():
        torch.testing.assert_close(ddp["semantic_parameters"][name], value, rtol=0, atol=PARAMETER_ATOL, msg=name)
        if not name.startswith(("semantic.", "semantic_crf.")):  # unused in stage 1: no gradient, no weight decay
            assert torch.equal(ddp["semantic_parameters"][name], value), name


def test_the_processes_hold_identical_weights_and_logs_after_both_stages(runs):
    two, _, _ = runs
    first, second = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert first["semantic"] == second["semantic"] and first["instance"] == second["instance"]
    assert all(np.isfinite(first["instance"]))
    for stage in ("semantic_parameters", "instance_parameters"):
        assert all(torch.equal(value, second[stage][name]) for name, value in first[stage].items())
    assert any(not torch.equal(first["semantic_parameters"][name], value)
               for name, value in first["instance_parameters"].items())  # stage 2 trained


def test_only_rank_zero_writes_the_log_and_the_checkpoint(runs):
    two, _, _ = runs
    for stage, steps in (("semantic", STEPS), ("instance", 2)):
        lines = (two / stage / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
        assert (two / stage / "model.safetensors").is_file() and (two / stage / "trainer_state.pt").is_file()
    assert [path for path in (two / "rank1").rglob("*") if path.is_file()] == []  # rank 1 wrote nothing


def _launch_two_without_torchrun(command: list[str]) -> list[str]:
    """Starts `command` as ranks 0 and 1 of a gloo group, as a launcher other than torchrun would (one
    that does not stop the other processes when one fails); their outputs, once both have failed."""
    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    jobs = [subprocess.Popen(command, env=_without_torchrun_variables() | group | {"RANK": rank, "LOCAL_RANK": rank},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in ("0", "1")]
    outputs = []
    try:
        for job in jobs:
            output, _ = job.communicate(timeout=180)
            assert job.returncode != 0, output
            outputs.append(output)
    finally:
        for job in jobs:
            job.kill()
    return outputs


def test_where_rank_zero_cannot_write_an_epochs_checkpoint_every_process_stops(tmp_path):
    (tmp_path / "model.safetensors").mkdir()  # the checkpoint cannot take its place
    first, second = _launch_two_without_torchrun([sys.executable, __file__, str(tmp_path), "--one-stage"])
    assert "IsADirectoryError" in first and "model.safetensors" in first
    assert "another process failed at the end of epoch 1 (step 1)" in second, second


def test_where_rank_zero_cannot_start_the_run_the_launcher_stops_every_process_with_one_line(tmp_path):
    (tmp_path / "semantic" / "log.jsonl").mkdir(parents=True)  # an earlier run's log cannot be cleared
    tiny = ["--images", "4", "--image-size", "32", "32", "--semantic-steps", "1", "--instance-steps", "1",
            "--batch-size", "4"]  # 2 images per process: BatchNorm trains, so the run would start
    first, second = _launch_two_without_torchrun([sys.executable, "-m", "dynseg.trainer.distributed",
                                                  "--out", str(tmp_path), *tiny])
    assert f"Error: Is a directory: {tmp_path / 'semantic' / 'log.jsonl'}" in first, first  # one line, no traceback
    assert "Traceback" not in first
    assert f"Error: another process failed at the start of the run in {tmp_path}" in second, second


def test_shard_splits_a_global_batch_into_contiguous_equal_parts():
    assert [list(distributed.shard(4, rank, 2)) for rank in range(2)] == [[0, 1], [2, 3]]
    assert [list(distributed.shard(6, rank, 3)) for rank in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        distributed.shard(5, 0, 2)
    with pytest.raises(ValueError, match="rank must be"):
        distributed.shard(4, 2, 2)


def test_without_torchrun_variables_there_is_one_process_and_reductions_are_identities(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_environment() == (0, 1)
    assert distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce([1.5, 2.0], op="min") == [1.5, 2.0]
    with pytest.raises(ValueError, match="op must be"):
        distributed.all_reduce([1.0], op="max")


MEETING = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "2"}, "sets WORLD_SIZE but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),  # was: trained alone
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "but not MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "abc", "LOCAL_RANK": "0", **MEETING}, "WORLD_SIZE must be a whole number >= 0, got "
                                                                      "'abc'"),
    ({"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0", **MEETING}, "RANK must be below WORLD_SIZE, got RANK 1 of "
                                                                    "WORLD_SIZE 1"),  # was: waited forever
])
def test_torchrun_variables_set_in_part_or_wrong_are_named_not_trained_alone_or_waited_on(monkeypatch, environment,
                                                                                          message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *MEETING):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_from_environment()
    assert not torch.distributed.is_initialized()


def test_the_launcher_records_the_training_data_and_prints_a_bad_argument_in_one_line(monkeypatch, tmp_path):
    from dynseg.trainer.checkpoint import read_training_data

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    tiny = ["--images", "2", "--image-size", "32", "32", "--semantic-steps", "1", "--instance-steps", "1"]
    distributed.main(["--out", str(tmp_path / "run"), "--seed", "3", *tiny])
    assert read_training_data(tmp_path / "run") == {"dataset": "synthetic", "seed": 3, "image_size": [32, 32]}
    # --resume continues the run (a stage extended by one step) instead of starting it afresh
    distributed.main(["--out", str(tmp_path / "run"), "--seed", "3", "--resume", *tiny[:-1], "2"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(SystemExit, match=r"^Error: TrainConfig.learning_rate must be"):
        distributed.main(["--out", str(tmp_path / "bad"), "--lr", "nan", *tiny])


def test_the_launcher_refuses_an_empty_out_and_names_a_folder_the_system_refuses(monkeypatch, tmp_path, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    tiny = ["--images", "2", "--image-size", "32", "32", "--semantic-steps", "1", "--instance-steps", "1"]
    with pytest.raises(SystemExit):  # an unset $OUT: the current folder's earlier run would be replaced
        distributed.main(["--out", "", *tiny])
    assert "--out is empty" in capsys.readouterr().err and not any(tmp_path.iterdir())
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=f"^Error: Not a directory: {tmp_path / 'a_file' / 'run'}$"):
        distributed.main(["--out", str(tmp_path / "a_file" / "run"), *tiny])
    with pytest.raises(SystemExit):
        distributed.main(["--out", "run", "--batch-size", "0", *tiny])
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err


if __name__ == "__main__":
    (_one_stage_worker if sys.argv[2:] == ["--one-stage"] else _worker)(Path(sys.argv[1]))

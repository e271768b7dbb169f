"""Training on the synthetic scenes: both stages learn, piecewise freezes the semantic part, checkpoints
round-trip, and `dynseg train` then `dynseg eval` run from the command line."""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from safetensors.torch import save as save_tensors
from typer.testing import CliRunner

from dynseg.sdk import InvalidArgumentError
from dynseg.sdk.cli import app
from dynseg.trainer.data import SyntheticScenes
from dynseg.trainer.model import InstanceConfig, ModelConfig, build_model
from dynseg.trainer.evaluation import evaluate
from dynseg.trainer.checkpoint import load_checkpoint, save_checkpoint, weights_fingerprint
from dynseg.trainer.train import (
    TrainConfig, _draw, _semantic_batch, _training_modes, augment, evaluation_inputs, fit, learning_rate, predict,
    train,
)

SIZE = (48, 64)


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    data = SyntheticScenes(size=16, image_size=SIZE, seed=seed)
    config = ModelConfig(backbone="resnet18", class_names=tuple(data.class_names[1:]),
                         instance=InstanceConfig(templates_per_group=2, template_size=8))
    return data, build_model(config)


def quiet(*_):
    pass


def test_stage_one_lowers_the_semantic_loss(tmp_path):
    data, model = tiny_setup()
    log = train(model, data, TrainConfig(stage="semantic", steps=40, batch_size=2, learning_rate=0.02),
                out_dir=tmp_path, printer=quiet)
    losses = [entry["loss"] for entry in log]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == list(range(1, 41))


def test_stage_one_trains_the_semantic_crf_on_semantic_labels(tmp_path):
    data, model = tiny_setup()
    before = {k: v.clone() for k, v in model.semantic_crf.state_dict().items()}
    train(model, data, TrainConfig(stage="semantic", steps=2, batch_size=2, learning_rate=0.02),
          out_dir=tmp_path, printer=quiet)
    after = model.semantic_crf.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "every CRF parameter learns, the detection " \
        "potential's weights included"


def test_piecewise_stage_two_leaves_the_semantic_part_alone_and_end_to_end_does_not(tmp_path):
    data, model = tiny_setup()

    def semantic_part() -> dict:  # the network and its CRF
        return {f"{name}.{k}": v.clone() for name in ("semantic", "semantic_crf")
                for k, v in getattr(model, name).state_dict().items()}

    before = semantic_part()
    train(model, data, TrainConfig(stage="instance", mode="piecewise", steps=3, learning_rate=0.01),
          out_dir=tmp_path / "piecewise", printer=quiet)
    assert all(torch.equal(before[k], v) for k, v in semantic_part().items())
    train(model, data, TrainConfig(stage="instance", mode="end-to-end", steps=3, learning_rate=0.01),
          out_dir=tmp_path / "end-to-end", printer=quiet)
    after = semantic_part()
    assert not torch.equal(before["semantic.backbone.conv1.weight"], after["semantic.backbone.conv1.weight"])
    assert not torch.equal(before["semantic_crf.compatibility"], after["semantic_crf.compatibility"])


@pytest.mark.parametrize("mode", ["piecewise", "end-to-end"])
def test_stage_two_keeps_the_semantic_batch_norm_statistics_and_trains_its_dropout_only_end_to_end(mode):
    _, model = tiny_setup()
    _training_modes(model, TrainConfig(stage="instance", mode=mode, steps=1))
    modules = dict(model.semantic.named_modules())
    norms = [m for m in modules.values() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert modules["head.dropout"].training == (mode == "end-to-end")  # before: off in both modes
    assert model.instance_unaries.training and model.instance_crf.training


@pytest.mark.parametrize("blocked", ["model.safetensors", "model.json", "trainer_state.pt"])
def test_a_checkpoint_file_that_cannot_be_written_is_named_in_an_os_error(tmp_path, blocked):
    _, model = tiny_setup()
    (tmp_path / blocked).mkdir()  # a folder where the file goes: what a full disk also gives, one line
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OSError, match=re.escape(str(tmp_path / blocked))):
        save_checkpoint(tmp_path, model, optimiser, step=1)
    assert not list(tmp_path.glob(".*partial")), "the file written beside its place is removed"
    assert (tmp_path / blocked).is_dir()


def test_saving_names_a_model_that_is_no_network_before_making_the_folder(tmp_path):
    with pytest.raises(InvalidArgumentError, match="model must be a DynamicallyInstantiatedNetwork, got Linear"):
        save_checkpoint(tmp_path / "run", nn.Linear(2, 2))
    assert not (tmp_path / "run").exists()
    with pytest.raises(InvalidArgumentError, match="directory must not be an empty path"):
        save_checkpoint("", tiny_setup()[1])


def test_a_checkpoint_rebuilds_the_same_network(tmp_path):
    data, model = tiny_setup()
    with torch.no_grad():
        model.instance_crf.bilateral_weight.fill_(2.5)
    save_checkpoint(tmp_path, model)
    again = load_checkpoint(tmp_path)
    first, _ = predict(model, SyntheticScenes(size=2, image_size=SIZE, seed=3))
    second, _ = predict(again, SyntheticScenes(size=2, image_size=SIZE, seed=3))
    for a, b in zip(first, second):
        assert np.array_equal(a["masks"], b["masks"]) and np.allclose(a["scores"], b["scores"])
    assert weights_fingerprint(again) == weights_fingerprint(model)


def test_every_checkpoint_file_takes_the_umasks_permissions(tmp_path):
    # safetensors' save_file made model.safetensors 0600: a service running as another user could read
    # model.json but not the weights
    _, model = tiny_setup()
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == {name: 0o644 for name in ("model.safetensors", "model.json", "trainer_state.pt")}, modes


def test_the_weights_fingerprint_changes_with_any_single_weight():
    _, model = tiny_setup()
    before = weights_fingerprint(model)
    # a 0-d weight, and single entries deep inside large tensors (first, middle and last ones)
    parameters = dict(model.named_parameters())
    largest = max(parameters, key=lambda name: parameters[name].numel())
    for name, position in (("instance_crf.bilateral_weight", 0), ("instance_unaries.templates", -1),
                           (largest, parameters[largest].numel() // 2), (largest, -1)):
        with torch.no_grad():
            parameters[name].view(-1)[position] += 1e-6
        changed = weights_fingerprint(model)
        assert changed != before, (name, position)
        before = changed
    buffer = next(name for name, _ in model.named_buffers() if name.endswith("num_batches_tracked"))
    model.get_buffer(buffer).add_(1)  # a 0-d int64 buffer counts too
    assert weights_fingerprint(model) != changed


def _with_instance(checkpoint, **fields) -> str:
    config = json.loads((checkpoint / "model.json").read_text())
    config["instance"].update(fields)
    return json.dumps(config)


def test_a_broken_or_foreign_checkpoint_is_named_in_one_line(tmp_path):
    _, model = tiny_setup()
    good = save_checkpoint(tmp_path / "good", model)
    cases = {
        "not JSON": ("model.json", "{not json", "model.json is not a dynseg model config"),
        "JSON without the config": ("model.json", "{}", "model.json is not a dynseg model config"),
        "a config without its backbone": ("model.json", re.sub(r'"backbone": "[a-z0-9]*",', "",
                                                               (good / "model.json").read_text()),
                                          "model.json is not a dynseg model config.*lacks backbone"),
        "a config with a key unknown": ("model.json", (good / "model.json").read_text().replace(
            '"backbone"', '"extra": 1, "backbone"'),
            r"model.json is not a dynseg model config.*unknown keys \['extra'\]"),
        "JSON that is no object": ("model.json", "null", "model.json is not a dynseg model config"),
        "a size torch cannot allocate": ("model.json", _with_instance(good, template_size=10**7),
                                         "model.json describes a network that cannot be built"),
        "weights that are no safetensors": ("model.safetensors", "garbage", "model.safetensors is not readable"),
        "another backbone's config": ("model.json", (good / "model.json").read_text().replace("resnet18", "resnet50"),
                                      r"does not fit its model.json \(resnet50, .* missing \(first "),
        "class names as one string": ("model.json", re.sub(r'"class_names": \[[^]]*\]', '"class_names": "disc"',
                                                           (good / "model.json").read_text()),
                                      "model.json is not a dynseg model config.*class_names must be a JSON list"),
        "integer weights": ("model.safetensors", save_tensors({k: v.long() if v.is_floating_point() else v
                                                               for k, v in model.state_dict().items()}),
                            r"does not fit its model.json .* of another kind of dtype \(first "),
    }
    for name, (file, text, message) in cases.items():
        broken = tmp_path / name.replace(" ", "_")
        broken.mkdir()
        for original in good.iterdir():
            (broken / original.name).write_bytes(original.read_bytes())
        (broken / file).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(InvalidArgumentError, match=message) as raised:
            load_checkpoint(broken)
        assert "\n" not in str(raised.value), name
        result = CliRunner().invoke(app, ["export", str(broken), "--out", str(tmp_path / "m.onnx")])
        assert result.exit_code == 1 and "Traceback" not in result.output and message.split(" ")[0] in result.output
    diverged = tmp_path / "diverged"  # loads (its weights fit), but exporting NaN weights is refused by name
    with torch.no_grad():
        model.semantic_crf.bilateral_weight.view(-1)[0] = float("nan")
    save_checkpoint(diverged, model)
    result = CliRunner().invoke(app, ["export", str(diverged), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "weights hold NaN or infinity (first in semantic_crf.bilateral_weight)" in " ".join(result.output.split())


@pytest.mark.parametrize("field, value", [
    ("stage", "instnace"), ("mode", "end_to_end"), ("schedule", "cosine"), ("steps", -5), ("batch_size", 0),
    ("learning_rate", float("nan")), ("momentum", -0.1), ("scale_range", (2.0, 0.5)), ("crop", (0, 0)),
    ("clip_norm", 0.0), ("momentum", 1.0), ("step_gamma", 3.0),
])
def test_a_train_config_field_out_of_range_is_named(field, value):
    with pytest.raises(InvalidArgumentError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


def test_resuming_continues_from_the_saved_step(tmp_path):
    data, model = tiny_setup()
    train(model, data, TrainConfig(stage="semantic", steps=3, batch_size=2), out_dir=tmp_path, printer=quiet)
    log = train(model, data, TrainConfig(stage="semantic", steps=5, batch_size=2), out_dir=tmp_path, resume=True,
                printer=quiet)
    assert [entry["step"] for entry in log] == [4, 5]


class _Interrupted(Exception):
    pass


def _interrupt_at(step: int):
    def printer(line: str) -> None:  # train prints a line every log_every steps
        if f" {step}/" in line:
            raise _Interrupted(line)
    return printer


def test_a_stage_resumed_from_its_last_epochs_checkpoint_computes_what_an_uninterrupted_run_does(tmp_path):
    # dropout in the semantic head: the resumed steps must draw the masks the uninterrupted ones drew
    config = TrainConfig(stage="semantic", steps=6, batch_size=2, schedule="step", step_every=100)
    data, straight = tiny_setup()
    data = torch.utils.data.Subset(data, range(6))  # 3 steps an epoch: a checkpoint after step 3
    train(straight, data, config, out_dir=tmp_path / "straight", printer=quiet)
    _, resumed = tiny_setup()
    with pytest.raises(_Interrupted):
        train(resumed, data, config, out_dir=tmp_path / "resumed", printer=_interrupt_at(5), log_every=1)
    assert torch.load(tmp_path / "resumed" / "trainer_state.pt", weights_only=True)["step"] == 3
    _, resumed = tiny_setup(seed=1)  # a fresh process's network: the checkpoint's weights replace it
    log = train(resumed, data, config, out_dir=tmp_path / "resumed", resume=True, printer=quiet)
    assert [entry["step"] for entry in log] == [4, 5, 6]
    for name, weight in straight.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted run's steps 4 and 5 are not logged twice
    epochs = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "epochs.jsonl").read_text().splitlines()]
    assert epochs == [3, 6]


def test_a_resumed_log_loses_a_line_cut_short_and_refuses_one_that_is_not_an_entry(tmp_path):
    # a full disk or a power cut can leave the last line without its newline; nothing else writes a list
    config = TrainConfig(stage="semantic", steps=4, batch_size=2, schedule="step", step_every=100)
    data, model = tiny_setup()
    data = torch.utils.data.Subset(data, range(4))  # 2 steps an epoch: a checkpoint after step 2
    with pytest.raises(_Interrupted):
        train(model, data, config, out_dir=tmp_path, printer=_interrupt_at(3), log_every=1)
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "lo')
    assert [entry["step"] for entry in train(model, data, config, out_dir=tmp_path, resume=True,
                                             printer=quiet)] == [3, 4]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    log.write_text(log.read_text() + "[1]\n")
    with pytest.raises(InvalidArgumentError, match=rf"cannot resume: line 5 of {re.escape(str(log))} is not a JSON "
                                                   r"object \('\[1\]'\); move the file away"):
        train(model, data, config, out_dir=tmp_path, resume=True, printer=quiet)


def test_an_empty_out_dir_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, model = tiny_setup()
    with pytest.raises(InvalidArgumentError, match="out_dir must not be an empty path"):
        fit(model, data, out_dir="", printer=quiet, semantic=TrainConfig(stage="semantic", steps=1, batch_size=2),
            instance=TrainConfig(stage="instance", steps=1))
    assert not any(tmp_path.iterdir())


def test_an_interrupted_run_leaves_its_last_epochs_checkpoint_with_what_it_was_trained_on(tmp_path):
    data, model = tiny_setup()
    data = torch.utils.data.Subset(data, range(4))  # stage 2: 4 steps an epoch
    stages = dict(semantic=TrainConfig(stage="semantic", steps=2, batch_size=2),
                  instance=TrainConfig(stage="instance", steps=8))
    trained_on = {"dataset": "synthetic", "seed": 0, "image_size": SIZE}
    with pytest.raises(_Interrupted):
        fit(model, data, out_dir=tmp_path, printer=_interrupt_at(8), training_data=trained_on, **stages)
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 4
    assert json.loads((tmp_path / "training_data.json").read_text())["image_size"] == list(SIZE)
    load_checkpoint(tmp_path)
    logs = fit(model, data, out_dir=tmp_path, printer=quiet, training_data=trained_on, resume=True, **stages)
    assert logs["semantic"] == [] and [entry["step"] for entry in logs["instance"]] == [5, 6, 7, 8]
    epochs = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in epochs] == [("semantic", 2), ("instance", 4), ("instance", 8)]


def test_an_extended_stage_interrupted_is_not_marked_finished(tmp_path):
    # train_config.json marks a finished stage; the extended stage's interrupted checkpoint is not one
    config = TrainConfig(stage="semantic", steps=2, batch_size=2, schedule="step", step_every=100)
    data, model = tiny_setup()
    data = torch.utils.data.Subset(data, range(4))  # 2 steps an epoch
    train(model, data, config, out_dir=tmp_path, printer=quiet)
    assert (tmp_path / "train_config.json").is_file()
    with pytest.raises(_Interrupted):
        train(model, data, replace(config, steps=6), out_dir=tmp_path, resume=True, printer=_interrupt_at(5),
              log_every=1)
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "train_config.json").exists()


def test_a_stage_started_afresh_leaves_no_earlier_checkpoint_to_pass_for_its_own(tmp_path):
    # until the fresh stage's first epoch ends, an earlier run's model would be evaluated as this run's
    data, model = tiny_setup()
    data = torch.utils.data.Subset(data, range(4))
    config = TrainConfig(stage="semantic", steps=4, batch_size=2)
    train(model, data, config, out_dir=tmp_path, printer=quiet)
    (tmp_path / "metrics.json").write_text("{}")  # what `dynseg eval` wrote of it
    with pytest.raises(_Interrupted):
        train(model, data, config, out_dir=tmp_path, printer=_interrupt_at(1), log_every=1)
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & {"model.safetensors", "model.json", "trainer_state.pt", "train_config.json", "metrics.json"}


def test_the_progress_display_is_closed_when_training_stops_on_an_error(tmp_path, monkeypatch):
    # a live bar left open keeps the terminal's cursor hidden after Ctrl-C
    import dynseg.trainer.train as training

    closed = []
    opened = training.stage_progress

    def spied(*args, **kwargs):
        progress = opened(*args, **kwargs)
        close = progress.close
        progress.close = lambda: (closed.append(True), close())
        return progress

    monkeypatch.setattr(training, "stage_progress", spied)
    data, model = tiny_setup()
    with pytest.raises(_Interrupted):
        train(model, data, TrainConfig(stage="semantic", steps=3, batch_size=2), out_dir=tmp_path,
              printer=_interrupt_at(2), log_every=1)
    assert closed == [True]


def test_a_run_that_cannot_start_leaves_the_last_runs_files(tmp_path):
    data, model = tiny_setup()
    stages = dict(semantic=TrainConfig(stage="semantic", steps=1, batch_size=2),
                  instance=TrainConfig(stage="instance", steps=1))
    fit(model, data, out_dir=tmp_path, printer=quiet, **stages)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidArgumentError, match="stage 1 would train BatchNorm on 1 image per process"):
        fit(model, data, out_dir=tmp_path, printer=quiet, **{**stages, "semantic": replace(stages["semantic"],
                                                                                           batch_size=1)})
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_dynseg_train_resume_continues_the_run_in_its_folder(tmp_path):
    options = ["train", "--out", str(tmp_path), "--images", "6", "--image-size", "48", "64", "--semantic-steps", "3"]
    result = CliRunner().invoke(app, [*options, "--instance-steps", "2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*options, "--instance-steps", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "semantic" / "log.jsonl").read_text().splitlines()) == 3  # stage 1 was done
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_training_leaves_torchs_random_state_as_it_was(tmp_path):
    data, model = tiny_setup()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=2), out_dir=tmp_path, printer=quiet)
    assert torch.equal(torch.rand(3), expected)


def test_resuming_with_other_settings_is_refused_naming_each(tmp_path):
    # the run's record would describe training that never happened, or its rest would train otherwise
    data, model = tiny_setup()
    train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=2), out_dir=tmp_path, printer=quiet)
    with pytest.raises(InvalidArgumentError, match=r"trainer_state.pt: it was saved with other settings "
                                                   r"\(learning_rate 0.01 -> 0.5; seed 0 -> 5\): give the run's "
                                                   r"options again"):
        train(model, data, TrainConfig(stage="semantic", steps=2, batch_size=2, learning_rate=0.5, seed=5),
              out_dir=tmp_path, resume=True, printer=quiet)
    with pytest.raises(InvalidArgumentError, match=r"other settings \(images 16 -> 6\)"):
        train(model, torch.utils.data.Subset(data, range(6)), TrainConfig(stage="semantic", steps=2, batch_size=2),
              out_dir=tmp_path, resume=True, printer=quiet)


def test_resuming_a_run_on_other_training_data_is_refused(tmp_path):
    data, model = tiny_setup()
    stages = dict(semantic=TrainConfig(stage="semantic", steps=1, batch_size=2),
                  instance=TrainConfig(stage="instance", steps=1))
    trained_on = {"dataset": "synthetic", "seed": 0, "image_size": SIZE}
    fit(model, data, out_dir=tmp_path, printer=quiet, training_data=trained_on, **stages)
    with pytest.raises(InvalidArgumentError, match=r"cannot resume: \S*training_data.json records .*'seed': 0.*this "
                                                   r"run .*'seed': 5.*give the run's dataset options again"):
        fit(model, data, out_dir=tmp_path, printer=quiet, training_data=trained_on | {"seed": 5}, resume=True, **stages)


def test_extending_a_finished_stage_1_trains_stage_2_again_from_it(tmp_path):
    # stage 2's checkpoint holds the stage-1 weights it started from: resuming it would undo the extension
    data, model = tiny_setup()
    stages = dict(semantic=TrainConfig(stage="semantic", steps=2, batch_size=2),
                  instance=TrainConfig(stage="instance", steps=2))
    fit(model, data, out_dir=tmp_path, printer=quiet, **stages)
    before = load_checkpoint(tmp_path).state_dict()
    said = []
    logs = fit(model, data, out_dir=tmp_path, printer=said.append, resume=True,
               **(stages | {"semantic": TrainConfig(stage="semantic", steps=3, batch_size=2)}))
    assert [entry["step"] for entry in logs["semantic"]] == [3] and [e["step"] for e in logs["instance"]] == [1, 2]
    assert any(line.startswith("Note: stage 1 made steps, so stage 2 starts afresh") for line in said), said
    after = load_checkpoint(tmp_path).state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "the final model is the one before stage 1 was extended"
    epochs = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in epochs] == [("semantic", 2), ("semantic", 3), ("instance", 2)]


def test_resuming_another_stages_or_modes_state_is_refused_by_name(tmp_path):
    data, model = tiny_setup()
    train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=2), out_dir=tmp_path, printer=quiet)
    with pytest.raises(InvalidArgumentError, match=r"trainer_state.pt: it was saved by stage 'semantic', not this "
                                                   r"stage's 'instance, end-to-end'"):
        train(model, data, TrainConfig(stage="instance", mode="end-to-end", steps=3), out_dir=tmp_path, resume=True,
              printer=quiet)
    train(model, data, TrainConfig(stage="instance", mode="end-to-end", steps=1), out_dir=tmp_path, printer=quiet)
    with pytest.raises(InvalidArgumentError, match=r"saved by stage 'instance, end-to-end', not this stage's "
                                                   r"'instance, piecewise'"):
        train(model, data, TrainConfig(stage="instance", mode="piecewise", steps=2), out_dir=tmp_path, resume=True,
              printer=quiet)


def test_resuming_from_a_state_whose_weights_were_replaced_is_refused(tmp_path):
    # what a save cut short between model.safetensors and trainer_state.pt leaves
    data, model = tiny_setup()
    train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=2), out_dir=tmp_path, printer=quiet)
    with torch.no_grad():
        model.semantic_crf.spatial_weight.add_(1.0)
    save_checkpoint(tmp_path, model)
    with pytest.raises(InvalidArgumentError, match=r"its weights fingerprint is not that of .*model.safetensors"):
        train(model, data, TrainConfig(stage="semantic", steps=2, batch_size=2), out_dir=tmp_path, resume=True,
              printer=quiet)


@pytest.mark.parametrize("state, problem", [
    (b"", "EOFError"),
    (b"PK\x03\x04 not a zip", ""),
    ({"optimiser": {}}, "KeyError: 'step'"),
    ({"optimiser": {}, "step": "x"}, "its step must be an int in 0..3"),
    ({"optimiser": {}, "step": 7}, r"its step must be an int in 0\.\.3 \(this stage's steps\), got 7"),
    ([1, 2], "TypeError"),
])
def test_resuming_from_a_broken_trainer_state_is_refused_in_one_line(tmp_path, state, problem):
    data, model = tiny_setup()
    train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=2), out_dir=tmp_path, printer=quiet)
    if isinstance(state, bytes):
        (tmp_path / "trainer_state.pt").write_bytes(state)
    else:
        torch.save(state, tmp_path / "trainer_state.pt")
    where = f"{tmp_path}/trainer_state.pt"
    with pytest.raises(InvalidArgumentError, match=f"cannot resume from {where}: .*{problem}") as raised:
        train(model, data, TrainConfig(stage="semantic", steps=3, batch_size=2), out_dir=tmp_path, resume=True,
              printer=quiet)
    assert "\n" not in str(raised.value)


def test_an_empty_dataset_is_refused_before_training(tmp_path):
    _, model = tiny_setup()
    with pytest.raises(InvalidArgumentError, match="dataset holds no image"):
        train(model, [], TrainConfig(stage="semantic", steps=1), out_dir=tmp_path, printer=quiet)


def test_a_diverging_run_is_named_with_its_step_and_learning_rate(tmp_path):
    data, model = tiny_setup()
    with pytest.raises(InvalidArgumentError, match=r"(diverged at step \d+.*learning rate \(1e\+30\)|step \d+: .*"
                                                   r"diverged: lower the learning rate, 1e\+30 at this step)"):
        train(model, data, TrainConfig(stage="semantic", steps=6, batch_size=2, learning_rate=1e30,
                                       schedule="step", step_every=100), out_dir=tmp_path, printer=quiet)


def test_dynseg_train_then_dynseg_eval_run_from_the_command_line(tmp_path):
    runner = CliRunner()
    for _ in range(2):  # the second run into the same folder replaces the first run's logs
        result = runner.invoke(app, ["train", "--out", str(tmp_path), "--images", "6", "--image-size", "48", "64",
                                     "--semantic-steps", "3", "--instance-steps", "2"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()
    epochs = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in epochs] == [("semantic", 1), ("semantic", 2), ("instance", 1)]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "semantic" / "log.jsonl").read_text().splitlines()) == 3
    result = runner.invoke(app, ["eval", str(tmp_path), "--images", "3", "--image-size", "48", "64"])
    assert result.exit_code == 0, result.output
    assert "AP^r_vol" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"ap_r", "ap_r_vol", "matching_iou", "pq", "coco_mask_ap"}


def test_dynseg_eval_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 1 and "not a dynseg checkpoint" in result.output
    assert "records no training data" not in result.output  # no note about a model that is none


def test_stage_one_refuses_batch_norm_statistics_of_one_image_per_process(tmp_path):
    data, model = tiny_setup()
    with pytest.raises(InvalidArgumentError, match="BatchNorm on 1 image per process .*batch_size at least 2"):
        train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=1), out_dir=tmp_path, printer=quiet)
    log = train(model, data, TrainConfig(stage="semantic", steps=1, batch_size=1, frozen_batch_norm=True),
                out_dir=tmp_path, printer=quiet)
    assert len(log) == 1


def test_a_new_run_clears_the_last_runs_checkpoints_so_a_failed_one_leaves_none_behind(tmp_path):
    data, model = tiny_setup()
    stages = dict(semantic=TrainConfig(stage="semantic", steps=1, batch_size=2),
                  instance=TrainConfig(stage="instance", steps=1))
    fit(model, data, out_dir=tmp_path, printer=quiet, **stages)
    (tmp_path / "metrics.json").write_text("{}")  # what dynseg eval wrote for the old model
    (tmp_path / "notes.txt").write_text("mine")  # not the run's: kept
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "semantic" / "model.safetensors").is_file()
    with pytest.raises(InvalidArgumentError, match="dataset holds no image"):  # refused before anything goes
        fit(model, [], out_dir=tmp_path, printer=quiet, **stages)
    # TrainConfig's stage defaults to "semantic": this used to train stage 1 twice and the instance part never
    with pytest.raises(InvalidArgumentError, match=r"instance must be a TrainConfig\(stage='instance', ...\), got "
                                                   r"TrainConfig of stage 'semantic'"):
        fit(model, data, out_dir=tmp_path, printer=quiet, semantic=stages["semantic"], instance=TrainConfig(steps=1))
    assert (tmp_path / "model.safetensors").is_file()
    diverging = TrainConfig(stage="semantic", steps=6, batch_size=2, learning_rate=1e30, schedule="step",
                            step_every=100)
    with pytest.raises(InvalidArgumentError, match="diverged"):  # fails after it started
        fit(model, data, out_dir=tmp_path, printer=quiet, semantic=diverging, instance=stages["instance"])
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["epochs.jsonl", "notes.txt", "semantic/log.jsonl"]  # the new run's logs, and the user's file


def test_a_short_training_run_beats_the_untrained_network_on_held_out_scenes(tmp_path):
    # measured: AP^r_vol 0.003 untrained, 0.038 after 120 + 20 steps (about 15 s on 2 cores)
    torch.manual_seed(0)
    train_set = SyntheticScenes(size=64, image_size=(64, 80), seed=0)
    held_out = SyntheticScenes(size=12, image_size=(64, 80), seed=1)
    model = build_model(ModelConfig(backbone="resnet18", class_names=tuple(train_set.class_names[1:]),
                                    instance=InstanceConfig(templates_per_group=2, template_size=8)))
    untrained = evaluate(*predict(model, held_out), num_classes=4)["ap_r_vol"]
    logs = fit(model, train_set, out_dir=tmp_path, printer=quiet,
               semantic=TrainConfig(stage="semantic", steps=120, batch_size=4, learning_rate=0.02),
               instance=TrainConfig(stage="instance", steps=20, learning_rate=0.001))
    semantic_losses = [entry["loss"] for entry in logs["semantic"]]
    assert np.mean(semantic_losses[-20:]) < 0.5 * np.mean(semantic_losses[:20])
    trained = evaluate(*predict(model, held_out), num_classes=4)["ap_r_vol"]
    assert trained > untrained + 0.02


def test_the_learning_rate_schedules_start_at_the_configured_rate():
    poly = TrainConfig(steps=10, learning_rate=0.1, poly_power=1.0)
    assert [learning_rate(poly, step) for step in (0, 5, 9)] == pytest.approx([0.1, 0.05, 0.01])
    stepped = TrainConfig(steps=10, learning_rate=0.1, schedule="step", step_every=3, step_gamma=0.5)
    assert [learning_rate(stepped, step) for step in range(7)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025])


def test_augmentation_keeps_image_class_map_masks_and_boxes_aligned():
    image = np.zeros((24, 32, 3), np.uint8)
    image[5:16, 0:10] = (255, 0, 0)  # the object, at the left edge: a mirror moves it to the right
    semantic = np.zeros((24, 32), np.int64)
    semantic[5:16, 0:10] = 1
    sample = {"image": image, "semantic": semantic, "masks": semantic[None] == 1, "labels": np.array([1]),
              "boxes": np.array([[0, 5, 9, 15]], np.float32)}
    config = TrainConfig(scale_range=(1.0, 1.0), crop=(16, 20), mirror=True)
    mirrored = 0
    for seed in range(12):
        out = augment(sample, config, np.random.default_rng(seed))
        red = out["image"][0] > 128  # (H, W)
        mirrored += bool(red[:, -1].any())
        assert torch.equal(out["semantic"] == 1, red), seed
        assert len(out["masks"]) == int(red.any()) and all(torch.equal(mask, red) for mask in out["masks"]), seed
        if red.any():
            rows, columns = torch.nonzero(red, as_tuple=True)
            assert out["boxes"].tolist() == [[columns.min(), rows.min(), columns.max(), rows.max()]], seed
    assert 0 < mirrored < 12  # both sides were drawn


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.7, 2.0, 2.9])
def test_a_detection_box_follows_its_objects_pixels_through_scale_crop_and_mirror(scale):
    # a detector's box that is exactly its object's box stays so: enlarging used to cut its far edge
    rng = np.random.default_rng(int(scale * 10))
    for trial in range(20):
        x1, y1 = rng.integers(0, 20), rng.integers(0, 14)
        x2, y2 = x1 + rng.integers(0, 12), y1 + rng.integers(0, 10)
        mask = np.zeros((24, 32), bool)
        mask[y1:y2 + 1, x1:x2 + 1] = True
        box = np.array([[x1, y1, x2, y2]], np.float32)
        sample = {"image": np.zeros((24, 32, 3), np.uint8), "semantic": mask.astype(np.int64), "masks": mask[None],
                  "labels": np.array([1]), "boxes": box,
                  "detections": {"boxes": box + 0.25, "labels": np.array([1]), "scores": np.array([0.9], np.float32)}}
        config = TrainConfig(scale_range=(scale, scale), crop=(20, 24), mirror=True)
        out = augment(sample, config, np.random.default_rng(trial))
        assert out["detections"]["boxes"].tolist() == out["boxes"].tolist(), (trial, box, out["boxes"])


def test_the_images_of_one_step_are_drawn_apart():
    data = SyntheticScenes(size=16, image_size=(48, 64), seed=0)
    config = TrainConfig(stage="semantic", steps=1, batch_size=4)
    batch, _ = _semantic_batch(data, config, 0, range(4), num_classes=data.num_classes)
    images = batch["images"].flatten(1)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(images[i], images[j]), (i, j)
    again, _ = _semantic_batch(data, config, 0, range(4), num_classes=data.num_classes)
    assert torch.equal(again["images"], batch["images"])  # and the same for the same (seed, step)


class _Recording(list):
    """Samples that note which index each read asks for."""

    def __init__(self, samples):
        super().__init__(samples)
        self.read = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


@pytest.mark.parametrize("stage, batch_size", [("semantic", 4), ("semantic", 3), ("instance", 1)])
def test_each_epoch_reads_every_image_once_in_a_new_order(stage, batch_size):
    # drawn independently, an epoch of 10 left about 3.5 of them out and read others twice
    data = SyntheticScenes(size=10, image_size=(48, 64), seed=0)
    recording = _Recording(data[i] for i in range(10))
    config = TrainConfig(stage=stage, steps=1, batch_size=batch_size)
    images_per_step = batch_size if stage == "semantic" else 1
    for draw in range(20):
        _draw(recording, config, draw // images_per_step, draw % images_per_step, data.num_classes)
    first, second = recording.read[:10], recording.read[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and first != list(range(10))


def test_a_stage_1_batch_crops_each_image_anywhere_not_always_at_its_top_left():
    # the batch takes its smallest image's size: a fixed top-left crop never trained on the bottom rows
    data = SyntheticScenes(size=16, image_size=(48, 64), seed=0)
    config = TrainConfig(stage="semantic", steps=6, batch_size=4)
    offsets = set()
    for step in range(6):
        batch, _ = _semantic_batch(data, config, step, range(4), num_classes=data.num_classes)
        height, width = batch["images"].shape[-2:]
        assert (batch["boxes"] >= 0).all() and (batch["boxes"][:, 2:] < torch.tensor([width, height])).all()
        for position, crop in enumerate(batch["images"]):
            full = _draw(data, config, step, position, data.num_classes)[0]["image"]
            found = [(y, x) for y in range(full.shape[1] - height + 1) for x in range(full.shape[2] - width + 1)
                     if torch.equal(full[:, y:y + height, x:x + width], crop)]
            assert found, (step, position)
            offsets.add(found[0])
    assert any(y > 0 for y, _ in offsets) and any(x > 0 for _, x in offsets), offsets


@pytest.mark.parametrize("field, spoil, message", [
    ("image", lambda s: s["image"] / 255.0, r"\['image'\] must be uint8 \(H, W, 3\) RGB, got float64"),
    ("image", lambda s: s["image"][..., 0], r"\['image'\] must be uint8 \(H, W, 3\) RGB, got uint8 of shape \(48, 64\)"),
    ("semantic", lambda s: np.where(s["semantic"] == 0, 7, s["semantic"]), r"\['semantic'\] must hold classes 0..4 "
                                                                             r"or 255 \(void\), got 7"),
    ("labels", lambda s: s["labels"][:0], r"\['labels'\] must be integers of shape \(\d+,\), one per mask"),
])
def test_a_sample_of_the_wrong_kind_is_named_before_training_or_evaluation_reads_it(field, spoil, message):
    data = SyntheticScenes(size=2, image_size=(48, 64), seed=0)
    spoilt = [{**data[i], field: spoil(data[i])} for i in range(2)]
    with pytest.raises(InvalidArgumentError, match=r"^dataset\[\d\]" + message):
        _semantic_batch(spoilt, TrainConfig(stage="semantic", steps=1, batch_size=2), 0, range(2),
                        num_classes=data.num_classes)
    with pytest.raises(InvalidArgumentError, match=r"^dataset\[0\]" + message):
        next(evaluation_inputs(spoilt, seed=0, num_classes=data.num_classes))


def test_held_out_images_draw_their_simulated_detections_apart():
    sample = SyntheticScenes(size=1, image_size=(48, 64), seed=3)[0]
    assert len(sample["labels"]) > 0
    twice = [sample, sample]  # the same scene at two indices
    first, second = (detections for _, detections, _ in evaluation_inputs(twice, seed=1, num_classes=4))
    assert not (torch.equal(first["boxes"], second["boxes"]) and torch.equal(first["scores"], second["scores"]))
    again = next(evaluation_inputs(twice, seed=1, num_classes=4))[1]
    assert all(torch.equal(again[k], first[k]) for k in ("boxes", "labels", "scores"))  # same seed, same draw


class _One(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def test_the_weights_fingerprint_tells_the_same_bytes_in_another_shape_apart():
    values = torch.arange(6, dtype=torch.float32)
    fingerprints = {weights_fingerprint(_One(values.reshape(2, 3))), weights_fingerprint(_One(values.reshape(3, 2))),
                    weights_fingerprint(_One(values.reshape(6)))}
    assert len(fingerprints) == 3
    assert weights_fingerprint(_One(values.reshape(2, 3).clone())) == weights_fingerprint(_One(values.reshape(2, 3)))

"""What an export and the Segmenter over it promise beyond parity with PyTorch (tests/export/
test_onnx_parity.py has that): the export's metadata (the normalisation the graph applies, opset 17,
the training data it was given), read_export's refusal of a dynseg opset or op this dynseg does not
know, the one-label node returning its unary in the torch definition the exporter traces as in the
SDK, `segment`'s timings (the CRF nodes under "crf", the sessions under "network"; measured with a
stand-in clock, so nothing depends on this machine's speed) and its refusals (a bool as a running
total, a label past the model's classes), and `dynseg infer`'s 16-bit instance map."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dynseg.export import ops
from dynseg.export.onnx import export_onnx
from dynseg.sdk import InvalidArgumentError, onnx_backend, samples
from dynseg.sdk.cli import app
from dynseg.sdk.commands.evaluate import training_data_of
from dynseg.sdk.crf_node import CrfAttributes, run_node
from dynseg.sdk.graph import read_export
from dynseg.sdk.segmenter import Segmenter

TRAINING_DATA = {"dataset": "synthetic", "seed": 7, "image_size": [48, 64]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, learned_looking_network):
    """(network, its export), the export recording TRAINING_DATA as a checkpoint's training data."""
    network = learned_looking_network()
    return network, export_onnx(network, tmp_path_factory.mktemp("model") / "model.onnx", max_detections=5,
                                training_data=TRAINING_DATA)


@pytest.fixture(scope="module")
def image():
    return np.ascontiguousarray(samples.load("coffee")[:40, :48])


@pytest.mark.parametrize("total", [True, np.bool_(False)])
def test_a_bool_is_no_running_total_of_seconds(exported, image, total):
    with pytest.raises(InvalidArgumentError, match=r"timings\['network'\] must be a number of seconds to add to"):
        Segmenter(exported[1]).segment(image, [], [], [], timings={"network": total})


def test_a_label_past_the_models_classes_is_refused_by_name(exported, image):
    segmenter = Segmenter(exported[1])
    assert len(segmenter.class_names) == 3
    segmenter.segment(image, [[2, 3, 20, 30]], [3], [0.8])  # the last class is fine
    with pytest.raises(InvalidArgumentError, match=r"labels must be class ids in 1\.\.3: entries \[0\] are \[4\]"):
        segmenter.segment(image, [[2, 3, 20, 30]], [4], [0.8])


def test_timings_put_the_crf_nodes_under_crf_and_the_sessions_under_network(exported, image, monkeypatch):
    class Clock:  # each reading advances a second; the CRF nodes add 1000
        now = 0.0

        def perf_counter(self) -> float:
            self.now += 1.0
            return self.now

    clock, mean_field = Clock(), onnx_backend._mean_field

    def crf_taking_1000_seconds(*args, **kwargs):
        clock.now += 1000.0
        return mean_field(*args, **kwargs)

    segmenter = Segmenter(exported[1])
    monkeypatch.setattr(onnx_backend, "time", clock)
    monkeypatch.setattr(onnx_backend, "_mean_field", crf_taking_1000_seconds)
    timings: dict[str, float] = {}
    segmenter.segment(image, [[2, 3, 20, 30]], [1], [0.8], timings=timings)
    names = [step.name for step in segmenter._backend._steps if isinstance(step, onnx_backend._CrfNode)]
    assert names == ["/semantic_crf/MeanFieldCRF", "/instance_crf/MeanFieldCRF"]  # as the module docstring says
    nodes = len(names)
    assert 1000 * nodes <= timings["crf"] < 1000 * nodes + 100
    assert 0 < timings["network"] < 100


def test_the_metadata_records_the_normalisation_the_graph_applies_and_opset_17(exported):
    network, path = exported
    model = onnx.load(str(path))
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    preprocessing = json.loads(metadata["preprocessing"])
    assert preprocessing == {"input": "RGB uint8 (1, 3, H, W)", "mean": list(network.config.mean),
                             "std": list(network.config.std), "scale": 255.0}
    scale = preprocessing["scale"]
    torch.testing.assert_close(network.mean.flatten(), torch.tensor(preprocessing["mean"]) * scale)
    torch.testing.assert_close(network.std.flatten(), torch.tensor(preprocessing["std"]) * scale)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17  # docs/ops.md: standard opset 17


def test_a_graph_importing_another_version_of_the_dynseg_opset_is_refused(exported, tmp_path):
    # the metadata still says op version 1: the graph's own opset_import is what onnxruntime and TensorRT read
    model = onnx.load(str(exported[1]))
    next(o for o in model.opset_import if o.domain == "dynseg").version = 2
    onnx.save(model, str(tmp_path / "opset2.onnx"))
    with pytest.raises(InvalidArgumentError, match=r"opset2\.onnx records dynseg::MeanFieldCRF version 1 and imports "
                                                   r"the dynseg opset version 2; this dynseg runs version 1"):
        Segmenter(tmp_path / "opset2.onnx")


def test_a_dynseg_op_this_dynseg_does_not_know_is_refused_by_name(exported, tmp_path):
    # a newer dynseg's op: the onnxruntime backend's partition would otherwise take it for a MeanFieldCRF node
    model = onnx.load(str(exported[1]))
    crf = next(n for n in model.graph.node if n.domain == "dynseg")
    model.graph.node.append(onnx.helper.make_node("MeanFieldCRF2", list(crf.input), ["future_a", "future_b"],
                                                  domain="dynseg", name="future"))
    onnx.save(model, str(tmp_path / "future.onnx"))
    message = r"future\.onnx has dynseg ops this dynseg does not know: \['MeanFieldCRF2'\]"
    with pytest.raises(InvalidArgumentError, match=message):
        read_export(tmp_path / "future.onnx")
    with pytest.raises(InvalidArgumentError, match=message):
        Segmenter(tmp_path / "future.onnx")


def test_infer_writes_the_instance_map_as_a_16_bit_png(exported, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(samples.load("chelsea")[:48, :64]).save(photo)
    detections = tmp_path / "dets.json"
    detections.write_text(json.dumps([{"image_id": "photo", "category_id": 1, "bbox": [4, 4, 30, 30], "score": 0.9}]))
    result = CliRunner().invoke(app, ["infer", str(exported[1]), str(photo), "--detections", str(detections),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "photo_instances.png") as ids:
        assert ids.mode in ("I;16", "I;16B", "I") and ids.size == (64, 48)  # 16-bit grey, not "L"
        values = np.array(ids)
    assert values.dtype in (np.uint16, np.int32) and values.max() >= 1


def test_an_export_records_the_training_data_it_was_given(exported):
    metadata = {entry.key: entry.value for entry in onnx.load(str(exported[1])).metadata_props}
    assert json.loads(metadata["training_data"]) == TRAINING_DATA
    assert training_data_of(exported[1]) == TRAINING_DATA  # what `dynseg eval` of the export holds out from


@pytest.mark.parametrize("compatibility", [np.full((1, 1), -1.0, np.float32), np.zeros(0, np.float32)],
                         ids=["semantic-style compatibility", "Potts"])
@pytest.mark.parametrize("detection_potential", [0, 1])
def test_a_node_of_one_label_returns_its_unary_in_torch_as_in_the_sdk(compatibility, detection_potential):
    rng = np.random.default_rng(0)
    height, width = 12, 14
    inputs = [
        rng.normal(size=(1, 1, height, width)).astype(np.float32) * 3,
        rng.uniform(0, 255, (1, 3, height, width)).astype(np.float32),
        np.full((1, 1), 3.0, np.float32), np.full((1, 1), 5.0, np.float32), compatibility,
        np.array([[2, 3, 10, 9]], np.float32), np.array([1], np.int64), np.array([0.8], np.float32),
        np.array(1.5, np.float32), np.array(0.7, np.float32),
    ]
    attributes = (3, 3.0, 20.0, 10.0, "after", detection_potential, 1.0, 1e-4)
    with torch.no_grad():
        logits, scores = ops.crf_node(*(torch.from_numpy(a) for a in inputs), *attributes)
    node_logits, node_scores = run_node(inputs, CrfAttributes(*attributes))
    np.testing.assert_array_equal(node_logits, inputs[0])
    np.testing.assert_array_equal(logits.numpy(), inputs[0])
    np.testing.assert_array_equal(scores.numpy(), node_scores)

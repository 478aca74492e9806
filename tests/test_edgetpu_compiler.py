"""edgetpu_compiler wrapper and log parser, on real compiler output (tests/data/edgetpu_compiler,
sources in SOURCE.md). The compiler itself exists only for x86-64 Linux from Coral's apt repo."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from segd.errors import RuntimeUnavailable
from segd.tflite.compiler import (
    EdgeTpuCompilerUnavailable,
    compile_edgetpu,
    parse_compiler_log,
)

LOGS = Path(__file__).parent / "data" / "edgetpu_compiler"


def _read(name: str) -> str:
    return (LOGS / name).read_text()


def test_parses_stdout_summary_and_table_consistently() -> None:
    text = _read("yolov5s_int8_224_stdout_v16.txt")
    log = parse_compiler_log(text)
    assert log.compiler_version == "16.0.384591198"
    assert log.input_model == "yolov5s-int8-224.tflite"
    assert log.output_model == "yolov5s-int8-224_edgetpu.tflite"
    assert log.subgraphs == 2 and log.succeeded is True and log.table_complete
    # The summary lines and the operator table are independent parts of the text: they agree.
    assert log.ops_total == sum(r.count for r in log.rows)
    assert log.ops_mapped == sum(r.count for r in log.rows if r.mapped)
    assert log.ops_on_cpu == sum(r.count for r in log.rows if not r.mapped)
    assert log.ops_mapped is not None and log.ops_total is not None
    assert log.ops_mapped < log.ops_total
    table = text.split("Count      Status\n", 1)[1].splitlines()
    assert len(log.rows) == len([ln for ln in table if ln.strip() and "Compilation" not in ln])
    assert {r.op for r in log.rows if not r.mapped} == {
        "CONCATENATION",
        "TRANSPOSE",
        "QUANTIZE",
        "RESHAPE",
    }
    assert log.on_chip_memory_used == round(6.08 * 2**20)
    assert log.on_chip_memory_remaining == 0
    assert log.off_chip_memory == round(1.70 * 2**20)


def test_parses_operation_log_file_of_a_fully_mapped_model() -> None:
    log = parse_compiler_log(_read("yolov8s_160_v16.log"))
    assert log.compiler_version == "16.0.384591198"
    assert log.input_model is not None and log.input_model.endswith("full_integer_quant.tflite")
    assert log.rows and all(r.mapped for r in log.rows)
    assert log.ops_mapped == log.ops_total == sum(r.count for r in log.rows)
    assert log.subgraphs is None and log.on_chip_memory_used is None  # not in .log files
    assert log.succeeded is None


def test_parses_rows_with_every_unmapped_status_of_compiler_14() -> None:
    log = parse_compiler_log(_read("tiny_yolo_v14.log"))
    assert log.compiler_version == "14.1.317412892"
    statuses = {r.status for r in log.rows}
    assert {
        "More than one subgraph is not supported",
        "Operation version not supported",
        "Operation is otherwise supported, but not mapped due to some unspecified limitation",
        "Mapped to Edge TPU",
    } == statuses
    conv = [r for r in log.rows if r.op == "CONV_2D"]
    assert [(r.count, r.mapped) for r in conv] == [(11, True), (2, False)]
    assert log.ops_mapped is not None and log.ops_total is not None
    assert 0 < log.ops_mapped < log.ops_total


def test_unmapped_only_table_is_flagged_incomplete() -> None:
    # Without -s the compiler lists only unmapped ops and ends with this line; build such a
    # text from the real stdout fixture by keeping its unmapped rows.
    text = _read("yolov5s_int8_224_stdout_v16.txt")
    head, table = text.split("Operator                       Count      Status\n")
    unmapped = [ln for ln in table.splitlines() if "unspecified limitation" in ln]
    short = (
        head + "Operator                       Count      Status\n\n" + "\n".join(unmapped)
        + "\n... All other operators were mapped successfully. See yolov5s-int8-224_edgetpu.log.\n"
    )  # fmt: skip
    log = parse_compiler_log(short)
    assert not log.table_complete
    assert [r.status for r in log.rows] == [ln.split(maxsplit=2)[2] for ln in unmapped]
    assert (log.ops_mapped, log.ops_total) == (289, 294)  # from the summary lines


def test_garbage_parses_to_an_empty_log() -> None:
    log = parse_compiler_log("no compiler here\n")
    assert log.compiler_version is None and log.rows == [] and log.ops_total is None


def test_compile_without_compiler_raises_a_typed_error_with_install_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no edgetpu_compiler
    model = tmp_path / "m.tflite"
    model.write_bytes(b"")
    with pytest.raises(EdgeTpuCompilerUnavailable) as err:
        compile_edgetpu(model, tmp_path / "out", timeout=10)
    assert isinstance(err.value, RuntimeUnavailable)
    assert err.value.code == "edgetpu_compiler_unavailable" and err.value.http_status == 503
    msg = str(err.value)
    assert "apt-get install edgetpu-compiler" in msg and "coral-edgetpu-stable" in msg
    assert "x86-64" in msg and "Raspberry Pi" in msg


@pytest.mark.skipif(
    shutil.which("edgetpu_compiler") is None, reason="edgetpu_compiler not installed"
)
def test_compiles_a_small_int8_model_when_the_compiler_exists(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    inp = tf.keras.Input((32, 32, 3), batch_size=1)
    model = tf.keras.Model(inp, tf.keras.layers.Conv2D(8, 3, padding="same")(inp))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    rng = np.random.default_rng(0)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: (
        [rng.random((1, 32, 32, 3), dtype=np.float32)] for _ in range(4)
    )
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.uint8
    src = tmp_path / "tiny.tflite"
    src.write_bytes(conv.convert())
    result = compile_edgetpu(src, tmp_path / "out", timeout=300)
    assert result.model_path.is_file() and result.returncode == 0
    assert result.log.ops_mapped == result.log.ops_total

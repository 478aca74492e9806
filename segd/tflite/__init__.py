"""TensorFlow-free ``.tflite`` tooling: read models, cut their resize/argmax tail, predict the
Edge TPU op mapping, and drive/parse ``edgetpu_compiler``.

Only numpy, flatbuffers and ``ai_edge_litert``'s generated schema are imported, so ``segd``
can use this on a Raspberry Pi.
"""

from segd.tflite.checker import CheckReport, OpRow, check_model, format_report
from segd.tflite.compiler import (
    CompileLog,
    CompileResult,
    EdgeTpuCompileFailed,
    EdgeTpuCompilerUnavailable,
    compile_edgetpu,
    parse_compiler_log,
)
from segd.tflite.model import (
    OpInfo,
    QuantParams,
    TensorInfo,
    dequantize,
    find_tensor,
    list_ops,
    read_model,
    subgraph_inputs,
    subgraph_outputs,
    tensor_data,
    tensor_info,
)
from segd.tflite.surgery import StripResult, strip_tail

__all__ = [
    "CheckReport",
    "CompileLog",
    "CompileResult",
    "EdgeTpuCompileFailed",
    "EdgeTpuCompilerUnavailable",
    "OpInfo",
    "OpRow",
    "QuantParams",
    "StripResult",
    "TensorInfo",
    "check_model",
    "compile_edgetpu",
    "dequantize",
    "find_tensor",
    "format_report",
    "list_ops",
    "parse_compiler_log",
    "read_model",
    "strip_tail",
    "subgraph_inputs",
    "subgraph_outputs",
    "tensor_data",
    "tensor_info",
]

"""Triton ``config.pbtxt``: every config is parsed with the official ModelConfig protobuf before it is written.

The schema is ``tritonclient.grpc.model_config_pb2.ModelConfig`` (the server's own ``model_config.proto``);
``google.protobuf.text_format`` rejects unknown fields, wrong types and malformed text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infoquant_export.errors import UserError

ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "INT64": "TYPE_INT64",
                  "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


def _schema() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise UserError("tritonclient is not installed (its ModelConfig schema checks every config.pbtxt)",
                        'pip install -e ".[deploy]" (tritonclient[grpc])') from err
    return model_config_pb2.ModelConfig


def parse_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse ``text`` as a ModelConfig and check the rules Triton enforces at load time; UserError otherwise."""
    from google.protobuf import text_format

    config = _schema()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise UserError(f"{where} is rejected by Triton's ModelConfig schema: {str(err).splitlines()[0]}",
                        "fix the config text (fields: model_config.proto of the Triton server)") from err
    if not config.name:
        raise UserError(f"{where} has no model name", "set name: \"...\"")
    if bool(config.platform) == bool(config.backend):
        raise UserError(f"{where} must set exactly one of platform and backend", "e.g. backend: \"python\"")
    if config.HasField("dynamic_batching") and config.max_batch_size < 1:
        raise UserError(f"{where} enables dynamic batching with max_batch_size {config.max_batch_size}",
                        "set max_batch_size >= 1 (--max-batch-size)")
    for group in config.instance_group:
        if group.count < 1:
            raise UserError(f"{where}: instance count {group.count}", "use --instances >= 1")
    return config


def render_config(text: str, where: str = "config.pbtxt") -> str:
    """The canonical text of a validated config (what is written to disk)."""
    from google.protobuf import text_format

    return text_format.MessageToString(parse_config(text, where))


def write_config(directory: Path, text: str) -> Path:
    """Validate ``text`` and write ``directory/config.pbtxt`` (the caller's directory is a temporary sibling)."""
    path = directory / "config.pbtxt"
    path.write_text(render_config(text, str(path.relative_to(directory.parent))))
    return path


def quote(value: str) -> str:
    """A protobuf text string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parameters(values: dict[str, str]) -> str:
    return "\n".join(f"parameters {{ key: {quote(k)} value {{ string_value: {quote(v)} }} }}"
                     for k, v in values.items())

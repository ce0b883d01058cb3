"""Triton Python-backend entry point of an infoquant-export LLM (copied verbatim to ``<model>/1/model.py``).

The Python stub embeds the system interpreter, not the environment that wrote this repository, so
``initialize`` first adds the ``python_paths`` config parameter (and ``$INFOQUANT_PYTHONPATH``) as site
directories, then imports ``infoquant_export.deploy.triton_model``, which does the work. In a Triton container
where ``pip install infoquant-export`` was run, the recorded paths simply do not exist and are skipped.
"""

import json
import os
import site
import sys


def _add_paths(model_config: dict) -> None:
    recorded = model_config.get("parameters", {}).get("python_paths", {}).get("string_value", "")
    for entry in (os.environ.get("INFOQUANT_PYTHONPATH", ""), recorded):
        for path in entry.split(os.pathsep):
            if path and os.path.isdir(path) and path not in sys.path:
                site.addsitedir(path)  # also runs .pth files (editable installs)


class TritonPythonModel:
    def initialize(self, args):
        _add_paths(json.loads(args["model_config"]))
        import triton_python_backend_utils as pb_utils

        from infoquant_export.deploy.triton_model import LlmModel

        self.impl = LlmModel(args, pb_utils)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()

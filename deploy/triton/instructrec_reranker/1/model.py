"""Triton Python backend of the InstructRec reranker. Thin on purpose: decoding, batching and scoring live in
`instructrec.model.serving`, so in-process and served scores come from one implementation.

Every version folder holds this file beside `reranker/`, the saved model that `instructrec export` wrote.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from instructrec.model import serving


class TritonPythonModel:
    def initialize(self, args):
        # args["model_repository"] is this model's folder; the weights sit in the version's own folder.
        options = serving.ServingOptions.from_triton(json.loads(args["model_config"]), args)
        weights = Path(args["model_repository"]) / args["model_version"] / serving.WEIGHTS_DIR
        self.scorer = serving.load_scorer(weights, options)  # once, warmed up
        self.version = args["model_version"].encode()

    def execute(self, requests):
        # All requests the dynamic batcher gathered are scored together: one forward pass.
        inputs = [pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy() for request in requests]
        return [self._response(result) for result in self.scorer.score_triton(inputs)]

    def _response(self, result):
        if isinstance(result, serving.RequestError):
            error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        version = np.full((len(result), 1), self.version, dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("SCORES", result), pb_utils.Tensor("MODEL_VERSION", version)]
        )

    def finalize(self):
        self.scorer = None

"""Triton Python backend of the InstructRec reranker. Thin on purpose: decoding, batching and scoring live in
`instructrec.serving`, so in-process and served scores come from one implementation.

Every version folder holds this file beside `reranker/`, the saved model that `instructrec export` wrote.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from instructrec.artifacts import VERSION_WEIGHTS_DIR
from instructrec.serving import options as serving_options
from instructrec.serving.heap import HeapTrimmer


class TritonPythonModel:
    def initialize(self, args):
        # args["model_repository"] is this model's folder; the version's own folder holds its weights and,
        # when it was calibrated on the serving machine, its choice of precision and threads.
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        options = serving_options.ServingOptions.from_triton(config, args).for_version(version_dir)
        # OpenMP reads its wait policy once, when torch loads: set it first, then import the scorer (torch).
        serving_options.set_omp_wait_policy(options.omp_wait_policy)
        from instructrec.serving import scorer

        self.errors = scorer.RequestError
        self.scorer = scorer.load_scorer(version_dir / VERSION_WEIGHTS_DIR, options)  # once, warmed up
        self.version = args["model_version"].encode()
        self.trim_heap = HeapTrimmer(options.trim_heap_s)

    def execute(self, requests):
        # All requests the dynamic batcher gathered are scored together: one forward pass.
        inputs = [pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy() for request in requests]
        responses = [self._response(result) for result in self.scorer.score_triton(inputs)]
        self.trim_heap()  # every trim_heap_s: the batch's freed memory back to the system
        return responses

    def _response(self, result):
        if isinstance(result, self.errors):
            error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        version = np.full((len(result), 1), self.version, dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("SCORES", result), pb_utils.Tensor("MODEL_VERSION", version)]
        )

    def finalize(self):
        self.scorer = None

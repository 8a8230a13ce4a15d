"""Echo model for the Triton health check: OUTPUT0 is INPUT0, unchanged.

It imports nothing beyond numpy and the backend utilities so that it loads in well under a second and
tells us only whether the server, the Python backend stub and its environment are sound.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            output = pb_utils.Tensor("OUTPUT0", np.asarray(data, dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
